#!/usr/bin/env python3
"""Convert a Transformer-XL checkpoint (original ``model.pt`` or NVIDIA ``checkpoint_*.pt``) to ``transformer_xl_lm``.

    python scripts/convert_transformer_xl_checkpoint.py checkpoint_best.pt converted/ --trust-pickle
    python scripts/convert_transformer_xl_checkpoint.py LM-TFM-wt103/model.pt converted/ --vocab data/cache.pt \\
        --trust-pickle
    fairseq-preprocess --only-source --srcdict converted/dict.txt --testpref wiki.test.tokens --destdir data-bin/xl
    fairseq-eval-lm data-bin/xl --user-dir fairseq_ext --task streaming_lm --path converted/model.pt ...

Run with --help for every option; docs/convert-transformer-xl.md explains the vocabulary mapping.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_ext.convert.transformer_xl import main  # noqa: E402

if __name__ == "__main__":
    main()  # a bad input prints one line "error: ..." and exits 1 (fairseq_ext.compat.errors), no traceback
