#!/usr/bin/env bash
# Evaluate a fast weight programmers "small-transformer" checkpoint (default PROTOCOL=sliding; protocols: scripts/lib/fast-weights.sh).
#   bash scripts/eval-fast-weights-small-transformer.sh CHECKPOINT [fairseq-eval-lm flags, e.g. --cpu]
# Variables: DATA, SPLIT (test), PROTOCOL, BATCH, DRY_RUN=1 (see scripts/lib/fast-weights.sh).
exec bash "$(dirname "$0")/lib/fast-weights.sh" eval small-transformer "$@"
