#!/usr/bin/env python
"""The device's measured dense matmul throughput: the denominator of model FLOPs utilisation (MFU).

Times ``torch.matmul`` of two N x N matrices (bf16 on CUDA by default) and reports the best of ``--repeats``
rounds of ``--iters`` products as TFLOP/s (2 N^3 FLOPs per product). The datasheet peak is not what a kernel can
reach; this is the reachable peak, so MFU = achieved / measured stays comparable across machines.

    python scripts/matmul_peak.py                         # cuda if available: bf16, N 8192
    python scripts/matmul_peak.py --device cpu --dtype fp32 --size 1024 --json peak.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/benchlib.py
from benchlib import DTYPES, Result, device_description, synchronize  # noqa: E402


def measure_peak(device: torch.device, dtype: torch.dtype, size: int, iters: int, repeats: int) -> Result:
    """TFLOP/s of the best round of ``iters`` (size x size) @ (size x size) products, after one warm-up round."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)  # (N, N)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)  # (N, N)
    best = float("inf")
    for round_ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b)
        synchronize(device)
        if round_:  # round 0 warms up (kernel selection, clocks)
            best = min(best, time.perf_counter() - start)
    tflops = 2 * size ** 3 * iters / best / 1e12
    return {"device": device_description(device), "dtype": str(dtype).removeprefix("torch."), "size": size,
            "iters": iters, "repeats": repeats, "tflops": tflops}


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--size", type=int, default=None, help="N (default: 8192 on cuda, 1024 on cpu)")
    p.add_argument("--iters", type=int, default=20, help="products per round")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (the best counts)")
    p.add_argument("--json", default=None, help="also write the result here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_arg_parser().parse_args(argv)
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = opts.dtype or ("bf16" if device == "cuda" else "fp32")
    size = opts.size or (8192 if device == "cuda" else 1024)
    if min(size, opts.iters, opts.repeats) < 1:
        raise SystemExit("--size, --iters and --repeats must be >= 1")
    result = measure_peak(torch.device(device), DTYPES[dtype], size, opts.iters, opts.repeats)
    print(f"{result['device']}, {dtype}, {size} x {size} matmul: {result['tflops']:.1f} TFLOP/s")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
