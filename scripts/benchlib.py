"""Helpers shared by the benchmark scripts (scripts/bench_*.py): dtypes, device/memory descriptions, out-of-memory
detection, GPU synchronisation, the CPU peak-memory measurements (allocator replay, process peak RSS), step timing,
and building configs the way ``fairseq-train`` does (a ``dict.txt`` of a given size, fairseq's training parser).

CPU peak memory is the maximum of live tensor bytes in PyTorch's CPU allocator, replayed from ``torch.profiler``
(``profile_memory=True``) allocation/free events -- the CPU analogue of ``torch.cuda.max_memory_allocated``.
"""
import os
import platform
import resource
import time
import warnings
from typing import Any, Callable, Dict, List, Sequence

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


RSS_DESCRIPTION = ("peak resident set size of the whole worker process (resource.getrusage ru_maxrss: Python, "
                   "torch and fairseq libraries, model, optimizer state, activations, allocator caches)")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if platform.system() == "Darwin" else int(rss) * 1024


def timed(fn: Callable[[], Any], steps: int, device: torch.device) -> List[float]:
    """Seconds of each of ``steps`` calls of fn, synchronised on GPU."""
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def write_dictionary(data_dir: str, vocab: int) -> None:
    """dict.txt with vocab - 4 types (fairseq adds the 4 specials), counts descending like a real dictionary."""
    if vocab < 5:
        raise ValueError(f"--vocab must be >= 5 (4 specials + 1 word), got {vocab}")
    with open(os.path.join(data_dir, "dict.txt"), "w") as f:
        f.writelines(f"w{i} {vocab - i}\n" for i in range(vocab - 4))


def fairseq_config(flags: Sequence[str]) -> Any:
    """The structured config (omegaconf DictConfig) ``fairseq-train`` runs with for these flags, arch preset
    applied; fairseq_ext must already be imported (it registers the models, tasks and criterions)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(), input_args=list(flags))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # hydra's deprecation notices
        return convert_namespace_to_omegaconf(args)
