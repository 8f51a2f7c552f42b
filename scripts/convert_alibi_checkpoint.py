#!/usr/bin/env python3
"""Convert an ALiBi-fork checkpoint (transformer_lm_wiki103 + fork config) into an ``alibi_lm`` checkpoint.

    python scripts/convert_alibi_checkpoint.py alibi_wt103_L512.pt checkpoints/checkpoint_best.pt --trust-pickle
    fairseq-eval-lm data-bin/wikitext-103 --user-dir fairseq_ext --path checkpoints/checkpoint_best.pt ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_ext.convert.alibi_fork import main  # noqa: E402

if __name__ == "__main__":
    main()  # a bad input prints one line "error: ..." and exits 1 (fairseq_ext.compat.errors), no traceback
