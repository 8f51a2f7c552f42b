#!/usr/bin/env bash
# Fast weight programmers "small-fwm-carry-over" (WikiText-103) with its published training flags (recipe table:
# scripts/lib/fast-weights.sh).
#   bash scripts/train-fast-weights-small-fwm-carry-over.sh [fairseq-train flags, e.g. --fp16]
# Variables: DATA, SAVE_DIR, NGPU, ARCH, STEPS, DRY_RUN=1 (see scripts/lib/fast-weights.sh).
exec bash "$(dirname "$0")/lib/fast-weights.sh" train small-fwm-carry-over "$@"
