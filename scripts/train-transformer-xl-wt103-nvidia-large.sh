#!/usr/bin/env bash
# Transformer-XL "wt103-nvidia-large" with its published training flags (recipe table: scripts/lib/transformer-xl.sh).
#   bash scripts/train-transformer-xl-wt103-nvidia-large.sh [fairseq-train flags, e.g. --fp16]
# Variables: DATA, SAVE_DIR, NGPU, DRY_RUN=1 (see scripts/lib/transformer-xl.sh).
exec bash "$(dirname "$0")/lib/transformer-xl.sh" train wt103-nvidia-large "$@"
