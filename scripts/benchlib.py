"""Helpers shared by the benchmark scripts (scripts/bench_*.py): dtypes, device/memory descriptions, out-of-memory
detection, GPU synchronisation, the peak-memory measurements (CUDA allocator, CPU allocator replay, process peak RSS),
step timing, building configs the way ``fairseq-train`` does (a ``dict.txt`` of a given size, fairseq's training
parser, a language-modelling sample), one configuration per row in a fresh worker subprocess (result line, failure
and out-of-memory statuses), the shared command-line flags and report header lines, the driver ``bench_main``,
and measuring a row trained on carried streams after a fill of its state (``resolve_defaults``,
``add_stream_run_arguments``, ``parse_stream_args``, ``measure_stream_training``). The training step itself is
``benchrow.FairseqRow``: fairseq's ``Trainer``, the one training loop of every bench.

CPU peak memory is the maximum of live tensor bytes in PyTorch's CPU allocator, replayed from ``torch.profiler``
(``profile_memory=True``) allocation/free events -- the CPU analogue of ``torch.cuda.max_memory_allocated``.
"""
import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple,
                    TypeVar)

import torch
from torch import Tensor

if TYPE_CHECKING:
    from benchrow import FairseqRow

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_FLAGS: Dict[str, List[str]] = {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16"]}
OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")
Built = TypeVar("Built")
Result = Dict[str, Any]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(exc: BaseException) -> bool:
    """An allocation failure: torch's, a ``MemoryError`` (a ``std::bad_alloc``, e.g. in the profiler's teardown
    after a failed step) or an error whose text says so."""
    return (isinstance(exc, (torch.OutOfMemoryError, MemoryError))
            or any(m in str(exc).lower() for m in OOM_MARKERS))


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


def dtype_flags(device: str, dtype: str) -> List[str]:
    """fairseq's precision flags for ``dtype``; fp16/bf16 (fairseq's half-precision trainer) need CUDA."""
    if dtype != "fp32" and device == "cpu":
        raise SystemExit(f"--dtype {dtype} runs through fairseq's --{dtype}, which needs --device cuda")
    return list(DTYPE_FLAGS[dtype])


def write_dictionary(data_dir: str, vocab: int) -> None:
    """dict.txt with vocab - 4 types (fairseq adds the 4 specials), counts descending like a real dictionary."""
    if vocab < 5:
        raise ValueError(f"--vocab must be >= 5 (4 specials + 1 word), got {vocab}")
    with open(os.path.join(data_dir, "dict.txt"), "w") as f:
        f.writelines(f"w{i} {vocab - i}\n" for i in range(vocab - 4))


def namespace_config(args: argparse.Namespace) -> Any:
    """The structured config (omegaconf DictConfig) of a parsed ``fairseq-train`` namespace."""
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # hydra's deprecation notices
        return convert_namespace_to_omegaconf(args)


def fairseq_config(flags: Sequence[str]) -> Any:
    """The structured config (omegaconf DictConfig) ``fairseq-train`` runs with for these flags, arch preset
    applied; fairseq_ext must already be imported (it registers the models, tasks and criterions)."""
    from fairseq import options

    return namespace_config(options.parse_args_and_arch(options.get_training_parser(), input_args=list(flags)))


def lm_sample(tokens: Tensor, device: torch.device) -> Result:
    """A language-modelling batch in fairseq's sample format from tokens (B, T + 1): inputs are the first T tokens
    of every row, targets the last T."""
    src, tgt = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
    b, t = src.shape
    return {"id": torch.arange(b, device=device), "nsentences": b, "ntokens": b * t,
            "net_input": {"src_tokens": src, "src_lengths": torch.full((b,), t, dtype=torch.long, device=device)},
            "target": tgt}


# ====================================================================================================================
# Measuring one configuration
# ====================================================================================================================

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
PROFILED_MMAP_THRESHOLD = 1 << 20  # bytes: while profiling, a larger block needing new memory is its own mapping
STEADY_MMAP_THRESHOLD = 32 << 20  # glibc's dynamic threshold ends here (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit) ...
STEADY_TRIM_THRESHOLD = 64 << 20  # ... and its trim threshold at twice that
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc with ``mallopt``, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL("libc.so.6")
    return libc if hasattr(libc, "mallopt") else None


@contextlib.contextmanager
def unfragmented_heap() -> Iterator[None]:
    """Profile CPU memory without letting the profiler fragment glibc's heap.

    After a process frees its first large block, glibc serves every block up to 32 MiB from the heap (its dynamic
    mmap threshold). ``torch.profiler`` records each event in small heap allocations, which land between a step's
    tensors, so a freed tensor's space cannot merge with its neighbours, and a kernel whose blocks grow (ALiBi's
    ``blocked`` query blocks over more and more keys) takes new space each time: one profiled ALiBi step at T = 16k
    reached 17.8 GB resident against 2.4 GB unprofiled (and 1.7 GB of live tensors), so the bench's 20 GB cap
    failed it. Inside this context a block over 1 MiB that needs new memory gets its own mapping, returned when
    freed, instead of growing the heap (free heap space still serves blocks that fit it); on leaving, the
    thresholds are set to the values glibc's dynamic rule settles at (32 / 64 MiB), so the timed steps run as in an
    unprofiled process. A no-op without glibc or when ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` are
    set (the user chose the allocator's behaviour)."""
    libc = glibc()
    if libc is None or any(name in os.environ for name in MALLOC_ENV):
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, PROFILED_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD)


def warm_up_peak(device: torch.device, build: Callable[[], Built], step: Callable[[Built], None], steps: int,
                 window: str) -> Tuple[Built, int]:
    """``build()``, then ``steps`` warm-up calls of ``step`` on what it built; returns that and the peak memory
    (bytes) of the warm-up steps: ``torch.cuda.max_memory_allocated`` on CUDA, on CPU the allocator replay of the
    ``window`` profiler range (:func:`cpu_peak_bytes`), which counts what ``build`` left allocated, profiled inside
    :func:`unfragmented_heap`."""
    if device.type == "cuda":
        built = build()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step(built)
        synchronize(device)
        return built, torch.cuda.max_memory_allocated(device)
    with unfragmented_heap(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                     profile_memory=True) as prof:
        built = build()
        with torch.profiler.record_function(window):
            for _ in range(steps):
                step(built)
    return built, cpu_peak_bytes(prof, window)


def speed(tokens: int, times: Sequence[float]) -> Result:
    """Throughput fields of a result: tokens per fastest / median step and those steps' milliseconds."""
    return {"tokens_per_s": tokens / min(times), "median_tokens_per_s": tokens / statistics.median(times),
            "step_ms": 1000 * min(times), "median_step_ms": 1000 * statistics.median(times)}


def failure(result: Result, exc: BaseException) -> Result:
    """``result`` with status ``OOM`` or ``ERROR`` (traceback on stderr) and the first line of the error."""
    status = "OOM" if is_oom(exc) else "ERROR"
    if status == "ERROR":
        traceback.print_exc(file=sys.stderr)
    return {**result, "status": status, "error": (str(exc).splitlines() or [type(exc).__name__])[0][:200]}


def free_memory(device: str) -> None:
    """Collect garbage (and empty the CUDA cache) before the next in-process configuration."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def measure(result: Result, device: str, fn: Callable[[], Result]) -> Result:
    """``result`` with status ``ok`` and the fields ``fn()`` measured; a failure becomes :func:`failure` (one failing
    configuration must not take down the whole table); memory is freed either way."""
    try:
        return {**result, "status": "ok", **fn()}
    except Exception as exc:
        return failure(result, exc)
    finally:
        free_memory(device)


# ====================================================================================================================
# One configuration per worker subprocess, and the driver
# ====================================================================================================================

def script_tag(script: str) -> str:
    """``bench_alibi`` for scripts/bench_alibi.py: the prefix of the progress and failure lines on stderr."""
    return os.path.splitext(os.path.basename(script))[0]


def run_worker(script: str, argv: Sequence[str], worker: str, base: Result, prefix: str,
               timeout: Optional[float], label: str) -> Result:
    """One configuration in a fresh Python process running ``script`` with ``argv`` and ``--worker worker``; its
    result is the last stdout line starting with ``prefix`` (JSON). ``base`` (the configuration's keys) stands in
    when the worker timed out, was killed or printed nothing; ``label`` names it on stderr."""
    cmd = [sys.executable, os.path.abspath(script), *argv, "--worker", worker]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "status": "TIMEOUT"}
    results = [json.loads(line[len(prefix):]) for line in proc.stdout.splitlines() if line.startswith(prefix)]
    if results and results[-1]["status"] != "ERROR":
        return results[-1]
    if not results and (proc.returncode == -9 or any(m in proc.stderr.lower() for m in OOM_MARKERS)):
        return {**base, "status": "OOM", "error": f"worker exit {proc.returncode} (killed / out of memory)"}
    sys.stderr.write(f"[{script_tag(script)}] {label} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n")
    return results[-1] if results else {**base, "status": "ERROR", "error": f"worker exit {proc.returncode}"}


def bench_command(script: str, argv: Sequence[str]) -> str:
    """The command line of this run as the report prints it (script path relative to the working directory)."""
    return shlex.join(["python", os.path.relpath(os.path.abspath(script), os.getcwd()), *argv])


def bench_main(script: str, argv: Optional[Sequence[str]], parse: Callable[[List[str]], argparse.Namespace],
               prefix: str, specs: Callable[[argparse.Namespace], Iterable[str]],
               run_spec: Callable[[argparse.Namespace, str], Result],
               run_isolated: Callable[[Sequence[str], str, Optional[float]], Result],
               render: Callable[[argparse.Namespace, List[Result], str, Tuple[float, float]], str]) -> int:
    """The ``main`` of a bench script whose rows are worker specs (``argv`` None: ``sys.argv[1:]``): as ``--worker``
    print that spec's result after ``prefix``; else run every spec (``--in-process`` or through
    ``run_isolated(argv, spec, --timeout)``), report progress on stderr and print ``render(opts, results, command,
    (load average at start, at end))``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse(argv)
    if opts.worker is not None:
        print(prefix + json.dumps(run_spec(opts, opts.worker)), flush=True)
        return 0
    load_start = os.getloadavg()[0]
    results = []
    for spec in specs(opts):
        result = run_spec(opts, spec) if opts.in_process else run_isolated(argv, spec, opts.timeout)
        extra = f" {result['tokens_per_s']:,.1f} tokens/s" if result.get("status") == "ok" else ""
        print(f"[{script_tag(script)}] {spec}: {result['status']}{extra}", file=sys.stderr, flush=True)
        results.append(result)
    print(render(opts, results, bench_command(script, argv), (load_start, os.getloadavg()[0])), end="")
    return 0


# ====================================================================================================================
# Command line and report header
# ====================================================================================================================

def add_run_arguments(p: argparse.ArgumentParser, quick: Mapping[str, Any], dtype_help: str) -> None:
    """The flags every worker-spec bench shares: device, dtype, threads, seed, --quick (``quick``: its sizes),
    isolation, per-configuration timeout and the internal ``--worker``."""
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help=dtype_help)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help=f"tiny sizes for tests: {', '.join(f'{k}={v}' for k, v in quick.items())}")
    p.add_argument("--in-process", action="store_true", help="run every configuration in this process (default: a "
                                                              "fresh subprocess each, so memory numbers stay clean)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per configuration (subprocesses)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one configuration, JSON result


def apply_run_arguments(opts: argparse.Namespace) -> None:
    """Resolve the flags of :func:`add_run_arguments`: ``--device`` defaults to cuda if available, else cpu;
    ``--threads`` sets torch's thread count."""
    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)


def run_header(command: str, device: torch.device, dtype: str, load: Tuple[float, float], isolation: str,
               advice: str, precision: str = "fairseq's --bf16 / --fp16") -> List[str]:
    """The report's first bullet lines: command, versions, device and dtype, host load and isolation, and a warning
    (ending in ``advice``) when the load at the start exceeded the torch threads on CPU."""
    import fairseq

    return [
        f"- command: `{command}`",
        f"- torch {torch.__version__}, fairseq {fairseq.__version__}; device: {device_description(device)}; dtype "
        f"{dtype}{f' ({precision})' if dtype != 'fp32' else ''}",
        f"- host load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} CPUs; "
        f"isolation: {isolation}",
        *([f"- **warning**: the 1-minute load average ({load[0]:.1f}) exceeded the {torch.get_num_threads()} torch "
           f"threads at the start: other processes share these cores{advice}"]
          if device.type == "cpu" and load[0] > torch.get_num_threads() else []),
    ]


# ====================================================================================================================
# Training on carried streams (stateful language models)
# ====================================================================================================================

def resolve_defaults(opts: argparse.Namespace, quick: Mapping[str, Any], normal: Mapping[str, Any],
                     cpu: Mapping[str, Any], cuda: Mapping[str, Any]) -> None:
    """Fill every option still None: ``quick`` under --quick, else the device's defaults (``cuda`` / ``cpu``) and
    ``normal``; call after :func:`apply_run_arguments`."""
    defaults = dict(quick) if opts.quick else {**(cuda if opts.device == "cuda" else cpu), **normal}
    for name, value in defaults.items():
        if getattr(opts, name, None) is None:
            setattr(opts, name, value)


def add_stream_run_arguments(p: argparse.ArgumentParser, quick: Mapping[str, Any], normal: Mapping[str, Any],
                             filled: str) -> None:
    """--steps and --warmup (defaults None: :func:`resolve_defaults`) and :func:`add_run_arguments`, for a bench
    whose warm-up steps follow a fill of the carried ``filled`` (cache, memory)."""
    p.add_argument("--steps", type=int, default=None, help=f"timed training steps (default {normal['steps']})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed training steps after the {filled} fill (default {normal['warmup']}; >= 1: peak "
                        f"memory is measured over them)")
    add_run_arguments(p, quick, "fp32, or fairseq's --bf16 / --fp16 (CUDA)")


def parse_stream_args(p: argparse.ArgumentParser, argv: Optional[Sequence[str]], quick: Mapping[str, Any],
                      normal: Mapping[str, Any], cpu: Mapping[str, Any], cuda: Mapping[str, Any]) -> argparse.Namespace:
    """Parse, :func:`apply_run_arguments`, :func:`resolve_defaults` and check --steps / --warmup >= 1."""
    opts = p.parse_args(argv)
    apply_run_arguments(opts)
    dtype_flags(opts.device, opts.dtype)  # fp16 / bf16 need CUDA
    resolve_defaults(opts, quick, normal, cpu, cuda)
    if opts.steps < 1 or opts.warmup < 1:
        raise SystemExit("--steps and --warmup must be >= 1")
    return opts


def measure_stream_training(result: Result, opts: argparse.Namespace,
                            build_and_fill: Callable[[], Tuple["FairseqRow", int]], tokens: int, window: str,
                            telemetry: Callable[["FairseqRow"], Result]) -> Result:
    """Seed, build and fill (``build_and_fill`` -> (row, fill forwards)), run the warm-up steps (peak memory over
    them, profiler ``window``) and ``opts.steps`` timed steps of ``tokens`` tokens each, in this process; ``result``
    gains speed, peak_mb, rss_mb, fills, ``telemetry(trainer)`` and params (see :func:`measure`)."""
    torch.manual_seed(opts.seed)

    def run() -> Result:
        (trainer, fills), peak = warm_up_peak(torch.device(opts.device), build_and_fill,
                                              lambda built: built[0].train_step(), opts.warmup, window)
        times = timed(trainer.train_step, opts.steps, trainer.device)
        return dict(**speed(tokens, times), peak_mb=peak / 2 ** 20,
                    rss_mb=None if opts.in_process else peak_rss_bytes() / 2 ** 20, fills=fills,
                    **telemetry(trainer), params=sum(p.numel() for p in trainer.model.parameters()))

    return measure(result, opts.device, run)
