#!/usr/bin/env bash
# Evaluate a fast weight programmers "medium-fwm-carry-over" checkpoint (default PROTOCOL=stream; protocols: scripts/lib/fast-weights.sh).
#   bash scripts/eval-fast-weights-medium-fwm-carry-over.sh CHECKPOINT [fairseq-eval-lm flags, e.g. --cpu]
# Variables: DATA, SPLIT (test), PROTOCOL, BATCH, DRY_RUN=1 (see scripts/lib/fast-weights.sh).
exec bash "$(dirname "$0")/lib/fast-weights.sh" eval medium-fwm-carry-over "$@"
