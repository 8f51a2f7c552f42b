#!/usr/bin/env bash
# Shared by scripts/{train,eval}-sha-rnn-<config>.sh: the README commands of Smerity/sha-rnn (shared/specs/sha_rnn.md
# §2). Model sizes, attention placement and dropouts (0.1 each) live in the arch presets (sha_rnn_enwik8,
# sha_rnn_enwik8_full_attn); this file holds only training and evaluation flags.
#
#   bash scripts/lib/sha-rnn.sh train CONFIG [fairseq-train flags...]
#   bash scripts/lib/sha-rnn.sh eval CONFIG CHECKPOINT [fairseq-eval-lm flags...]
#
# Training, two stages as in the README:
#   stage 1: main.py --epochs 32 --seed 5512 --optimizer lamb --lr 2e-3 --warmup 800 --bptt 1024 --batch_size 16;
#   stage 2: the same plus --resume ENWIK8.pt --epochs 5 --lr 1e-3 --seed 125.
# LAMB with minimum trust (lamb_torch --weight-decay 1.2e-6 --min-trust 0.25 --trust-denominator update_norm, betas
# (0.9, 0.999), eps 1e-6, ||w|| clamped to 10; spec §3), global --clip-norm 0.25, linear warmup over 800 updates then
# constant (fairseq's `fixed` scheduler), variable BPTT around T = 1024 (--variable-bptt: 95% ~N(T, 5), 5% ~N(T/2, 5);
# no LR rescaling by length), batch 16 streams (GLOBAL: split over the data-parallel workers), state carried across
# batches (streaming_lm). The original saves only the best-validation model and no optimizer state, so stage 2 starts
# from stage 1's checkpoint_best.pt with fresh LAMB moments, update count 0 (the 800-update warmup restarts), epoch 1:
# fairseq's --finetune-from-model does exactly this on the first launch of stage 2 (a relaunch resumes
# STAGE2_DIR/checkpoint_last.pt with its optimizer state). Validation (16 streams, T = 1024) after every epoch.
# Mixed precision: the original ran apex AMP O1; pass --fp16 or --bf16 (--fp16-no-flatten-grads is always set: the
# trust ratio is per tensor).
#
# Evaluation (the original evaluate()): fixed segments of T = 1024, LSTM (h, c) and attention memory starting at zero
# and carried through the whole split, never reset (protocol stream(B, T=1024, cold)); valid in 16 streams, test in 8.
#
# Variables: DATA (data-bin/enwik8: scripts/prepare-enwik8.sh with the default ENWIK8_NEWLINE=eos, newline = </s>,
# the original's <eos>), SAVE_DIR (checkpoints/sha_rnn_CONFIG; stage 1 in SAVE_DIR/stage1, stage 2 in
# SAVE_DIR/stage2), NGPU (data-parallel workers; default: visible GPUs, else 1; must divide 16), STAGE (all | 1 | 2),
# ARCH (the config's preset), EPOCHS (32) and STAGE2_EPOCHS (5), LR (2e-3) and STAGE2_LR (1e-3), SEED (5512) and
# STAGE2_SEED (125), SPLIT (eval: test), BATCH (eval streams: 16 for valid, 8 for test), DRY_RUN=1 prints the
# command(s), each training command after a '# stage ...' comment line.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh

BPTT=1024
DATA_HINT="run scripts/prepare-enwik8.sh first (default ENWIK8_NEWLINE=eos: newline = </s>, the original's <eos>) or set DATA"

# sha_config CONFIG: sets ARCH_DEFAULT
sha_config() {
  case "$1" in
    enwik8) ARCH_DEFAULT=sha_rnn_enwik8 ;;  # single head: attention in block n-2 only
    enwik8-full-attn) ARCH_DEFAULT=sha_rnn_enwik8_full_attn ;;  # attention in every block (the README's 4-head model)
    *) die "unknown sha-rnn config '$1' (enwik8 enwik8-full-attn)" ;;
  esac
}

# run_stage NAME LR SEED EPOCHS STAGE_DIR [fairseq-train flags...]
run_stage() {
  local name=$1 lr=$2 seed=$3 epochs=$4 dir=$5; shift 5
  local cmd=("${FAIRSEQ_TRAIN:-$(tool fairseq-train)}" "$DATA" --user-dir fairseq_ext --task streaming_lm
    --arch "$ARCH" --criterion lm_loss
    --optimizer lamb_torch --lamb-betas "(0.9, 0.999)" --lamb-eps 1e-06 --weight-decay 1.2e-6 --min-trust 0.25
    --trust-denominator update_norm --max-weight-norm 10 --fp16-no-flatten-grads --clip-norm 0.25
    --lr "$lr" --lr-scheduler fixed --warmup-updates 800 --max-epoch "$epochs"
    --tokens-per-sample "$BPTT" --variable-bptt --batch-size "$WORKER_BATCH" --batch-size-valid 16
    --distributed-world-size "$NGPU" --seed "$seed" --no-epoch-checkpoints --log-interval 10 --save-dir "$dir"
    "${STAGE_FLAGS[@]}" "$@")
  local label="stage $name: $CONFIG ($ARCH) lr $lr seed $seed, $epochs epochs, save dir $dir"
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "# $label"; print_cmd "${cmd[@]}"; return; fi
  echo "$label, global batch 16 = $NGPU workers x $WORKER_BATCH streams, T=$BPTT (variable BPTT)"
  "${cmd[@]}"
}

MODE=${1:?usage: $0 train|eval CONFIG ...}
CONFIG=${2:?usage: $0 train|eval CONFIG ...}
shift 2
sha_config "$CONFIG"
DATA=${DATA:-data-bin/enwik8}

case "$MODE" in
  train)
    STAGE=${STAGE:-all}
    case "$STAGE" in all|1|2) ;; *) die "STAGE must be all, 1 or 2, got '$STAGE'" ;; esac
    ARCH=${ARCH:-$ARCH_DEFAULT}
    SAVE_DIR=${SAVE_DIR:-checkpoints/sha_rnn_$CONFIG}
    split_global_batch 16
    [ "${DRY_RUN:-0}" = 1 ] || require_data "$DATA" "$DATA_HINT"
    if [ "$STAGE" != 2 ]; then
      STAGE_FLAGS=()
      run_stage 1 "${LR:-2e-3}" "${SEED:-5512}" "${EPOCHS:-32}" "$SAVE_DIR/stage1" "$@"
    fi
    if [ "$STAGE" != 1 ]; then
      BEST="$SAVE_DIR/stage1/checkpoint_best.pt"
      if [ "${DRY_RUN:-0}" != 1 ] && [ ! -f "$BEST" ] && [ ! -f "$SAVE_DIR/stage2/checkpoint_last.pt" ]; then
        die "stage 2 starts from stage 1's best checkpoint, but $BEST does not exist: run STAGE=1 first"
      fi
      STAGE_FLAGS=(--finetune-from-model "$BEST")
      run_stage 2 "${STAGE2_LR:-1e-3}" "${STAGE2_SEED:-125}" "${STAGE2_EPOCHS:-5}" "$SAVE_DIR/stage2" "$@"
    fi ;;
  eval)
    CKPT=${1:?usage: $0 eval CONFIG CHECKPOINT [fairseq-eval-lm flags...]}
    shift
    SPLIT=${SPLIT:-test}
    if [ "$SPLIT" = valid ]; then BATCH=${BATCH:-16}; else BATCH=${BATCH:-8}; fi
    [ "${DRY_RUN:-0}" = 1 ] || require_data "$DATA" "$DATA_HINT"
    streaming_eval "$CKPT" "$SPLIT" "$BATCH" "$BPTT" 0 "protocol: stream(B=$BATCH, T=$BPTT, cold): LSTM state and attention memory zero-initialised and carried through the split, never reset (original evaluate()), split $SPLIT" "$@" ;;
  *) die "usage: $0 train|eval CONFIG ..." ;;
esac
