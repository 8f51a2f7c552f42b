#!/usr/bin/env python
"""Fast-weight (delta rule) cost: the token recurrence vs the chunkwise-parallel form vs causal softmax attention,
at the lmtool small config's head sizes, plus decoding at a 16k context.

Schlag, Irie, Schmidhuber 2021 (arXiv 2102.11174), spec fast_weights.md §1.4 (the delta rule with sum-normalised
ELU+1 keys), §5.1-§5.2 (chunkwise UT/WY form), §5.4 (complexity: recurrence O(T·K·V) work with depth T, chunked
O(T·(C·(3K+2V) + C²/3 + 3KV)) with depth T/C, softmax O(T²·d); decode O(K·V) per token and constant state vs a KV cache
growing O(T·d)). Ops level, one attention layer's heads:

* ``recurrent`` -- ``ops.fast_weights.delta_rule_recurrent`` (the token loop, lmtool's CUDA kernel's algorithm);
* ``chunked``   -- ``ops.fast_weights.delta_rule_chunked`` (chunk C = ``--chunk-size``);
* ``fla``       -- flash-linear-attention's Triton ``chunk_delta_rule`` through ``ops.fast_weights.fla`` (CUDA,
  bf16 inputs; not in the default ``--impls``);
* ``softmax``   -- ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` on the same q, k, v sizes.

Inputs: B × H heads × T tokens, d = D_φ = 16 (ELU+1), q and k sum-normalised (φ(x)/Σφ(x)), β = sigmoid(N(0, 1)),
v ~ N(0, 1), scale 1/√d; the feature map is applied outside the timed region. A training step is forward + backward
(a fixed random output gradient) w.r.t. q, k, v (and β); time = fastest of ``--steps`` after ``--warmup`` steps
(median printed too), tokens/s = B·T / step. Peak memory over the warm-up steps: ``torch.cuda.max_memory_allocated``
on CUDA, on CPU the maximum of live tensor bytes in PyTorch's CPU allocator (``torch.profiler`` replay), each row in a
fresh subprocess unless ``--in-process``. The recurrence's cost is linear in T, so above ``--recurrent-max-len`` it
is run at that length and its time and memory are scaled by T / length: those cells are marked ``≈`` and the row
says so. A row that exceeds ``--timeout`` prints ``skipped (>N s)``.

Decode table: one new token per step at a context of ``--decode-context`` tokens: the fast-weight update + read of
the recurrence (state (B, H, D_φ, d), constant in the context) vs SDPA of one query over a KV cache of that length
(q (B, H, 1, d), K, V (B, H, S, d)); tokens/s = B / step, no gradient. State and cache bytes per layer are printed.

    python scripts/bench_fast_weights.py             # CPU defaults: B 1 and 4, T 256 .. 16384, decode at 16k
    python scripts/bench_fast_weights.py --quick     # tiny sizes (the test)
    python scripts/bench_fast_weights.py --device cuda --batch-sizes 1,4,16
"""

import argparse
import os
import statistics
import sys
from argparse import Namespace
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run as `python scripts/bench_fast_weights.py` from a checkout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/benchlib.py
from benchlib import (DTYPES, Result, add_run_arguments, apply_run_arguments, bench_main, measure,  # noqa: E402
                      memory_description, run_header, run_worker, speed, timed, warm_up_peak)
from fairseq_ext.ops.fast_weights import delta_rule_chunked, delta_rule_recurrent  # noqa: E402
from fairseq_ext.ops.fast_weights.fla import delta_rule_fla  # noqa: E402

IMPLS = ("recurrent", "chunked", "fla", "softmax")
DEFAULT_IMPLS = ("recurrent", "chunked", "softmax")  # fla: flash-linear-attention's Triton kernel, CUDA only
DECODE_IMPLS = ("fast-weight", "softmax-kv-cache")
HEADS, HEAD_DIM = 8, 16  # lmtool small: 8 heads of d = 16, ELU+1 keeps D_phi = d
QUICK = dict(batch_sizes=[1, 2], lengths=[16, 64], steps=1, warmup=1, decode_context=128, decode_steps=3,
             recurrent_max_len=32)
NORMAL = dict(batch_sizes=[1, 4], lengths=[256, 1024, 4096, 16384], steps=3, warmup=1, decode_context=16384,
              decode_steps=50, recurrent_max_len=1024)
RESULT_PREFIX = "BENCH_FW_RESULT "
MEMORY_WINDOW = "bench_fw_warmup"


# ====================================================================================================================
# Command line
# ====================================================================================================================

def _ints(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(choices: Sequence[str]):
    def parse(text: str) -> List[str]:
        names = text.replace(",", " ").split()
        bad = [n for n in names if n not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return names
    return parse


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch-sizes", type=_ints, default=None, help="B values (default 1,4)")
    p.add_argument("--lengths", type=_ints, default=None, help="T values (default 256,1024,4096,16384)")
    p.add_argument("--impls", type=_names(IMPLS), default=list(DEFAULT_IMPLS),
                   help="training-step rows (fla: fla-core's chunk_delta_rule, needs CUDA and Triton)")
    p.add_argument("--chunk-size", type=int, default=64, help="chunk C of the chunked form")
    p.add_argument("--recurrent-max-len", type=int, default=None,
                   help="longest T the recurrence really runs; longer rows are extrapolated linearly from it "
                        "(default 1024)")
    p.add_argument("--decode-context", type=int, default=None, help="context S of the decode table (default 16384)")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode tokens (default 50)")
    p.add_argument("--no-decode", action="store_true", help="skip the decode table")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps, peak memory measured over them "
                                                            "(default 1)")
    add_run_arguments(p, {k: QUICK[k] for k in ("batch_sizes", "lengths", "decode_context")},
                      "fp32, or autocast to bf16/fp16 (the fast-weight state stays fp32)")
    return p


def parse_bench_args(argv: Optional[Sequence[str]] = None) -> Namespace:
    opts = build_arg_parser().parse_args(argv)
    apply_run_arguments(opts)
    for name, value in (QUICK if opts.quick else NORMAL).items():
        if getattr(opts, name, None) is None:
            setattr(opts, name, value)
    if min(opts.steps, opts.warmup, opts.chunk_size, opts.recurrent_max_len, opts.decode_context,
           opts.decode_steps) < 1:
        raise SystemExit("--steps, --warmup, --chunk-size, --recurrent-max-len, --decode-context and "
                         "--decode-steps must be >= 1")
    return opts


# ====================================================================================================================
# Inputs and steps
# ====================================================================================================================

@dataclass
class Inputs:
    q: Tensor  # (B, H, T, d) phi'(q), leaf
    k: Tensor  # (B, H, T, d) phi'(k), leaf
    v: Tensor  # (B, H, T, d) leaf
    beta: Tensor  # (B, H, T) leaf
    grad: Tensor  # (B, H, T, d) output gradient


def sum_normalised_elu(x: Tensor) -> Tensor:
    """phi'(x) = (elu(x) + 1) / sum_j (elu(x) + 1)_j (the delta rule's keys and queries, spec §1.4)."""
    phi = F.elu(x) + 1
    return phi / phi.sum(-1, keepdim=True)


def make_inputs(batch: int, length: int, device: torch.device, seed: int, grad: bool = True) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, HEADS, length, HEAD_DIM)

    def leaf(x: Tensor) -> Tensor:
        return x.to(device).requires_grad_(grad)

    return Inputs(leaf(sum_normalised_elu(torch.randn(shape, generator=gen))),
                  leaf(sum_normalised_elu(torch.randn(shape, generator=gen))), leaf(torch.randn(shape, generator=gen)),
                  leaf(torch.sigmoid(torch.randn(shape[:3], generator=gen))), torch.randn(shape, generator=gen).to(device))


def forward(impl: str, x: Inputs, chunk_size: int) -> Tensor:
    scale = HEAD_DIM ** -0.5
    if impl == "recurrent":
        return delta_rule_recurrent(x.q, x.k, x.v, x.beta, None, scale)[0]
    if impl == "chunked":
        return delta_rule_chunked(x.q, x.k, x.v, x.beta, None, scale, chunk_size)[0]
    if impl == "fla":
        return delta_rule_fla(x.q, x.k, x.v, x.beta, None, scale)[0]
    return F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=True, scale=scale)


def train_step(impl: str, x: Inputs, chunk_size: int, device: torch.device, dtype: torch.dtype) -> None:
    """Forward + backward w.r.t. every input; gradients are dropped afterwards."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = forward(impl, x, chunk_size)
    out.backward(x.grad.to(out.dtype))
    for leaf in (x.q, x.k, x.v, x.beta):
        leaf.grad = None


# ====================================================================================================================
# One configuration
# ====================================================================================================================

def run_train(opts: Namespace, impl: str, batch: int, length: int) -> Result:
    """Step time and peak memory of one (impl, B, T); the recurrence beyond --recurrent-max-len is extrapolated."""
    device, dtype = torch.device(opts.device), DTYPES[opts.dtype]
    ran = min(length, opts.recurrent_max_len) if impl == "recurrent" else length
    factor = length / ran
    result: Result = {"table": "train", "impl": impl, "batch": batch, "length": length, "ran_length": ran}

    def run() -> Result:
        inputs, peak = warm_up_peak(device, lambda: make_inputs(batch, ran, device, opts.seed),
                                    lambda x: train_step(impl, x, opts.chunk_size, device, dtype), opts.warmup,
                                    MEMORY_WINDOW)
        times = [t * factor for t in timed(lambda: train_step(impl, inputs, opts.chunk_size, device, dtype),
                                           opts.steps, device)]
        return dict(**speed(batch * length, times), peak_mb=peak * factor / 2 ** 20, extrapolated=factor != 1)

    return measure(result, opts.device, run)


def run_decode(opts: Namespace, impl: str, batch: int) -> Result:
    """Tokens/s of one decode step at context S: the fast-weight state update + read, or SDPA over a KV cache."""
    device, context = torch.device(opts.device), opts.decode_context
    result: Result = {"table": "decode", "impl": impl, "batch": batch, "length": context}
    scale = HEAD_DIM ** -0.5

    def run() -> Result:
        gen = torch.Generator().manual_seed(opts.seed)
        one = (batch, HEADS, 1, HEAD_DIM)
        q, k = (sum_normalised_elu(torch.randn(one, generator=gen)).to(device) for _ in range(2))
        v, beta = torch.randn(one, generator=gen).to(device), torch.rand(one[:3], generator=gen).to(device)
        if impl == "fast-weight":  # the state after S tokens has the same size as after one
            state = (0.1 * torch.randn(batch, HEADS, HEAD_DIM, HEAD_DIM, generator=gen)).to(device)
            held = state.numel() * state.element_size()

            def step() -> None:
                delta_rule_recurrent(q, k, v, beta, state, scale)
        else:
            cache_k, cache_v = (torch.randn(batch, HEADS, context, HEAD_DIM, generator=gen).to(device)
                                for _ in range(2))
            held = 2 * cache_k.numel() * cache_k.element_size()

            def step() -> None:
                F.scaled_dot_product_attention(q, cache_k, cache_v, scale=scale)

        with torch.no_grad():
            for _ in range(opts.warmup):
                step()
            times = timed(step, opts.decode_steps, device)
        return dict(tokens_per_s=batch / min(times), median_tokens_per_s=batch / statistics.median(times),
                    step_ms=1000 * min(times), median_step_ms=1000 * statistics.median(times),
                    held_kib=held / 2 ** 10)

    return measure(result, opts.device, run)


# ====================================================================================================================
# Driver
# ====================================================================================================================

def iter_configs(opts: Namespace) -> Iterator[str]:
    """Worker specs ``train|IMPL|B|T`` and ``decode|IMPL|B``."""
    for batch in opts.batch_sizes:
        for length in opts.lengths:
            for impl in opts.impls:
                yield f"train|{impl}|{batch}|{length}"
    if not opts.no_decode:
        for batch in opts.batch_sizes:
            for impl in DECODE_IMPLS:
                yield f"decode|{impl}|{batch}"


def parse_spec(spec: str) -> Tuple[str, str, int, int]:
    parts = spec.split("|")
    return parts[0], parts[1], int(parts[2]), int(parts[3]) if len(parts) > 3 else 0


def run_spec(opts: Namespace, spec: str) -> Result:
    table, impl, batch, length = parse_spec(spec)
    return run_train(opts, impl, batch, length) if table == "train" else run_decode(opts, impl, batch)


def run_isolated(argv: Sequence[str], spec: str, timeout: Optional[float]) -> Result:
    table, impl, batch, length = parse_spec(spec)
    base = {"table": table, "impl": impl, "batch": batch, "length": length, "timeout": timeout}
    return run_worker(__file__, argv, spec, base, RESULT_PREFIX, timeout, spec)


# ====================================================================================================================
# Report
# ====================================================================================================================

def status_cell(r: Result) -> str:
    if r["status"] == "TIMEOUT":
        return f"skipped (>{r.get('timeout') or 0:g} s)"
    return r["status"]


def table_rows(results: Sequence[Result], table: str, head: Callable[[Result], str],
               cells: Callable[[Result], str], columns: int) -> List[str]:
    """The markdown rows of ``table``: ``head`` cells, then ``cells`` (ok rows) or the status and dashes."""
    return [f"| {head(r)} | {cells(r) if r['status'] == 'ok' else status_cell(r) + ' |' + ' - |' * (columns - 1)}"
            for r in results if r["table"] == table]


def train_rows(results: Sequence[Result]) -> List[str]:
    def cells(r: Result) -> str:
        mark = "≈ " if r["extrapolated"] else ""
        chunked = next((x for x in results if x["table"] == "train" and x["impl"] == "chunked"
                        and x["batch"] == r["batch"] and x["length"] == r["length"] and x.get("status") == "ok"),
                       None)
        ratio = f"{r['step_ms'] / chunked['step_ms']:.2f}×" if chunked is not None else "n/a"
        note = f" (extrapolated ×{r['length'] / r['ran_length']:g} from T = {r['ran_length']:,})" if (
            r["extrapolated"]) else ""
        return (f"{mark}{r['step_ms']:,.1f}{note} | {mark}{r['median_step_ms']:,.1f} | {mark}{r['tokens_per_s']:,.0f} "
                f"| {ratio} | {mark}{r['peak_mb']:,.1f} |")

    return table_rows(results, "train", lambda r: f"{r['batch']} | {r['length']:,} | {r['impl']}", cells, 5)


def decode_rows(results: Sequence[Result]) -> List[str]:
    def cells(r: Result) -> str:
        return (f"{1000 * r['step_ms']:,.1f} | {r['tokens_per_s']:,.0f} | {r['median_tokens_per_s']:,.0f} | "
                f"{r['held_kib']:,.1f} |")

    return table_rows(results, "decode", lambda r: f"{r['batch']} | {r['impl']}", cells, 4)


def render_report(opts: Namespace, results: Sequence[Result], command: str,
                  load: Tuple[float, float] = (float("nan"), float("nan"))) -> str:
    device = torch.device(opts.device)
    lines = [
        "## Fast-weight (delta rule) benchmark",
        "",
        *run_header(command, device, opts.dtype, load,
                    "in-process" if opts.in_process else "one fresh subprocess per row", "; rerun on an idle host",
                    precision="autocast"),
        f"- one layer's attention: H {HEADS} heads, d = D_φ = {HEAD_DIM} (ELU+1, q and k sum-normalised), β = "
        f"sigmoid(N(0, 1)); step = forward + backward w.r.t. q, k, v (, β); chunk C = {opts.chunk_size}; "
        f"{opts.warmup} warm-up and {opts.steps} timed steps, time = fastest (median beside it)",
        f"- peak memory: {memory_description(device)} (inputs and their gradients included)",
        f"- `≈`: the recurrence ran at T = {opts.recurrent_max_len:,} and its time and memory are scaled linearly "
        f"to T (its cost is exactly linear in T); `vs chunked` = step time / the chunked form's at the same B, T",
        "",
        "### Training step (forward + backward)",
        "",
        "| B | T | impl | step ms (fastest) | step ms (median) | tokens/s | vs chunked | peak memory (MB) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
        *train_rows(results),
    ]
    if not opts.no_decode:
        lines += [
            "",
            f"### Decode: one token at a context of {opts.decode_context:,} ({opts.decode_steps} timed tokens, no "
            f"gradient)",
            "",
            "fast-weight: the recurrence's update + read of the state (B, H, D_φ, d), constant in the context; "
            "softmax-kv-cache: SDPA of one query over K, V (B, H, S, d). Held = state or cache bytes per layer.",
            "",
            "| B | impl | µs / step (fastest) | tokens/s (fastest) | tokens/s (median) | held per layer (KiB) |",
            "|---:|---|---:|---:|---:|---:|",
            *decode_rows(results),
        ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    return bench_main(__file__, argv, parse_bench_args, RESULT_PREFIX, iter_configs, run_spec, run_isolated,
                      render_report)


if __name__ == "__main__":
    sys.exit(main())
