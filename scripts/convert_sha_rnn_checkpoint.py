#!/usr/bin/env python3
"""Convert a Smerity/sha-rnn main.py checkpoint ([model, criterion])
to ``sha_rnn_lm``; the vocabulary is rebuilt from the original preprocessed train.txt.

    python scripts/convert_sha_rnn_checkpoint.py checkpoints/ENWIK8.pt converted/sha-rnn --trust-pickle \\
        --train-txt data/enwik8/train.txt
    fairseq-preprocess --only-source --srcdict converted/sha-rnn/dict.txt --validpref data/enwik8/valid.txt \\
        --testpref data/enwik8/test.txt --destdir data-bin/enwik8-sha
    fairseq-eval-lm data-bin/enwik8-sha --user-dir fairseq_ext --task streaming_lm --path converted/sha-rnn/model.pt \\
        --batch-size 8 --tokens-per-sample 1024 --gen-subset test

Run with --help for every option; docs/convert-sha-rnn.md explains the vocabulary and the protocol.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_ext.convert.sha_rnn import main  # noqa: E402

if __name__ == "__main__":
    main()  # a bad input prints one line "error: ..." and exits 1 (fairseq_ext.compat.errors), no traceback
