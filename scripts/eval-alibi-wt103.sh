#!/usr/bin/env bash
# Evaluate an alibi_lm checkpoint on WikiText-103 under a named protocol (shared/specs/README.md):
#
#   bash scripts/eval-alibi-wt103.sh CHECKPOINT nonoverlap L_VALID            # paper Table 5 / 6
#   bash scripts/eval-alibi-wt103.sh CHECKPOINT sliding L_VALID STRIDE        # Table 7 (S=512), Tables 13-15 (S=1)
#   (further fairseq-eval-lm flags may follow, e.g. --cpu or --fp16)
#
# nonoverlap(L): blocks of L tokens scored independently (--context-window 0).
# sliding(L,S):  windows of L tokens advancing by S; only the last S positions of each window are scored
#                (--tokens-per-sample L --context-window L-S). S=1 is one forward per token (slow).
# Unlike the original fork, no --model-overrides are needed for L_VALID > training L, and any batch size works.
# Variables: DATA (data-bin/wikitext-103), SPLIT (valid), BATCH (1), DRY_RUN=1 prints the command.
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: $0 CHECKPOINT nonoverlap L_VALID | $0 CHECKPOINT sliding L_VALID STRIDE"
CKPT=${1:?$usage}
PROTOCOL=${2:?$usage}
L=${3:?$usage}
case "$PROTOCOL" in
  nonoverlap) CONTEXT=0; LABEL="nonoverlap(L=$L)" ;;
  sliding) S=${4:?$usage}; CONTEXT=$((L - S)); LABEL="sliding(L=$L,S=$S)"
    [ "$S" -ge 1 ] && [ "$S" -le "$L" ] || { echo "STRIDE must be in 1..L_VALID" >&2; exit 2; } ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
shift 3
[ "$PROTOCOL" = nonoverlap ] || shift  # what remains is passed to fairseq-eval-lm
DATA=${DATA:-data-bin/wikitext-103}
FAIRSEQ_EVAL_LM=${FAIRSEQ_EVAL_LM:-$( [ -x .venv/bin/fairseq-eval-lm ] && echo .venv/bin/fairseq-eval-lm || echo fairseq-eval-lm )}
cmd=("$FAIRSEQ_EVAL_LM" "$DATA" --user-dir fairseq_ext --path "$CKPT" --gen-subset "${SPLIT:-valid}"
  --sample-break-mode none --tokens-per-sample "$L" --context-window "$CONTEXT" --batch-size "${BATCH:-1}"
  --max-tokens "$((L * ${BATCH:-1}))" --softmax-batch 1024 "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
echo "protocol: $LABEL, split ${SPLIT:-valid}, batch ${BATCH:-1}"
exec "${cmd[@]}"
