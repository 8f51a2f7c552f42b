#!/usr/bin/env python
"""Evaluation peak memory of ``alibi_lm`` vs window length: ``fairseq-eval-lm`` with the full-bias kernel and with
the default kernel choice, one fresh process per (kernel, window length T).

Issue 11: with ``--attn-impl sdpa`` (the full (1, H, T, T) fp32 bias, ``auto``'s only choice before the chunked
kernel) evaluation memory grows with T^2; ``auto`` runs ``chunked`` without gradients once T exceeds one chunk
(the bias built per block of query rows: ``fairseq_ext/ops/alibi/chunked.py``) where a chunk size is given or on
CUDA, and on CPU ``blocked`` (causal query blocks whose biases are views of one (1, H, r, T) strip of at most the
same budget: ``fairseq_ext/ops/alibi/blocked.py``). Each row evaluates the same
``--tokens`` random tokens through fairseq's own CLI code (``fairseq_cli.eval_lm.main`` via ``call_main``)::

    fairseq-eval-lm DATA --task language_modeling --path CKPT --tokens-per-sample T --context-window 0
        --batch-size 1 --sample-break-mode none --gen-subset valid [--cpu] --model-overrides "{'attn_impl': K}"

DATA (``dict.txt`` of ``--vocab`` entries, a ``valid`` split of random tokens) and CKPT (a randomly initialised
model; memory does not depend on the weights) are written once to ``--workdir`` (default: a temporary directory).
Memory: the peak resident set size of the worker process (``ru_maxrss``: Python, torch, fairseq, the model, the
data and every transient; the RSS before evaluation is printed too), and on CUDA ``torch.cuda.max_memory_allocated``.
On CPU each worker's address space is capped (``--memory-limit-gb``, default 12) so that a window whose full bias
does not fit fails as ``OOM`` instead of pushing a shared machine into swap or the OOM killer. The table also prints
each kernel's loss (bits/token) and whether they are identical.

    python scripts/bench_alibi_eval_memory.py                       # demo shape, T = 1k, 4k, 8k, 16k, 32k, CPU
    python scripts/bench_alibi_eval_memory.py --seq-lens 1024,4096 --kernels sdpa,auto,naive
    python scripts/bench_alibi_eval_memory.py --quick               # tiny sizes (the test)
"""

import argparse
import contextlib
import json
import logging
import os
import re
import resource
import sys
import tempfile
import time
from argparse import Namespace
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run as `python scripts/bench_alibi_eval_memory.py` from a checkout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/benchlib.py
from benchlib import (Result, add_run_arguments, apply_run_arguments, bench_command, fairseq_config,  # noqa: E402
                      measure, peak_rss_bytes, run_header, run_worker, write_dictionary)
import fairseq_ext  # noqa: E402,F401  (registers alibi_lm and its archs with fairseq)
from fairseq_ext.ops.alibi import IMPLS, block_rows, chunk_rows, select_impl  # noqa: E402

DEMO_DIMS = {"layers": 2, "embed_dim": 128, "heads": 4, "ffn_dim": 512}  # scripts/demo.py's shape
DIM_FLAGS = {"layers": "--decoder-layers", "embed_dim": "--decoder-embed-dim", "heads": "--decoder-attention-heads",
             "ffn_dim": "--decoder-ffn-embed-dim"}
QUICK = dict(seq_lens=[64, 128], layers=1, embed_dim=32, heads=4, ffn_dim=64, vocab=64, chunk_size=16)
NORMAL = dict(seq_lens=[1024, 4096, 8192, 16384, 32768], vocab=1008, chunk_size=0, **DEMO_DIMS)
LINE_TOKENS = 100  # tokens per binarised line (the last one is </s>)
RESULT_PREFIX = "BENCH_ALIBI_EVAL_MEMORY_RESULT "
TARGETS = ((16384, "16k-token windows in <= 2 GB peak RSS", 2 * 1024), (32768, "32k-token windows complete", None))


# ====================================================================================================================
# Command line
# ====================================================================================================================

def _int_list(text: str) -> List[int]:
    return [int(v) for v in text.replace(",", " ").split()]


def _kernel_list(text: str) -> List[str]:
    names = text.replace(",", " ").split()
    unknown = sorted(set(names) - set(IMPLS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown kernel(s) {unknown}; choose from {IMPLS}")
    return names


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seq-lens", type=_int_list, default=None, help=f"window lengths T (default {NORMAL['seq_lens']})")
    p.add_argument("--kernels", type=_kernel_list, default=["sdpa", "auto"],
                   help="attn_impl values to compare; the first is 'before', the others 'after'")
    p.add_argument("--tokens", type=int, default=None, help="tokens in the valid split (default: the largest T)")
    p.add_argument("--arch", default="alibi_lm", help="alibi_lm arch preset")
    p.add_argument("--layers", type=int, default=None, help=f"default {DEMO_DIMS['layers']} for the plain alibi_lm")
    p.add_argument("--embed-dim", type=int, default=None, help=f"default {DEMO_DIMS['embed_dim']} for alibi_lm")
    p.add_argument("--heads", type=int, default=None, help=f"default {DEMO_DIMS['heads']} for alibi_lm")
    p.add_argument("--ffn-dim", type=int, default=None, help=f"default {DEMO_DIMS['ffn_dim']} for alibi_lm")
    p.add_argument("--vocab", type=int, default=None, help=f"dictionary size incl. 4 specials (default "
                                                           f"{NORMAL['vocab']})")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="--alibi-chunk-size of the model (0: from the bias budget; --quick: 16)")
    p.add_argument("--memory-limit-gb", type=float, default=12.0,
                   help="CPU: cap each worker's address space (RLIMIT_AS); 0 = no cap")
    p.add_argument("--workdir", default=None, help="where DATA and CKPT are written (default: a temporary directory)")
    add_run_arguments(p, QUICK, "fp32 only (eval-lm's --fp16/--bf16 are not measured here)")
    return p


def parse_bench_args(argv: Optional[Sequence[str]] = None) -> Namespace:
    opts = build_arg_parser().parse_args(argv)
    apply_run_arguments(opts)
    if opts.dtype != "fp32":
        raise SystemExit("bench_alibi_eval_memory measures fp32 evaluation only (--dtype fp32)")
    defaults = dict(QUICK) if opts.quick else dict(NORMAL)
    if opts.arch != "alibi_lm":
        for name in DEMO_DIMS:
            defaults.pop(name)  # the preset's dimensions
    for name, value in defaults.items():
        if getattr(opts, name, None) is None:
            setattr(opts, name, value)
    if opts.tokens is None:
        opts.tokens = max(opts.seq_lens)
    if min(opts.seq_lens) < 1 or opts.tokens < 1 or opts.chunk_size < 0:
        raise SystemExit("--seq-lens and --tokens must be >= 1, --chunk-size >= 0")
    return opts


# ====================================================================================================================
# DATA and CKPT
# ====================================================================================================================

def model_flags(opts: Namespace, data_dir: str) -> List[str]:
    flags = [data_dir, "--task", "language_modeling", "--arch", opts.arch, "--seed", str(opts.seed),
             "--alibi-chunk-size", str(opts.chunk_size)]
    for name, flag in DIM_FLAGS.items():
        if getattr(opts, name, None) is not None:
            flags += [flag, str(getattr(opts, name))]
    return flags


def write_valid_split(data_dir: str, tokens: int, seed: int) -> None:
    """``valid.{bin,idx}``: ``tokens`` random word ids in lines of ``LINE_TOKENS`` (each ending in </s>)."""
    from fairseq.data import Dictionary, indexed_dataset

    dictionary = Dictionary.load(os.path.join(data_dir, "dict.txt"))
    gen = torch.Generator().manual_seed(seed)
    prefix = os.path.join(data_dir, "valid")
    builder = indexed_dataset.make_builder(prefix + ".bin", impl="mmap", vocab_size=len(dictionary))
    for start in range(0, tokens, LINE_TOKENS):
        n = min(LINE_TOKENS, tokens - start)
        words = torch.randint(dictionary.nspecial, len(dictionary), (n - 1,), generator=gen)  # (n - 1,)
        builder.add_item(torch.cat([words, torch.tensor([dictionary.eos()])]).int())  # (n,)
    builder.finalize(prefix + ".idx")


def prepare(opts: Namespace, root: str) -> Tuple[str, str]:
    """Write DATA (dict.txt, valid split) and CKPT (a randomly initialised model) under ``root``; returns both."""
    from fairseq import checkpoint_utils, tasks
    from omegaconf import OmegaConf

    data_dir = os.path.join(root, "data")
    os.makedirs(data_dir, exist_ok=True)
    write_dictionary(data_dir, opts.vocab)
    write_valid_split(data_dir, opts.tokens, opts.seed)
    cfg = fairseq_config(model_flags(opts, data_dir))
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(opts.seed)
    model = task.build_model(cfg.model)
    ckpt = os.path.join(root, "checkpoint.pt")
    checkpoint_utils.torch_persistent_save({
        "cfg": OmegaConf.to_container(cfg), "model": model.state_dict(), "extra_state": {},
        "optimizer_history": [{"num_updates": 0, "criterion_name": "cross_entropy", "optimizer_name": "none",
                               "lr_scheduler_state": {}}]}, ckpt)
    return data_dir, ckpt


def paths(root: str) -> Tuple[str, str]:
    return os.path.join(root, "data"), os.path.join(root, "checkpoint.pt")


# ====================================================================================================================
# One (kernel, T) configuration
# ====================================================================================================================

def eval_lm_flags(opts: Namespace, kernel: str, seq_len: int, data_dir: str, ckpt: str) -> List[str]:
    flags = [data_dir, "--user-dir", os.path.join(REPO_ROOT, "fairseq_ext"), "--task", "language_modeling",
             "--path", ckpt, "--tokens-per-sample", str(seq_len), "--context-window", "0", "--batch-size", "1",
             "--sample-break-mode", "none", "--gen-subset", "valid", "--num-workers", "0", "--no-progress-bar",
             "--seed", str(opts.seed), "--model-overrides", repr({"attn_impl": kernel})]
    return flags + (["--cpu"] if opts.device == "cpu" else [])


def limit_address_space(gigabytes: float) -> None:
    limit = int(gigabytes * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


@contextlib.contextmanager
def eval_lm_log() -> Iterator[List[str]]:
    """Collect fairseq_cli.eval_lm's log messages while the block runs."""
    messages: List[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("fairseq_cli.eval_lm")
    handler, level = Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def kernel_used(opts: Namespace, kernel: str, seq_len: int) -> str:
    """The kernel ``alibi_attention`` selects for a full window under eval-lm (no gradients), with its rows per
    block or chunk."""
    heads = fairseq_config(model_flags(opts, "-")).model.decoder_attention_heads
    with torch.no_grad():
        concrete = select_impl(kernel, heads, seq_len, seq_len, opts.chunk_size or None, device=opts.device)
    if concrete == "blocked":
        return f"blocked ({min(seq_len, block_rows(seq_len, heads, seq_len))} rows)"
    if concrete != "chunked":
        return concrete
    rows = opts.chunk_size or chunk_rows(heads, seq_len)
    return f"chunked ({rows} rows)"


def run_spec(opts: Namespace, spec: str) -> Result:
    """Evaluate with kernel K at window T (spec "K:T") in this process; loss, tokens/s, peak RSS (and CUDA peak)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli import eval_lm

    kernel, seq_len = spec.split(":")
    result: Result = {"kernel": kernel, "seq_len": int(seq_len)}
    data_dir, ckpt = paths(opts.workdir)
    device = torch.device(opts.device)
    if device.type == "cpu" and opts.memory_limit_gb > 0 and not opts.in_process:
        limit_address_space(opts.memory_limit_gb)

    def run() -> Result:
        flags = eval_lm_flags(opts, kernel, int(seq_len), data_dir, ckpt)
        parsed = options.parse_args_and_arch(options.get_eval_lm_parser(), flags)
        rss_before = peak_rss_bytes()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with eval_lm_log() as log:
            out = distributed_utils.call_main(convert_namespace_to_omegaconf(parsed), eval_lm.main)
        wall = time.perf_counter() - start
        scored = next(re.search(r"Evaluated ([0-9,]+) tokens in .*\(([0-9.]+) tokens/s\)", m) for m in log
                      if "Evaluated" in m)
        return {"loss": float(out["loss"]), "tokens": int(scored.group(1).replace(",", "")),
                "tokens_per_s": float(scored.group(2)),
                "wall_s": wall, "ran": kernel_used(opts, kernel, int(seq_len)),
                "rss_mb": None if opts.in_process else peak_rss_bytes() / 2 ** 20,
                "rss_before_mb": None if opts.in_process else rss_before / 2 ** 20,
                "cuda_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None}

    return measure(result, opts.device, run)


def iter_specs(opts: Namespace) -> Iterator[str]:
    for seq_len in opts.seq_lens:
        for kernel in opts.kernels:
            yield f"{kernel}:{seq_len}"


# ====================================================================================================================
# Report
# ====================================================================================================================

def _find(results: Sequence[Result], kernel: str, seq_len: int) -> Optional[Result]:
    return next((r for r in results if r["kernel"] == kernel and r["seq_len"] == seq_len), None)


def _mb(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _memory(r: Result) -> str:
    if r["status"] != "ok":
        return r["status"]
    return _mb(r["cuda_mb"]) if r.get("cuda_mb") is not None else _mb(r["rss_mb"])


def table_row(opts: Namespace, results: Sequence[Result], seq_len: int) -> str:
    rows = [_find(results, k, seq_len) or {"kernel": k, "status": "missing"} for k in opts.kernels]
    windows = -(-opts.tokens // seq_len)
    cells = [f"{seq_len:,}", str(windows)]
    cells += [_memory(r) for r in rows]
    ok = [r for r in rows if r["status"] == "ok"]
    before = rows[0]
    for r in rows[1:]:
        both = before["status"] == "ok" and r["status"] == "ok"
        memory_key = "cuda_mb" if opts.device == "cuda" else "rss_mb"
        cells.append(f"{before[memory_key] / r[memory_key]:.2f}×" if both and before[memory_key] and r[memory_key]
                     else "-")
    cells += [r.get("ran", "-") if r["status"] == "ok" else "-" for r in rows]
    cells += [f"{r['tokens_per_s']:,.0f}" if r["status"] == "ok" else "-" for r in rows]
    cells += [f"{r['loss']:.6f}" if r["status"] == "ok" else "-" for r in rows]
    cells.append(("yes" if len({r["loss"] for r in ok}) == 1 else "NO") if len(ok) > 1 else "-")
    return "| " + " | ".join(cells) + " |"


def table_header(opts: Namespace) -> List[str]:
    memory = "peak CUDA MB" if opts.device == "cuda" else "peak RSS MB"
    kernels = opts.kernels
    columns = ["T", "windows"] + [f"{k}: {memory}" for k in kernels]
    columns += [f"{kernels[0]} / {k}" for k in kernels[1:]]
    columns += [f"{k}: kernel run" for k in kernels] + [f"{k}: tokens/s" for k in kernels]
    columns += [f"{k}: loss" for k in kernels] + ["identical loss"]
    return ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]


def target_lines(opts: Namespace, results: Sequence[Result]) -> List[str]:
    lines = []
    after = opts.kernels[-1]
    for seq_len, label, limit_mb in TARGETS:
        r = _find(results, after, seq_len)
        if r is None:
            lines.append(f"- {label} ({after}): n/a (T={seq_len} not measured)")
        elif r["status"] != "ok":
            lines.append(f"- {label} ({after}): {r['status']} -> NOT met")
        elif limit_mb is None:
            lines.append(f"- {label} ({after}): ok -> met")
        else:
            value = r["cuda_mb"] if r.get("cuda_mb") is not None else r["rss_mb"]
            verdict = "n/a (in-process)" if value is None else ("met" if value <= limit_mb else "NOT met")
            lines.append(f"- {label} ({after}): {_mb(value)} MB -> {verdict}")
    return lines


def render_report(opts: Namespace, results: Sequence[Result], command: str, load: Tuple[float, float]) -> str:
    device = torch.device(opts.device)
    m = fairseq_config(model_flags(opts, "-")).model
    before_rss = [r["rss_before_mb"] for r in results if r["status"] == "ok" and r.get("rss_before_mb")]
    isolation = "in-process (RSS not measured)" if opts.in_process else "one fresh process per row"
    memory = ("torch.cuda.max_memory_allocated during the evaluation" if device.type == "cuda" else
              "peak RSS of the worker process (ru_maxrss, whole process" +
              (f"; {min(before_rss):,.0f}-{max(before_rss):,.0f} MB before the evaluation started)" if before_rss
               else ")"))
    lines = ["## ALiBi evaluation memory vs window length", "",
             *run_header(command, device, opts.dtype, load, isolation, "; rerun on an idle machine for speeds"),
             f"- model: arch {opts.arch}, {m.decoder_layers} layers, d={m.decoder_embed_dim}, "
             f"{m.decoder_attention_heads} heads, FFN {m.decoder_ffn_embed_dim}, vocab {opts.vocab}, random weights; "
             f"alibi_chunk_size {opts.chunk_size or 'auto (bias budget)'}",
             f"- eval: fairseq-eval-lm over {opts.tokens:,} random tokens, --tokens-per-sample T --context-window 0 "
             f"--batch-size 1 --sample-break-mode none, --model-overrides \"{{'attn_impl': K}}\" for K in "
             f"{', '.join(opts.kernels)} (the first is the reference)",
             f"- memory: {memory}"
             + (f"; CPU address space capped at {opts.memory_limit_gb:g} GiB per worker (OOM above)"
                if device.type == "cpu" and opts.memory_limit_gb > 0 and not opts.in_process else ""),
             "", *table_header(opts), *(table_row(opts, results, t) for t in opts.seq_lens), "", "Targets:",
             *target_lines(opts, results)]
    return "\n".join(lines) + "\n"


# ====================================================================================================================
# Driver
# ====================================================================================================================

def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_bench_args(argv)
    if opts.worker is not None:
        print(RESULT_PREFIX + json.dumps(run_spec(opts, opts.worker)), flush=True)
        return 0
    load_start = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        if opts.workdir is None:
            opts.workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_alibi_eval_memory_"))
        prepare(opts, opts.workdir)
        worker_argv = [*argv, "--workdir", opts.workdir] if "--workdir" not in argv else argv
        results = []
        for spec in iter_specs(opts):
            kernel, seq_len = spec.split(":")
            result = run_spec(opts, spec) if opts.in_process else run_worker(
                __file__, worker_argv, spec, {"kernel": kernel, "seq_len": int(seq_len)}, RESULT_PREFIX,
                opts.timeout, f"{kernel} T={seq_len}")
            memory = f" {_memory(result)} MB" if result["status"] == "ok" else ""
            print(f"[bench_alibi_eval_memory] {spec}: {result['status']}{memory}", file=sys.stderr, flush=True)
            results.append(result)
    print(render_report(opts, results, bench_command(__file__, argv), (load_start, os.getloadavg()[0])), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
