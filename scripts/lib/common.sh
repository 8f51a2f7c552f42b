# Shell helpers shared by the recipe libraries scripts/lib/{transformer-xl,adaptive-span,fast-weights,sha-rnn}.sh;
# sourced, not run.
# Expects the repository root as the working directory (tool looks for .venv there).

die() { echo "$*" >&2; exit 2; }

default_ngpu() {  # visible GPUs, else 1
  if command -v nvidia-smi >/dev/null 2>&1; then
    local n; n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${n:-0}" -gt 0 ] && { echo "$n"; return; }
  fi
  echo 1
}

tool() {  # tool NAME: the venv's console script when present
  [ -x ".venv/bin/$1" ] && echo ".venv/bin/$1" || echo "$1"
}

# split_global_batch GLOBAL: sets NGPU (default: default_ngpu) and WORKER_BATCH = GLOBAL / NGPU, the per-worker
# --batch-size of a published global batch; dies when NGPU does not divide it
split_global_batch() {
  NGPU=${NGPU:-$(default_ngpu)}
  [[ "$NGPU" =~ ^[1-9][0-9]*$ ]] || die "NGPU must be a positive integer, got '$NGPU'"
  [ $(($1 % NGPU)) = 0 ] || die "the published global batch $1 does not split over NGPU=$NGPU workers; set NGPU to a divisor (or pass --batch-size and accept another global batch)"
  WORKER_BATCH=$(($1 / NGPU))
}

print_cmd() { printf '%q ' "$@"; echo; }  # one shell-quoted command line (DRY_RUN=1)

# run_or_print CMD...: the shell-quoted command line with DRY_RUN=1, else exec it (the last step of a recipe)
run_or_print() {
  if [ "${DRY_RUN:-0}" = 1 ]; then print_cmd "$@"; exit 0; fi
  exec "$@"
}

# require_data DIR HINT: dies unless DIR holds a binarised corpus (dict.txt); HINT says how to make one
require_data() {
  [ -f "$1/dict.txt" ] || die "no binarised corpus in $1: $2"
}

# streaming_eval CKPT SPLIT BATCH T WARMUP_TOKENS PROTOCOL_LINE [fairseq-eval-lm flags...]: fairseq-eval-lm over $DATA
# with --task streaming_lm (BATCH streams, segments of T, state carried); prints the command with DRY_RUN=1, else
# echoes PROTOCOL_LINE and execs it (the last step of an eval recipe)
streaming_eval() {
  local ckpt=$1 split=$2 batch=$3 tgt=$4 warm=$5 label=$6; shift 6
  local cmd=("${FAIRSEQ_EVAL_LM:-$(tool fairseq-eval-lm)}" "$DATA" --user-dir fairseq_ext --task streaming_lm
    --path "$ckpt" --gen-subset "$split" --batch-size "$batch" --tokens-per-sample "$tgt" --eval-warmup-tokens "$warm"
    "$@")
  [ "${DRY_RUN:-0}" = 1 ] || echo "$label"
  run_or_print "${cmd[@]}"
}
