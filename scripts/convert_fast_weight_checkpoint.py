#!/usr/bin/env python3
"""Convert an IDSIA/lmtool-fwms checkpoint (pickled ``best_model.pt`` / ``latest_model.pt``) to ``fast_weight_lm``.

    python scripts/convert_fast_weight_checkpoint.py work_dir/best_model.pt converted/ \\
        --vocab data/wikitext-103/cache.pt --trust-pickle
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
