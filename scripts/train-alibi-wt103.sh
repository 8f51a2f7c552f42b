#!/usr/bin/env bash
# ALiBi on WikiText-103 with the paper's exact recipe (Press et al. 2021; ofirpress/attention_with_linear_biases
# README; shared/specs/alibi.md §3.1). The architecture (247M transformer_lm_wiki103 + ALiBi) lives in the
# alibi_lm_wiki103 preset; this script passes the paper's training flags only.
#
#   bash scripts/prepare-wikitext-103.sh
#   bash scripts/train-alibi-wt103.sh 512            # L = 64 ... 3072; extra fairseq-train flags may follow
#
# L=3072 uses --max-tokens 3072 --update-freq 3 (paper). Out of memory: halve --max-tokens, double --update-freq
# (pass them after L; later flags win). The paper's GPU count is not stated (9216 tokens x 8 GPUs = 73,728 tokens
# per update in Baevski & Auli's setup): with fewer GPUs raise --update-freq to keep tokens per update.
# Variables: DATA (data-bin/wikitext-103), SAVE_DIR (checkpoints/alibi_wt103_L$L), PRECISION (fp16, the paper's;
# bf16; fp32, e.g. on CPU), DRY_RUN=1 prints the command.
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-512}
shift || true
DATA=${DATA:-data-bin/wikitext-103}
SAVE_DIR=${SAVE_DIR:-checkpoints/alibi_wt103_L$L}
if [ "$L" = 3072 ]; then MAX_TOKENS=3072; UPDATE_FREQ=3; else MAX_TOKENS=9216; UPDATE_FREQ=1; fi
case "${PRECISION:-fp16}" in
  fp16) PRECISION_FLAGS=(--fp16) ;;
  bf16) PRECISION_FLAGS=(--bf16) ;;
  fp32) PRECISION_FLAGS=() ;;
  *) echo "PRECISION=${PRECISION} is not one of fp16 (the paper's), bf16, fp32" >&2; exit 2 ;;
esac
FAIRSEQ_TRAIN=${FAIRSEQ_TRAIN:-$( [ -x .venv/bin/fairseq-train ] && echo .venv/bin/fairseq-train || echo fairseq-train )}

cmd=("$FAIRSEQ_TRAIN" "$DATA" --user-dir fairseq_ext --task language_modeling --arch alibi_lm_wiki103
  --max-update 286000 --lr 1.0 --t-mult 2 --lr-period-updates 270000 --lr-scheduler cosine --lr-shrink 0.75
  --warmup-updates 16000 --warmup-init-lr 1e-07 --stop-min-lr 1e-09 --optimizer nag --min-lr 0.0001
  --clip-norm 0.1 --criterion adaptive_loss --max-tokens "$MAX_TOKENS" --update-freq "$UPDATE_FREQ"
  --tokens-per-sample "$L" --seed 1 --sample-break-mode none --skip-invalid-size-inputs-valid-test
  --ddp-backend=legacy_ddp ${PRECISION_FLAGS[@]+"${PRECISION_FLAGS[@]}"} --required-batch-size-multiple 1
  --save-dir "$SAVE_DIR" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
if [ ! -f "$DATA/dict.txt" ]; then
  echo "no binarised WikiText-103 in $DATA: run bash scripts/prepare-wikitext-103.sh first" >&2
  exit 1
fi
exec "${cmd[@]}"
