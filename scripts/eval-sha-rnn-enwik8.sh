#!/usr/bin/env bash
# Evaluate a SHA-RNN "enwik8" checkpoint as the original (T 1024, state carried; valid 16 streams, test 8).
#   bash scripts/eval-sha-rnn-enwik8.sh CHECKPOINT [fairseq-eval-lm flags, e.g. --cpu]
# Variables: DATA, SPLIT (test), BATCH (16 valid / 8 test), DRY_RUN=1 (see scripts/lib/sha-rnn.sh).
exec bash "$(dirname "$0")/lib/sha-rnn.sh" eval enwik8 "$@"
