#!/usr/bin/env python3
"""Convert an IDSIA/lmtool-fwms checkpoint (pickled ``best_model.pt`` / ``latest_model.pt``) to ``fast_weight_lm``.
--carry-over-fast-weight on|off is required for the fast weight layers (attn_type 24/25/26/34/35/44/45/46): the
model file does not record lmtool's --carry_over_fast_weight training flag (train.py logs it at the top of
work_dir/log.txt: 'carry_over_fast_weight : True' means on; the *_carry_over_* scripts set it).

    python scripts/convert_fast_weight_checkpoint.py work_dir/best_model.pt converted/ \\
        --vocab data/wikitext-103/cache.pt --trust-pickle --carry-over-fast-weight off
    fairseq-preprocess --only-source --srcdict converted/dict.txt --testpref wiki.test.tokens --destdir data-bin/fwp
    fairseq-eval-lm data-bin/fwp --user-dir fairseq_ext --path converted/model.pt ...

Run with --help for every option; docs/convert-fast-weight.md explains the mapping (spec fast_weights.md §6).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_ext.convert.fast_weight import main  # noqa: E402

if __name__ == "__main__":
    main()  # a bad input prints one line "error: ..." and exits 1 (fairseq_ext.compat.errors), no traceback
