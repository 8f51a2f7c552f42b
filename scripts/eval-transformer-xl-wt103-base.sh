#!/usr/bin/env bash
# Evaluate a Transformer-XL "wt103-base" checkpoint with the published eval.py settings (streaming, memory carried).
#   bash scripts/eval-transformer-xl-wt103-base.sh CHECKPOINT [fairseq-eval-lm flags, e.g. --cpu]
# Variables: DATA, SPLIT (test), BATCH, PROTOCOL (cold | warmup), DRY_RUN=1 (see scripts/lib/transformer-xl.sh).
exec bash "$(dirname "$0")/lib/transformer-xl.sh" eval wt103-base "$@"
