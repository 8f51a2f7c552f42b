#!/usr/bin/env bash
# Evaluate an adaptive-span / all-attention "wt103-pers" checkpoint with the original full evaluation (8 cold streams).
#   bash scripts/eval-adaptive-span-wt103-pers.sh CHECKPOINT [fairseq-eval-lm flags, e.g. --cpu]
# Variables: DATA, SPLIT (test), BATCH (8), DRY_RUN=1 (see scripts/lib/adaptive-span.sh).
exec bash "$(dirname "$0")/lib/adaptive-span.sh" eval wt103-pers "$@"
