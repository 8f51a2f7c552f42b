#!/usr/bin/env bash
# Shared by scripts/{train,eval}-fast-weights-<config>.sh: the WikiText-103 recipes of "Linear Transformers Are
# Secretly Fast Weight Programmers" (Schlag, Irie, Schmidhuber 2021; IDSIA/lmtool-fwms example_scripts/
# 2021_linear_transformers_are_secretly_fwps/*.sh; shared/specs/fast_weights.md §2, §4). Architecture lives in the
# fast_weight_lm arch presets; this file holds only training and evaluation flags (and, for medium-transformer-xl,
# the explicit transformer_xl_lm architecture flags of medium_transformer-xl_baseline.sh).
#
#   bash scripts/lib/fast-weights.sh train CONFIG [fairseq-train flags...]
#   bash scripts/lib/fast-weights.sh eval CONFIG CHECKPOINT [fairseq-eval-lm flags...]
#
# config                 arch                                      T    global batch  warmup  steps
# small-transformer      fast_weight_wiki103_small_transformer     256  96            2000    500k
# small-fwm              fast_weight_wiki103_small_fwm             256  96            2000    500k
# small-fwm-carry-over   fast_weight_wiki103_small_fwm_carry_over  256  96            2000    500k  (no lmtool script)
# medium-transformer     fast_weight_wiki103_medium_transformer    384  56            2000    400k
# medium-fwm             fast_weight_wiki103_medium_fwm            384  56            2000    400k
# medium-fwm-carry-over  fast_weight_wiki103_medium_fwm_carry_over 384  56            2000    400k
# medium-transformer-xl  transformer_xl_lm (16 x 256, 8 x 32, FFN 2048, dropout 0.1, adaptive softmax
#                        20000/40000/200000 div_val 1, mem 384)    384  56            1000    200k
# Shared (train.py + scripts): Adam 2.5e-4 (0.9, 0.999, eps 1e-8), linear warmup then CosineAnnealingLR(max_step,
# eta_min 0) stepped at the absolute step (cosine_warmup_xl --cosine-period total --min-lr 0), clip 0.25, seed 1111,
# validation every 4000 updates on 10 ordered streams (--eval_batch_size default 10; TXL script 56) of T tokens.
#
# Training data path: every config trains with --task streaming_lm, lmtool's ordered iterator (the corpus cut into B
# contiguous streams, batch k = segment k of every stream, no shuffling, the same order every epoch). The non-carry
# models are stateless per call (fast_weight_lm returns no state without carry_over_fast_weight), so each segment
# starts from zero fast weights exactly as lmtool's; only the grouping of segments into batches differs from
# `--task language_modeling --sample-break-mode none --tokens-per-sample T` (the same contiguous blocks, shuffled).
# Carry-over models need streaming_lm: the fast weights and key sums flow from segment k to k + 1 of the same stream
# (truncated BPTT, lmtool --carry_over_fast_weight). The medium-transformer-xl memory flows the same way.
# Criterion lm_loss (the adaptive softmax's NLL; unlike adaptive_loss it keeps the pad-index token of tail clusters).
#
# Evaluation protocols (PROTOCOL; default sliding for the limited-context models, stream for carry-over and TXL):
#   sliding    the paper's eval_sliding_window.py (spec §4): windows of L = T tokens, stride 1, batch 1, each window
#              from zero fast weights: fairseq-eval-lm --task language_modeling --sample-break-mode none
#              --tokens-per-sample L --context-window L-1 (fairseq then cuts blocks of L - (L-1) = 1 target token
#              and LMContextWindowDataset prepends up to L-1 preceding inputs: one forward of <= L tokens per target,
#              only the last position scored). Every target from the L-th token on sees exactly L inputs, as in
#              lmtool. The first window differs: lmtool scores t_1..t_L in one forward of t_0..t_{L-1} (positions
#              L-1..0) and never scores t_0; fairseq scores all N targets, t_0 with input </s> alone and t_j (j < L)
#              with inputs [</s>, t_0 .. t_{j-1}] (one token more, j + 1 inputs at positions j..0, the last input
#              always at position 0). So fairseq scores N targets, lmtool N - 1, and the first L - 1 scored targets
#              see a different context; all later ones are identical. With BATCH > 1 the short windows of the first
#              batch are right-padded to the longest; the model's descending positions run over each row's real
#              tokens, so BATCH changes nothing. Cost: N forwards of L tokens (WikiText-103 test: 245,569 targets).
#   stream     eval.py --carry_over_fast_weight --batch_size 1: --task streaming_lm --batch-size 1
#              --tokens-per-sample L, one cold stream, state carried, every token scored once (O(N)). For a model
#              without carry-over each segment starts fresh: the same numbers as nonoverlap(L).
#   nonoverlap fairseq's default: consecutive blocks of L tokens scored independently (--context-window 0).
# A carry-over model evaluated with sliding or nonoverlap runs without carry-over (--model-overrides
# "{'carry_over_fast_weight': False}": each window from zero fast weights, no positional encoding as trained).
# medium-transformer-xl: stream only (lmtool eval.py, batch 1, T = M = 384, same_length off as trained).
#
# Variables: DATA (data-bin/wikitext-103), SAVE_DIR (checkpoints/fast_weights_CONFIG), NGPU (data-parallel workers;
# default: visible GPUs, else 1 -- must divide the global batch), ARCH (the config's preset; another arch drops the
# medium-transformer-xl architecture flags), STEPS (--max-update), TGT_LEN (segment / window length L: the config's
# T), SPLIT (eval: test), PROTOCOL (eval: sliding |
# stream | nonoverlap), BATCH (eval batch of sliding / nonoverlap: 1), DRY_RUN=1 prints the command.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh

# fw_config CONFIG: sets ARCH_DEFAULT ARCH_FLAGS TGT GLOBAL_BATCH WARMUP STEPS_DEFAULT VALID_BATCH CARRY (1: state
#                    carried across segments) PROTOCOLS (the first is the default)
fw_config() {
  ARCH_FLAGS=(); VALID_BATCH=10; WARMUP=2000; CARRY=0; PROTOCOLS=(sliding stream nonoverlap)
  case "$1" in
    small-transformer|small-fwm|small-fwm-carry-over)  # small_*.sh: d 128, 8 x 16, T 256, batch 96, 500k
      TGT=256; GLOBAL_BATCH=96; STEPS_DEFAULT=500000 ;;
    medium-transformer|medium-fwm|medium-fwm-carry-over)  # medium_*.sh: d 256, 8 x 32, T 384, batch 56, 400k
      TGT=384; GLOBAL_BATCH=56; STEPS_DEFAULT=400000 ;;
    medium-transformer-xl)  # medium_transformer-xl_baseline.sh: attn_type 0, mem 384, warmup 1000, 200k, eval batch 56
      TGT=384; GLOBAL_BATCH=56; STEPS_DEFAULT=200000; WARMUP=1000; VALID_BATCH=56; CARRY=1; PROTOCOLS=(stream)
      ARCH_DEFAULT=transformer_xl_lm
      ARCH_FLAGS=(--decoder-layers 16 --decoder-embed-dim 256 --decoder-attention-heads 8
                  --decoder-attention-head-dim 32 --decoder-ffn-embed-dim 2048 --dropout 0.1 --attention-dropout 0.0
                  --mem-len 384 --adaptive-softmax-cutoff 20000,40000,200000 --adaptive-softmax-factor 1)
      return ;;
    *) die "unknown fast-weights config '$1' (small-transformer small-fwm small-fwm-carry-over medium-transformer medium-fwm medium-fwm-carry-over medium-transformer-xl)" ;;
  esac
  ARCH_DEFAULT=fast_weight_wiki103_${1//-/_}
  case "$1" in *-carry-over) CARRY=1; PROTOCOLS=(stream sliding nonoverlap) ;; esac
}

MODE=${1:?usage: $0 train|eval CONFIG ...}
CONFIG=${2:?usage: $0 train|eval CONFIG ...}
shift 2
fw_config "$CONFIG"
TGT=${TGT_LEN:-$TGT}
[[ "$TGT" =~ ^[1-9][0-9]*$ ]] || die "TGT_LEN must be a positive integer, got '$TGT'"
DATA=${DATA:-data-bin/wikitext-103}

case "$MODE" in
  train)
    split_global_batch "$GLOBAL_BATCH"
    ARCH=${ARCH:-$ARCH_DEFAULT}
    [ "$ARCH" = "$ARCH_DEFAULT" ] || ARCH_FLAGS=()
    STEPS=${STEPS:-$STEPS_DEFAULT}
    SAVE_DIR=${SAVE_DIR:-checkpoints/fast_weights_$CONFIG}
    cmd=("${FAIRSEQ_TRAIN:-$(tool fairseq-train)}" "$DATA" --user-dir fairseq_ext --task streaming_lm --arch "$ARCH"
      "${ARCH_FLAGS[@]}" --criterion lm_loss --optimizer adam --adam-betas "(0.9, 0.999)" --adam-eps 1e-08
      --weight-decay 0 --lr 0.00025 --clip-norm 0.25 --lr-scheduler cosine_warmup_xl --cosine-period total
      --warmup-updates "$WARMUP" --min-lr 0 --max-update "$STEPS" --tokens-per-sample "$TGT"
      --batch-size "$WORKER_BATCH" --batch-size-valid "$VALID_BATCH" --distributed-world-size "$NGPU" --seed 1111
      --validate-interval-updates 4000 --save-interval-updates 4000 --keep-interval-updates 2 --no-epoch-checkpoints
      --log-interval 200 --save-dir "$SAVE_DIR" "$@")
    if [ "${DRY_RUN:-0}" != 1 ]; then
      require_data "$DATA" "run bash scripts/prepare-wikitext-103.sh first or set DATA"
      echo "recipe: $CONFIG ($ARCH), global batch $GLOBAL_BATCH = $NGPU workers x $WORKER_BATCH streams, T=$TGT," \
        "$([ "$CARRY" = 1 ] && echo "state carried across segments" || echo "every segment from a fresh state")"
    fi
    run_or_print "${cmd[@]}" ;;
  eval)
    CKPT=${1:?usage: $0 eval CONFIG CHECKPOINT [fairseq-eval-lm flags...]}
    shift
    PROTOCOL=${PROTOCOL:-${PROTOCOLS[0]}}
    [[ " ${PROTOCOLS[*]} " == *" $PROTOCOL "* ]] || die "PROTOCOL must be one of: ${PROTOCOLS[*]} (config $CONFIG), got '$PROTOCOL'"
    SPLIT=${SPLIT:-test}
    BATCH=${BATCH:-1}
    EVAL_LM=${FAIRSEQ_EVAL_LM:-$(tool fairseq-eval-lm)}
    OVERRIDES=()  # carry-over models scored window by window run without carry-over
    [ "$CARRY" = 1 ] && [ "$PROTOCOL" != stream ] && OVERRIDES=(--model-overrides "{'carry_over_fast_weight': False}")
    case "$PROTOCOL" in
      sliding)
        LABEL="sliding(L=$TGT,S=1), batch $BATCH, every window from a fresh state; the first L-1 targets differ from lmtool's first window (scripts/lib/fast-weights.sh)"
        cmd=("$EVAL_LM" "$DATA" --user-dir fairseq_ext --task language_modeling --path "$CKPT" --gen-subset "$SPLIT"
          --sample-break-mode none --tokens-per-sample "$TGT" --context-window $((TGT - 1)) --batch-size "$BATCH"
          --max-tokens $((TGT * BATCH)) --num-workers 0 "${OVERRIDES[@]}" "$@") ;;
      nonoverlap)
        LABEL="nonoverlap(L=$TGT), batch $BATCH"
        cmd=("$EVAL_LM" "$DATA" --user-dir fairseq_ext --task language_modeling --path "$CKPT" --gen-subset "$SPLIT"
          --sample-break-mode none --tokens-per-sample "$TGT" --context-window 0 --batch-size "$BATCH"
          --max-tokens $((TGT * BATCH)) "${OVERRIDES[@]}" "$@") ;;
      stream)
        LABEL="stream(B=1, T=$TGT, cold), $([ "$CARRY" = 1 ] && echo "state carried across segments" || echo "no state carried: equals nonoverlap(L=$TGT)")"
        cmd=("$EVAL_LM" "$DATA" --user-dir fairseq_ext --task streaming_lm --path "$CKPT" --gen-subset "$SPLIT"
          --batch-size 1 --tokens-per-sample "$TGT" --eval-warmup-tokens 0 "$@") ;;
    esac
    [ "${DRY_RUN:-0}" = 1 ] || echo "protocol: $LABEL, split $SPLIT"
    run_or_print "${cmd[@]}" ;;
  *) die "usage: $0 train|eval CONFIG ..." ;;
esac
