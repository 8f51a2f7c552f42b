#!/usr/bin/env bash
# Create .venv (if missing) and install the project's stack into it. Idempotent: each step is skipped when its
# result is already importable, so re-running does not reinstall anything.
# Stack (README.md, "Two commands"; docs/design.md): torch==2.13.0 (CPU wheel), fairseq-fixed==0.12.3.1 built with --no-deps
# --no-build-isolation after its runtime deps (never torchaudio), sentencepiece, tensorboardX.
# numpy<2: fairseq-fixed 0.12.3.1 calls np.compat.long (gone since numpy 2.0) in TokenBlockDataset's "eos" break
# mode, i.e. --sample-break-mode eos and every LM inference dataset (fairseq-interactive / fairseq-generate).
# matplotlib (Agg backend) for scripts/plot_spans.py: none of its dependencies is torch; installed with numpy<2
# so that pip never upgrades numpy.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
fi
if ! "$PY" -c "import torch, numpy, hydra, omegaconf, sentencepiece, tensorboardX, pytest, Cython, sklearn, sacrebleu, bitarray; numpy.compat.long" 2>/dev/null \
   || [ "$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')" != "2.13.0" ]; then
  "$PY" -m pip install -q torch==2.13.0 "setuptools>=77" wheel cython "numpy<2" cffi hydra-core==1.3.2 omegaconf==2.3.0 \
    regex sacrebleu tqdm bitarray packaging scikit-learn sentencepiece tensorboardX pytest
fi
if ! "$PY" -c "import matplotlib" 2>/dev/null; then
  "$PY" -m pip install -q "matplotlib>=3.7" "numpy<2"
fi
# fla-core (MIT, pure Python; its Triton kernels need CUDA): the optional --attn-impl fla path of the delta rule. Its
# reference recurrence is what tests/ops/fast_weights/test_fla.py checks our conventions against on CPU; --no-deps so
# that pip never resolves torch or triton (einops is its one import outside torch).
if ! "$PY" -c "import importlib.util as u, einops; assert u.find_spec('fla')" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps fla-core==0.6.0 einops
fi
if ! "$PY" -c "import fairseq, fairseq.data.data_utils_fast" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation fairseq-fixed==0.12.3.1
fi
if ! (cd / && "$OLDPWD/$PY" -c "import fairseq_ext" 2>/dev/null); then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
