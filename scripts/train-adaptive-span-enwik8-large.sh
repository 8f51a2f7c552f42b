#!/usr/bin/env bash
# Adaptive-span / all-attention "enwik8-large" with its published training flags (recipe table: scripts/lib/adaptive-span.sh).
#   bash scripts/train-adaptive-span-enwik8-large.sh [fairseq-train flags, e.g. --fp16]
# Variables: DATA, SAVE_DIR, NGPU, PHASE (all | main | finetune), DRY_RUN=1 (see scripts/lib/adaptive-span.sh).
exec bash "$(dirname "$0")/lib/adaptive-span.sh" train enwik8-large "$@"
