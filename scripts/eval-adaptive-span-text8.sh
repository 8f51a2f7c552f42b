#!/usr/bin/env bash
# Evaluate an adaptive-span / all-attention "text8" checkpoint with the original full evaluation (8 cold streams).
#   bash scripts/eval-adaptive-span-text8.sh CHECKPOINT [fairseq-eval-lm flags, e.g. --cpu]
# Variables: DATA, SPLIT (test), BATCH (8), DRY_RUN=1 (see scripts/lib/adaptive-span.sh).
exec bash "$(dirname "$0")/lib/adaptive-span.sh" eval text8 "$@"
