#!/usr/bin/env bash
# SHA-RNN "enwik8" with the README's two-stage training (recipe: scripts/lib/sha-rnn.sh).
#   bash scripts/train-sha-rnn-enwik8.sh [fairseq-train flags, e.g. --bf16]
# Variables: DATA, SAVE_DIR, NGPU, STAGE (all | 1 | 2), DRY_RUN=1 (see scripts/lib/sha-rnn.sh).
exec bash "$(dirname "$0")/lib/sha-rnn.sh" train enwik8 "$@"
