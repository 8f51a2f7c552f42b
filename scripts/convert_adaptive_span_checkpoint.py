#!/usr/bin/env python3
"""Convert a released facebookresearch/adaptive-span checkpoint (enwik8.pt, text8.pt, enwik8_large.pt, text8_large.pt)
to ``adaptive_span_lm``; the vocabulary is rebuilt from the original preprocessed train.txt. --adapt-span-ramp is
required for adaptive-span checkpoints: the span-mask ramp is not stored and a wrong one changes every span mask
(every released checkpoint and original experiments/*.sh script used 32; fixed-span checkpoints need no ramp).

    python scripts/convert_adaptive_span_checkpoint.py checkpoints/enwik8.pt converted/enwik8 \\
        --train-txt data/enwik8/train.txt --adapt-span-ramp 32
    fairseq-preprocess --only-source --srcdict converted/enwik8/dict.txt --validpref data/enwik8/valid.txt \\
        --testpref data/enwik8/test.txt --destdir data-bin/enwik8-as
    fairseq-eval-lm data-bin/enwik8-as --user-dir fairseq_ext --task streaming_lm --path converted/enwik8/model.pt \\
        --batch-size 8 --tokens-per-sample 512 --gen-subset test

Run with --help for every option; docs/convert-adaptive-span.md explains the vocabulary and the protocol.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_ext.convert.adaptive_span import main  # noqa: E402

if __name__ == "__main__":
    main()  # a bad input prints one line "error: ..." and exits 1 (fairseq_ext.compat.errors), no traceback
