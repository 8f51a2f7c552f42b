"""Helpers shared by the benchmark scripts (scripts/bench_*.py): dtypes, device/memory descriptions, out-of-memory
detection, GPU synchronisation and the CPU peak-memory measurement.

CPU peak memory is the maximum of live tensor bytes in PyTorch's CPU allocator, replayed from ``torch.profiler``
(``profile_memory=True``) allocation/free events -- the CPU analogue of ``torch.cuda.max_memory_allocated``.
"""
import platform
from typing import Dict

import torch

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or any(m in str(exc).lower() for m in OOM_MARKERS)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda), {torch.get_num_threads()} CPU threads"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def memory_description(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated over the warm-up steps"
    return ("max live tensor bytes in PyTorch's CPU allocator over the warm-up steps "
            "(torch.profiler profile_memory alloc/free replay)")


def cpu_peak_bytes(prof: torch.profiler.profile, window: str) -> int:
    """Replay the profiler's allocation (+bytes) / free (-bytes) events in time order and return the maximum of live
    bytes reached inside the ``record_function(window)`` range (live bytes count everything allocated since the
    profiler started: weights, optimizer state, memories, activations)."""
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    spans = [(e.start_ns(), e.end_ns()) for e in events if e.name() == window]
    if not spans:
        raise RuntimeError(f"profiler recorded no {window!r} range")
    start, end = spans[0]
    live, peak = 0, 0
    for e in events:
        if e.name() != "[memory]":
            continue
        live += e.nbytes()
        if start <= e.start_ns() <= end:
            peak = max(peak, live)
    return peak
