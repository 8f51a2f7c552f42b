#!/usr/bin/env bash
# The GPU check of every family in bf16 on one GPU, as one prepared script (docs/benchmarks.md, "On a GPU"):
#   1. the device's measured dense bf16 matmul peak (scripts/matmul_peak.py), the denominator of MFU;
#   2. each family at its paper's base configuration through scripts/bench.py (fairseq's Trainer with --bf16):
#      training tokens/s, MFU (6N), peak memory, streaming evaluation tokens/s:
#        ALiBi wiki103 (L 512, 9,216 tokens per step; sdpa, blocked (auto on CPU: decides CUDA's auto), and
#        flash-attn's alibi_slopes where flash-attn imports)
#        beside stock transformer_lm_wiki103 (target >= 0.95x, >= 45% MFU),
#        Transformer-XL NVIDIA base (B 32 x 192, M 192; NVIDIA: 59,961 tokens/s on one A100 with AMP),
#        SHA-RNN enwik8 (B 16 x 1024, LAMB);
#   3. adaptive span large with spans pinned small .. large and the fixed span (scripts/bench_adaptive_span.py:
#      tokens/s should rise as the span falls), and the delta rule's kernels at T = 4096: ours, fla's Triton
#      kernel (target: ours >= 0.8x fla) and softmax SDPA (scripts/bench_fast_weights.py);
#   4. the GPU tests: tests/gpu (bf16 fast paths, the blocked ALiBi kernel, the Python API on CUDA) and
#      tests/models/test_compile.py.
# Everything lands in OUT (default bench-out/gpu): peak.json, one directory or .md per bench, tests.txt.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash scripts/bench_gpu.sh [--dry-run] [--out DIR] [--steps N]
  --dry-run   print every command (shell-quoted) without running it; needs no GPU
  --out DIR   where results go (default bench-out/gpu)
  --steps N   timed training steps per row (default 10)
Environment: PYTHON (default: python3, the GPU machine's interpreter; here e.g. PYTHON=.venv/bin/python).
EOF
}

DRY=0
OUT=bench-out/gpu
STEPS=10
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --steps) STEPS="$2"; shift ;;
    *) echo "bench_gpu.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."

run() {  # print the command, shell-quoted; run it unless --dry-run; a failing step does not stop the others
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $DRY == 0 ]]; then "$@" || echo "bench_gpu.sh: exit $? from: $*" >&2; fi
}

run_to() {  # run_to FILE COMMAND...: run, its output also written to FILE
  local file="$1"; shift
  printf '+'; printf ' %q' "$@"; printf ' > %q\n' "$file"
  if [[ $DRY == 0 ]]; then "$@" 2>&1 | tee "$file" || echo "bench_gpu.sh: exit $? from: $*" >&2; fi
}

if [[ $DRY == 0 ]]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench_gpu.sh needs CUDA (try --dry-run)')"
  mkdir -p "$OUT"
fi

run "$PY" scripts/matmul_peak.py --device cuda --dtype bf16 --json "$OUT/peak.json"
PEAK=1  # a placeholder in --dry-run
if [[ $DRY == 0 ]]; then PEAK=$("$PY" -c "import json; print(json.load(open('$OUT/peak.json'))['tflops'])"); fi

COMMON=(--device cuda --dtype bf16 --peak-tflops "$PEAK" --metrics train,stream --steps "$STEPS" --warmup 3
        --repeats 2 --timeout 600)
run "$PY" scripts/bench.py "${COMMON[@]}" --models none --model "alibi=--arch alibi_lm_wiki103" \
  --model "alibi_blocked=--arch alibi_lm_wiki103 --attn-impl blocked" \
  --model "alibi_flash=--arch alibi_lm_wiki103 --attn-impl flash" \
  --model "sinusoidal=--arch transformer_lm_wiki103" --lengths 512 --tokens-per-batch 9216 --vocab 267744 \
  --out "$OUT/alibi"
run "$PY" scripts/bench.py "${COMMON[@]}" --models none \
  --model "transformer_xl=--arch transformer_xl_wiki103_nvidia_base --mem-len 192" --lengths 192 --batch-size 32 \
  --vocab 267735 --out "$OUT/transformer_xl"
run "$PY" scripts/bench.py "${COMMON[@]}" --models none --model "sha_rnn=--arch sha_rnn_enwik8 --optimizer lamb_torch \
--lr 2e-3 --min-trust 0.25 --trust-denominator update_norm --weight-decay 1.2e-6 --clip-norm 0.25" --lengths 1024 \
  --batch-size 16 --vocab 205 --out "$OUT/sha_rnn"
run_to "$OUT/adaptive_span.md" "$PY" scripts/bench_adaptive_span.py --device cuda --dtype bf16 \
  --preset adaptive_span_enwik8_large --batch-size 8 --configs small,z=0.0625,z=0.25,large,fixed --tables main \
  --steps "$STEPS" --timeout 600
run_to "$OUT/fast_weights.md" "$PY" scripts/bench_fast_weights.py --device cuda --dtype bf16 --batch-sizes 8 \
  --lengths 1024,4096 --impls recurrent,chunked,fla,softmax --steps "$STEPS" --timeout 600
run_to "$OUT/tests.txt" "$PY" -m pytest tests/gpu tests/models/test_compile.py -q -p no:cacheprovider
