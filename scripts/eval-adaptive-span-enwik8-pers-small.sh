#!/usr/bin/env bash
# Evaluate an adaptive-span / all-attention "enwik8-pers-small" checkpoint with the original full evaluation (8 cold streams).
#   bash scripts/eval-adaptive-span-enwik8-pers-small.sh CHECKPOINT [fairseq-eval-lm flags, e.g. --cpu]
# Variables: DATA, SPLIT (test), BATCH (8), DRY_RUN=1 (see scripts/lib/adaptive-span.sh).
exec bash "$(dirname "$0")/lib/adaptive-span.sh" eval enwik8-pers-small "$@"
