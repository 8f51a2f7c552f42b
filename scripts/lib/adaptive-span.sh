#!/usr/bin/env bash
# Shared by scripts/{train,eval}-adaptive-span-<config>.sh: the published experiments of Adaptive Attention Span and
# All-attention (persistent memory), facebookresearch/adaptive-span experiments/*.sh (shared/specs/adaptive_span.md
# §3). Architecture, span L, dropout, span-loss coefficient, persistent vectors and adaptive I/O live in the arch
# presets; this file holds only training and evaluation flags.
#
#   bash scripts/lib/adaptive-span.sh train CONFIG [fairseq-train flags...]
#   bash scripts/lib/adaptive-span.sh eval CONFIG CHECKPOINT [fairseq-eval-lm flags...]
#
# Training: the original --batch-sz 64 is the GLOBAL batch (split over the data-parallel workers by stream rows);
# its --batch-split k is --batch-split k (each worker's streams in k row groups, forward/backward each, same
# gradients). Adagrad configs: adagrad_clip (per-tensor step clipping 0.03, no global --clip-norm) with fairseq's
# `fixed` warmup, whose lr*(n+1)/W equals the original LambdaLR stepped before the update; --fp16-no-flatten-grads
# is always passed (the clip is per tensor; without --fp16/--bf16 it changes nothing). wt103-pers: torch-default
# Adam 2.5e-4 with global clip-norm 1.0.
#
# Fine-tune phase (configs marked "+ N @lr/10"): the original re-runs the script with --lr/10 and a larger --niter,
# resuming from the same checkpoint with the Adagrad accumulators and the step count kept. Here: a second
# fairseq-train on the same SAVE_DIR with --lr LR/10 --max-update STEPS+N, which resumes from checkpoint_last.pt
# (optimizer state kept; `fixed` takes the new lr from the first resumed update). PHASE=all (default) runs the
# main phase then the fine-tune phase; PHASE=main or PHASE=finetune runs one. A phase whose --max-update the
# checkpoint has already reached is skipped (fairseq-train would otherwise run one more update at that phase's lr).
#
# Epochs: when its streams wrap, the original zeroes the caches and restarts every stream at a random offset in
# [0, M): --train-stream-offset random (streaming_lm resets the training memory at every epoch start).
#
# Validation: the original ran a rolling 100-batch validation (own cache) every 1000 steps; we run a full
# validation of the valid split (8 streams, cold) every 5000 updates and at epoch ends, and save then.
#
# Evaluation (the original --full-eval-mode --batch-sz 8): fairseq-eval-lm streams the split in 8 streams of blocks
# of M with zero-initialised memory carried across blocks, every position scored (protocol stream(B=8, T=M, cold));
# unlike the original it also scores the final < M+1 tokens of each stream.
#
# Variables: DATA (per config), SAVE_DIR (checkpoints/adaptive_span_CONFIG), NGPU (data-parallel workers; default:
# visible GPUs, else 1; must divide 64), PHASE (all | main | finetune), ARCH (the config's preset), STEPS and
# FINETUNE_STEPS (main-phase updates, extra fine-tune updates), LR and FINETUNE_LR (default LR/10), PYTHON (reads
# the update count of checkpoint_last.pt), SPLIT (eval: test), BATCH (eval streams: 8), DRY_RUN=1 prints the
# command(s), each after a '# phase ...' comment line.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh

# as_config CONFIG: sets ARCH_DEFAULT DATA_DEFAULT OPT_FLAGS LR_DEFAULT WARMUP BLOCK SPLIT_K STEPS_DEFAULT FT_STEPS
#                    (0: no fine-tune phase)
as_config() {
  # adagrad_with_grad_clip, --lr 0.07 --grad-clip 0.03 (per tensor); LambdaLR warmup == fixed --warmup-updates
  local adagrad=(--optimizer adagrad_clip --adagrad-clip 0.03 --fp16-no-flatten-grads)
  # wiki103_pers.sh: --optim adam --grad-clip 1 (global norm), torch Adam defaults
  local adam=(--optimizer adam --adam-betas "(0.9, 0.999)" --adam-eps 1e-08 --weight-decay 0 --clip-norm 1.0)
  OPT_FLAGS=("${adagrad[@]}"); LR_DEFAULT=0.07; WARMUP=32000; BLOCK=512; SPLIT_K=1; FT_STEPS=0
  case "$1" in
    enwik8-small)  # enwik8_small.sh (1 GPU in the original): M 256, warmup 8k, 150k steps
      ARCH_DEFAULT=adaptive_span_enwik8_small; DATA_DEFAULT=data-bin/enwik8
      BLOCK=256; WARMUP=8000; STEPS_DEFAULT=150000 ;;
    enwik8)  # enwik8.sh: 600k steps
      ARCH_DEFAULT=adaptive_span_enwik8; DATA_DEFAULT=data-bin/enwik8; STEPS_DEFAULT=600000 ;;
    enwik8-large)  # enwik8_large.sh: batch 64 in 2 splits, 150k + 20k @0.007
      ARCH_DEFAULT=adaptive_span_enwik8_large; DATA_DEFAULT=data-bin/enwik8
      SPLIT_K=2; STEPS_DEFAULT=150000; FT_STEPS=20000 ;;
    text8)  # text8.sh: 900k steps
      ARCH_DEFAULT=adaptive_span_text8; DATA_DEFAULT=data-bin/text8; STEPS_DEFAULT=900000 ;;
    text8-large)  # text8_large.sh: 2 splits, 250k + 20k @0.007
      ARCH_DEFAULT=adaptive_span_text8_large; DATA_DEFAULT=data-bin/text8
      SPLIT_K=2; STEPS_DEFAULT=250000; FT_STEPS=20000 ;;
    enwik8-pers-small)  # enwik8_pers_small.sh: 2 splits, 450k + 30k @0.007 (--niter arithmetic; comment says 20k)
      ARCH_DEFAULT=all_attention_enwik8_small; DATA_DEFAULT=data-bin/enwik8
      SPLIT_K=2; STEPS_DEFAULT=450000; FT_STEPS=30000 ;;
    enwik8-pers)  # enwik8_pers.sh: 2 splits, 200k + 10k @0.007 (--niter arithmetic; comment says 20k)
      ARCH_DEFAULT=all_attention_enwik8; DATA_DEFAULT=data-bin/enwik8
      SPLIT_K=2; STEPS_DEFAULT=200000; FT_STEPS=10000 ;;
    wt103-pers)  # wiki103_pers.sh: Adam 2.5e-4, clip 1.0, warmup 8k, M 256, 2 splits, 800k + 50k @2.5e-5
      ARCH_DEFAULT=all_attention_wiki103; DATA_DEFAULT=data-bin/wikitext-103
      OPT_FLAGS=("${adam[@]}"); LR_DEFAULT=2.5e-4; WARMUP=8000; BLOCK=256
      SPLIT_K=2; STEPS_DEFAULT=800000; FT_STEPS=50000 ;;
    *) die "unknown adaptive-span config '$1' (enwik8-small enwik8 enwik8-large text8 text8-large enwik8-pers-small enwik8-pers wt103-pers)" ;;
  esac
}

checkpoint_updates() {  # checkpoint_updates FILE: the update count saved in FILE (0 when there is none)
  [ -f "$1" ] || { echo 0; return; }
  "${PYTHON:-$(tool python)}" -c 'import sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=False, mmap=True)
print(state["optimizer_history"][-1]["num_updates"])' "$1" || die "cannot read the update count of $1"
}

# run_phase NAME LR MAX_UPDATE [fairseq-train flags...]
run_phase() {
  local name=$1 lr=$2 total=$3; shift 3
  local cmd=("${FAIRSEQ_TRAIN:-$(tool fairseq-train)}" "$DATA" --user-dir fairseq_ext --task streaming_lm
    --arch "$ARCH" --criterion lm_loss "${OPT_FLAGS[@]}" --lr "$lr" --lr-scheduler fixed --warmup-updates "$WARMUP"
    --max-update "$total" --tokens-per-sample "$BLOCK" --batch-size "$WORKER_BATCH" "${SPLIT_FLAGS[@]}"
    --train-stream-offset random --batch-size-valid 8 --distributed-world-size "$NGPU" --seed 1
    --validate-interval-updates 5000
    --save-interval-updates 5000 --keep-interval-updates 2 --no-epoch-checkpoints --log-interval 200
    --save-dir "$SAVE_DIR" "$@")
  local label="phase $name: $CONFIG ($ARCH) lr $lr up to update $total"
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "# $label"; print_cmd "${cmd[@]}"; return; fi
  local reached; reached=$(checkpoint_updates "$SAVE_DIR/checkpoint_last.pt")
  if [ "$reached" -ge "$total" ]; then echo "$label: skipped, $SAVE_DIR/checkpoint_last.pt is at update $reached"; return; fi
  if [ "$name" = finetune ] && [ "$reached" -lt "$STEPS" ]; then
    die "$label: $SAVE_DIR/checkpoint_last.pt is at update $reached, before the end of the main phase ($STEPS): run PHASE=main first"
  fi
  echo "$label (resuming from update $reached), global batch 64 = $NGPU workers x $WORKER_BATCH streams in $SPLIT_K row group(s), M=$BLOCK"
  "${cmd[@]}"
}

MODE=${1:?usage: $0 train|eval CONFIG ...}
CONFIG=${2:?usage: $0 train|eval CONFIG ...}
shift 2
as_config "$CONFIG"
DATA=${DATA:-$DATA_DEFAULT}

case "$MODE" in
  train)
    PHASE=${PHASE:-all}
    case "$PHASE" in all|main|finetune) ;; *) die "PHASE must be all, main or finetune, got '$PHASE'" ;; esac
    ARCH=${ARCH:-$ARCH_DEFAULT}
    STEPS=${STEPS:-$STEPS_DEFAULT}; FINETUNE_STEPS=${FINETUNE_STEPS:-$FT_STEPS}
    [ "$PHASE" = finetune ] && [ "$FINETUNE_STEPS" = 0 ] && die "config $CONFIG has no fine-tune phase (PHASE=finetune)"
    LR=${LR:-$LR_DEFAULT}; FINETUNE_LR=${FINETUNE_LR:-$(awk -v lr="$LR" 'BEGIN { printf "%.6g", lr / 10 }')}
    split_global_batch 64
    [ $((WORKER_BATCH % SPLIT_K)) = 0 ] || die "the per-worker batch $WORKER_BATCH (64 / NGPU=$NGPU) does not split into --batch-split $SPLIT_K row groups; use fewer workers"
    SPLIT_FLAGS=(); [ "$SPLIT_K" -gt 1 ] && SPLIT_FLAGS=(--batch-split "$SPLIT_K")
    SAVE_DIR=${SAVE_DIR:-checkpoints/adaptive_span_$CONFIG}
    if [ "${DRY_RUN:-0}" != 1 ]; then
      [ -f "$DATA/dict.txt" ] || die "no binarised corpus in $DATA: run the matching scripts/prepare-*.sh first (enwik8 with the default ENWIK8_NEWLINE=eos: newline = </s>, the original's <eos>) or set DATA"
    fi
    if [ "$PHASE" != finetune ]; then run_phase main "$LR" "$STEPS" "$@"; fi
    if [ "$PHASE" != main ] && [ "$FINETUNE_STEPS" -gt 0 ]; then
      run_phase finetune "$FINETUNE_LR" $((STEPS + FINETUNE_STEPS)) "$@"
    fi ;;
  eval)
    CKPT=${1:?usage: $0 eval CONFIG CHECKPOINT [fairseq-eval-lm flags...]}
    shift
    BATCH=${BATCH:-8}
    streaming_eval "$CKPT" "${SPLIT:-test}" "$BATCH" "$BLOCK" 0 "protocol: stream(B=$BATCH, T=$BLOCK, cold): memory zero-initialised and carried, every position scored (original full evaluation), split ${SPLIT:-test}" "$@" ;;
  *) die "usage: $0 train|eval CONFIG ..." ;;
esac
