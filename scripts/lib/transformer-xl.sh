#!/usr/bin/env bash
# Shared by scripts/{train,eval}-transformer-xl-<config>.sh: the published recipes of Transformer-XL
# (shared/specs/transformer_xl.md §5.1 original kimiyoung/transformer-xl pytorch/run_*.sh, §5.2 NVIDIA
# DeepLearningExamples wt103 yamls). Architecture lives in the arch presets; this file holds only training and
# evaluation flags.
#
#   bash scripts/lib/transformer-xl.sh train CONFIG [fairseq-train flags...]
#   bash scripts/lib/transformer-xl.sh eval CONFIG CHECKPOINT [fairseq-eval-lm flags...]
#
# Not reproduced: NVIDIA's --roll (random cyclic shift of every stream per epoch) and the originals' first update
# at the peak rate during warmup (add --peak-lr-first-update for that); training-time validation uses the training
# T and M (the originals' eval_tgt_len span trick only affects model selection, not the reported eval.py numbers).
#
# Variables: DATA (per config), SAVE_DIR (checkpoints/transformer_xl_CONFIG), NGPU (data-parallel workers;
# default: visible GPUs, else 1 -- the published global batch is split over them, so it must divide it),
# SPLIT (eval: test), BATCH (eval streams), PROTOCOL (eval: cold | warmup), DRY_RUN=1 prints the command.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh

# txl_config CONFIG: sets ARCH DATA_DEFAULT OPT_FLAGS SCHED_FLAGS MAX_UPDATE TGT MEM GLOBAL_BATCH VALID_BATCH SEED
#                     EVAL_TGT EVAL_MEM EVAL_CLAMP EVAL_BATCH EVAL_PROTOCOL
txl_config() {
  local adam=(--optimizer adam --adam-betas "(0.9, 0.999)" --adam-eps 1e-08 --lr 0.00025 --clip-norm 0.25)
  # NVIDIA jitlamb: no bias correction, ||w|| clamped to 10, trust ||w|| / (||u|| + eps) (lamb_torch defaults); the
  # trust ratio is per tensor, so fairseq's flattened fp16 master weights are off (matters only with --fp16/--bf16)
  local lamb=(--optimizer lamb_torch --lamb-betas "(0.9, 0.999)" --lamb-eps 1e-06 --weight-decay 0 --min-trust 0
              --clip-norm 0.25 --fp16-no-flatten-grads)
  SEED=1111; VALID_BATCH=10; EVAL_BATCH=10; EVAL_PROTOCOL=cold
  case "$1" in
    wt103-base)  # run_wt103_base.sh: Adam 2.5e-4, cosine over 200k, no warmup, batch 60, 150/150; eval 64/640/400
      ARCH=transformer_xl_wiki103_base; DATA_DEFAULT=data-bin/wikitext-103
      OPT_FLAGS=("${adam[@]}"); SCHED_FLAGS=(--lr-scheduler cosine_warmup_xl --cosine-period total --warmup-updates 0 --min-lr 0)
      MAX_UPDATE=200000; TGT=150; MEM=150; GLOBAL_BATCH=60
      EVAL_TGT=64; EVAL_MEM=640; EVAL_CLAMP=400 ;;
    wt103-large)  # run_wt103_large.sh: warmup 16k, 4M steps, batch 128, 384/384; eval 128/1600/1000
      ARCH=transformer_xl_wiki103_large; DATA_DEFAULT=data-bin/wikitext-103
      OPT_FLAGS=("${adam[@]}"); SCHED_FLAGS=(--lr-scheduler cosine_warmup_xl --cosine-period total --warmup-updates 16000 --min-lr 0)
      MAX_UPDATE=4000000; TGT=384; MEM=384; GLOBAL_BATCH=128
      EVAL_TGT=128; EVAL_MEM=1600; EVAL_CLAMP=1000 ;;
    enwik8-base|text8-base)  # run_{enwik8,text8}_base.sh: 400k steps, batch 22, 512/512; eval 80/2100/820
      ARCH=transformer_xl_${1%-base}_base; DATA_DEFAULT=data-bin/${1%-base}; [ "$1" = enwik8-base ] && DATA_DEFAULT=data-bin/enwik8-nonl
      OPT_FLAGS=("${adam[@]}"); SCHED_FLAGS=(--lr-scheduler cosine_warmup_xl --cosine-period total --warmup-updates 0 --min-lr 0)
      MAX_UPDATE=400000; TGT=512; MEM=512; GLOBAL_BATCH=22
      EVAL_TGT=80; EVAL_MEM=2100; EVAL_CLAMP=820 ;;
    enwik8-large|text8-large)  # run_{enwik8,text8}_large.sh: warmup 4000 (enwik8) / 0 (text8), batch 64, 768/768
      ARCH=transformer_xl_${1%-large}_large; DATA_DEFAULT=data-bin/${1%-large}; [ "$1" = enwik8-large ] && DATA_DEFAULT=data-bin/enwik8-nonl
      local warmup=0; [ "$1" = enwik8-large ] && warmup=4000
      OPT_FLAGS=("${adam[@]}"); SCHED_FLAGS=(--lr-scheduler cosine_warmup_xl --cosine-period total --warmup-updates "$warmup" --min-lr 0)
      MAX_UPDATE=400000; TGT=768; MEM=768; GLOBAL_BATCH=64
      EVAL_TGT=128; EVAL_MEM=3800; EVAL_CLAMP=1000 ;;
    wt103-nvidia-base)  # NVIDIA wt103_base.yaml: LAMB 0.01, eta_min 0.001, warmup 1000, 40k, batch 256, 192/192
      ARCH=transformer_xl_wiki103_nvidia_base; DATA_DEFAULT=data-bin/wikitext-103
      OPT_FLAGS=("${lamb[@]}" --lr 0.01); SCHED_FLAGS=(--lr-scheduler cosine_warmup_xl --cosine-period after_warmup --warmup-updates 1000 --min-lr 0.001)
      MAX_UPDATE=40000; TGT=192; MEM=192; GLOBAL_BATCH=256; VALID_BATCH=16
      EVAL_TGT=64; EVAL_MEM=640; EVAL_CLAMP=400; EVAL_BATCH=16; EVAL_PROTOCOL=warmup ;;
    wt103-nvidia-large)  # NVIDIA wt103_large.yaml: LAMB 0.01, eta_min 1e-4, warmup 16k, 100k, batch 128, 384/384
      ARCH=transformer_xl_wiki103_nvidia_large; DATA_DEFAULT=data-bin/wikitext-103
      OPT_FLAGS=("${lamb[@]}" --lr 0.01); SCHED_FLAGS=(--lr-scheduler cosine_warmup_xl --cosine-period after_warmup --warmup-updates 16000 --min-lr 0.0001)
      MAX_UPDATE=100000; TGT=384; MEM=384; GLOBAL_BATCH=128; VALID_BATCH=16
      EVAL_TGT=128; EVAL_MEM=1600; EVAL_CLAMP=1000; EVAL_BATCH=16; EVAL_PROTOCOL=warmup ;;
    *) die "unknown Transformer-XL config '$1' (wt103-base wt103-large enwik8-base enwik8-large text8-base text8-large wt103-nvidia-base wt103-nvidia-large)" ;;
  esac
}

MODE=${1:?usage: $0 train|eval CONFIG ...}
CONFIG=${2:?usage: $0 train|eval CONFIG ...}
shift 2
txl_config "$CONFIG"
DATA=${DATA:-$DATA_DEFAULT}

case "$MODE" in
  train)
    split_global_batch "$GLOBAL_BATCH"
    SAVE_DIR=${SAVE_DIR:-checkpoints/transformer_xl_$CONFIG}
    cmd=("${FAIRSEQ_TRAIN:-$(tool fairseq-train)}" "$DATA" --user-dir fairseq_ext --task streaming_lm --arch "$ARCH"
      --criterion lm_loss "${OPT_FLAGS[@]}" "${SCHED_FLAGS[@]}" --max-update "$MAX_UPDATE"
      --tokens-per-sample "$TGT" --mem-len "$MEM" --batch-size "$WORKER_BATCH" --batch-size-valid "$VALID_BATCH"
      --distributed-world-size "$NGPU" --seed "$SEED" --validate-interval-updates 4000 --save-interval-updates 4000
      --keep-interval-updates 2 --no-epoch-checkpoints --log-interval 200 --save-dir "$SAVE_DIR" "$@")
    if [ "${DRY_RUN:-0}" = 1 ]; then print_cmd "${cmd[@]}"; exit 0; fi
    [ -f "$DATA/dict.txt" ] || die "no binarised corpus in $DATA: run the matching scripts/prepare-*.sh first (enwik8: ENWIK8_NEWLINE=drop) or set DATA"
    echo "recipe: $CONFIG ($ARCH), global batch $GLOBAL_BATCH = $NGPU workers x $WORKER_BATCH streams, T=$TGT, M=$MEM"
    exec "${cmd[@]}" ;;
  eval)
    CKPT=${1:?usage: $0 eval CONFIG CHECKPOINT [fairseq-eval-lm flags...]}
    shift
    PROTOCOL=${PROTOCOL:-$EVAL_PROTOCOL}
    BATCH=${BATCH:-$EVAL_BATCH}
    case "$PROTOCOL" in
      cold) WARMUP=0 ;;  # original eval.py: every stream starts with an empty memory, every token counts
      warmup) WARMUP=$EVAL_MEM ;;  # NVIDIA eval.py: each stream first reads ceil(M/T)*T preceding tokens, unscored
      *) die "PROTOCOL must be cold or warmup, got '$PROTOCOL'" ;;
    esac
    streaming_eval "$CKPT" "${SPLIT:-test}" "$BATCH" "$EVAL_TGT" "$WARMUP" "protocol: stream(B=$BATCH, T=$EVAL_TGT, M=$EVAL_MEM, clamp=$EVAL_CLAMP, same_length, $PROTOCOL), split ${SPLIT:-test}" \
      --model-overrides "{'mem_len': $EVAL_MEM, 'clamp_len': $EVAL_CLAMP, 'same_length': True}" "$@" ;;
  *) die "usage: $0 train|eval CONFIG ..." ;;
esac
