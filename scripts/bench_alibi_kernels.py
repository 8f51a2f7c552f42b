#!/usr/bin/env python
"""The ALiBi attention op alone: milliseconds per call of each kernel, forward + backward and forward without
gradients, by sequence length (``fairseq_ext/ops/alibi``; Press et al. 2021, Sec. 3).

Rows per T (B = max(1, ``--tokens`` // T) sequences, H heads of dimension D, random q, k, v, causal, no padding):

* ``sdpa``            -- the full (1, H, T, T) bias through ``scaled_dot_product_attention``;
* ``blocked (r)``     -- causal query blocks of r rows over the keys up to each block, biases viewed from one strip
                         (``--rows``: ``auto`` = ``block_rows(T, H, T)``, the kernel's default, and fixed sizes);
* ``chunked``         -- query chunks of the bias budget's rows, keys cut at 512-key tiles (evaluation's kernel on
                         CUDA or with ``--alibi-chunk-size``);
* ``causal, no bias`` -- ``is_causal=True`` without any bias: what the attention costs without ALiBi (a bound).

Each cell is the fastest of ``--repeats`` calls after one warm-up call; the bias (or strip) is built inside every
call, as a decoder builds it once per forward. ``vs sdpa`` divides sdpa's time by the row's.

    python scripts/bench_alibi_kernels.py                      # T = 512 .. 4096, 4,096 tokens, H 4, D 64, CPU
    python scripts/bench_alibi_kernels.py --quick              # tiny sizes (the test)
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(SCRIPTS))  # the repository root: fairseq_ext
sys.path.insert(0, SCRIPTS)
from benchlib import (DTYPES, apply_run_arguments, bench_command, device_description, resolve_defaults,  # noqa: E402
                      timed)
from fairseq_ext.ops.alibi import alibi_attention, alibi_slopes, block_rows  # noqa: E402
from fairseq_ext.ops.alibi.blocked import alibi_attention_blocked  # noqa: E402

QUICK = dict(seq_lens="64,96", tokens=192, heads=2, head_dim=8, rows="auto,32", repeats=1)
NORMAL = dict(seq_lens="512,1024,2048,4096", tokens=4096, heads=4, head_dim=64, rows="auto,128,256,512", repeats=3)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seq-lens", default=None, help=f"sequence lengths T (default {NORMAL['seq_lens']})")
    p.add_argument("--tokens", type=int, default=None, help=f"B = max(1, tokens // T) (default {NORMAL['tokens']})")
    p.add_argument("--heads", type=int, default=None, help=f"H (default {NORMAL['heads']})")
    p.add_argument("--head-dim", type=int, default=None, help=f"D (default {NORMAL['head_dim']})")
    p.add_argument("--rows", default=None, help=f"blocked kernel's rows per block: 'auto' and/or numbers "
                                                f"(default {NORMAL['rows']})")
    p.add_argument("--repeats", type=int, default=None, help=f"timed calls per cell (default {NORMAL['repeats']})")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help=f"tiny sizes for tests: {QUICK}")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    opts = build_arg_parser().parse_args(argv)
    apply_run_arguments(opts)  # --device (cuda if available), --threads
    resolve_defaults(opts, QUICK, NORMAL, cpu={}, cuda={})
    opts.seq_lens = [int(t) for t in str(opts.seq_lens).split(",")]
    opts.rows = [r if r == "auto" else int(r) for r in str(opts.rows).split(",")]
    if min(opts.seq_lens) < 1 or opts.tokens < 1 or opts.heads < 1 or opts.head_dim < 1 or opts.repeats < 1:
        raise SystemExit("--seq-lens, --tokens, --heads, --head-dim and --repeats must be >= 1")
    if any(r != "auto" and r < 1 for r in opts.rows):
        raise SystemExit("--rows: 'auto' or numbers >= 1")
    return opts


def kernels(opts: argparse.Namespace, t: int) -> Dict[str, Callable[..., torch.Tensor]]:
    """Row label -> attention(q, k, v, slopes) for length T."""
    rows = [block_rows(t, opts.heads, t) if r == "auto" else r for r in opts.rows]
    table: Dict[str, Callable[..., torch.Tensor]] = {"sdpa": lambda *a: alibi_attention(*a, impl="sdpa")}
    for label, r in zip(opts.rows, rows):
        name = f"blocked ({r}{', auto' if label == 'auto' else ''})"
        table[name] = lambda *a, _r=r: alibi_attention_blocked(*a, rows=_r)
    table["chunked"] = lambda *a: alibi_attention(*a, impl="chunked")
    table["causal, no bias"] = lambda q, k, v, slopes: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return table


def measure(opts: argparse.Namespace, t: int) -> List[Dict[str, object]]:
    device, dtype = torch.device(opts.device), DTYPES[opts.dtype]
    b = max(1, opts.tokens // t)
    gen = torch.Generator(device="cpu").manual_seed(t)
    q, k, v = (torch.randn(b, opts.heads, t, opts.head_dim, generator=gen).to(device, dtype).requires_grad_()
               for _ in range(3))
    slopes = alibi_slopes(opts.heads).to(device)
    out = []
    for name, fn in kernels(opts, t).items():
        def train() -> None:
            fn(q, k, v, slopes).sum().backward()

        def infer() -> None:
            with torch.no_grad():
                fn(q, k, v, slopes)

        row: Dict[str, object] = {"T": t, "B": b, "kernel": name}
        for key, call in (("train_ms", train), ("eval_ms", infer)):
            call()  # warm-up
            row[key] = 1000 * min(timed(call, opts.repeats, device))
        out.append(row)
    return out


def render(opts: argparse.Namespace, rows: Sequence[Dict[str, object]], command: str) -> str:
    lines = ["## ALiBi attention kernels (one op call)", "",
             f"- command: `{command}`",
             f"- torch {torch.__version__}; device: {device_description(torch.device(opts.device))}; dtype "
             f"{opts.dtype}; H {opts.heads}, D {opts.head_dim}, B = max(1, {opts.tokens} // T); fastest of "
             f"{opts.repeats} call(s) after one warm-up", "",
             "| T | B | kernel | forward + backward ms | vs sdpa | forward, no grad, ms | vs sdpa |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        ref = next(r for r in rows if r["T"] == row["T"] and r["kernel"] == "sdpa")
        lines.append(f"| {row['T']} | {row['B']} | {row['kernel']} | {row['train_ms']:.1f} | "
                     f"{ref['train_ms'] / row['train_ms']:.2f}× | {row['eval_ms']:.1f} | "
                     f"{ref['eval_ms'] / row['eval_ms']:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    rows = [row for t in opts.seq_lens for row in measure(opts, t)]
    print(render(opts, rows, bench_command(__file__, argv)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
