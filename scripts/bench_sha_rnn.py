#!/usr/bin/env python
"""SHA-RNN training speed and peak memory: the presets, and the cost of the attention memory length W.

Merity 2019, "Single Headed Attention RNN" (arXiv 1911.11423); spec sha_rnn.md §2: the single-head enwik8 model
trains at B 16 x T 1024 (about 30 min per epoch of ≈ 5,493 batches on a Titan V / V100, i.e. ≈ 3 steps/s,
≈ 50k tokens/s). This bench measures ``sha_rnn_lm`` built the way ``fairseq-train`` builds it (``--task
streaming_lm``, ``--criterion lm_loss``, ``--optimizer lamb_torch`` with the paper's ``--min-trust 0.25
--trust-denominator update_norm --weight-decay 1.2e-6``, a ``dict.txt`` of ``--vocab`` entries) and trains it
with fairseq's ``Trainer`` (``scripts/benchrow.py``) on Zipf(1) tokens:

* ``presets`` table -- one row per preset (``--presets``, default ``sha_rnn_tiny`` and ``sha_rnn_enwik8``);
* ``memory`` table  -- ``sha_rnn_enwik8`` with ``--max-memory`` W in ``--memories`` (default 1000, 5000, 10000;
  a default below T, e.g. 1000 at CUDA's T = 1024, is raised to T);

``sha_rnn_lm`` beside a reproduction of the original ``model.py`` at the same configuration is a row pair of
``scripts/bench.py --original`` (see docs/benchmarks.md).

A training step is forward over the carried streams (LSTM states and attention memories of the decoder's "train"
stream, carried from step to step), ``lm_loss``, backward, gradient-norm clip 0.25 (the paper's ``clip``) and a
LAMB step. Before timing, the attention memories are filled to their full length W by ceil(W / T) no-grad
training-mode forwards, then ``--warmup`` training steps run; tokens/s = B·T / step time (fastest of ``--steps``;
the median is printed too). Peak memory is measured over the warm-up training steps (memories full): on CUDA
``torch.cuda.max_memory_allocated``; on CPU the maximum of live tensor bytes in PyTorch's CPU allocator (replayed
from ``torch.profiler`` events) and the peak RSS of the worker process, each row in a fresh subprocess unless
``--in-process``.

CPU defaults are reduced: B 1 x T 256 (the paper's B 16 x T 1024 takes minutes per step on two cores).

    python scripts/bench_sha_rnn.py                  # CPU defaults (B 1 x T 256; about 1.5 min on 2 idle cores)
    python scripts/bench_sha_rnn.py --quick          # tiny sizes (the test)
    python scripts/bench_sha_rnn.py --device cuda --batch-size 16 --tgt-len 1024   # the paper's shape (GPU default)
"""

import argparse
import math
import os
import sys
from argparse import Namespace
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run as `python scripts/bench_sha_rnn.py` from a checkout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/benchlib.py
from benchlib import (RSS_DESCRIPTION, Result, add_stream_run_arguments, bench_main,  # noqa: E402
                      measure_stream_training, memory_description, parse_stream_args, run_header, run_worker)
from benchrow import STREAM_TASK, FairseqRow  # noqa: E402
import fairseq_ext  # noqa: E402,F401  (registers sha_rnn_lm, streaming_lm, lm_loss, lamb_torch)
from fairseq_ext.models.sha_rnn_lm import SHARNNConfig  # noqa: E402

TABLES = ("presets", "memory")
PRESETS = ("sha_rnn_tiny", "sha_rnn_enwik8", "sha_rnn_enwik8_full_attn")
MEMORY_PRESET = "sha_rnn_enwik8"
ENWIK8_VOCAB = 205  # dictionary entries incl. fairseq's 4 specials
LR, MIN_TRUST, WEIGHT_DECAY, CLIP_NORM = 2e-3, 0.25, 1.2e-6, 0.25  # sha_rnn.md §2
CPU_DEFAULTS = dict(batch_size=1, tgt_len=256)
CUDA_DEFAULTS = dict(batch_size=16, tgt_len=1024)  # the paper's shape
QUICK = dict(presets=["sha_rnn_tiny"], memories=[16, 48], memory_preset="sha_rnn_tiny", batch_size=1, tgt_len=16,
             vocab=32, steps=2, warmup=1)
NORMAL = dict(presets=["sha_rnn_tiny", "sha_rnn_enwik8"], memories=[1000, 5000, 10000], memory_preset=MEMORY_PRESET,
              vocab=ENWIK8_VOCAB, steps=3, warmup=2)
RESULT_PREFIX = "BENCH_SHA_RESULT "
MEMORY_WINDOW = "bench_sha_warmup"


# ====================================================================================================================
# Command line
# ====================================================================================================================

def _list(item: Callable[[str], Any], choices: Optional[Sequence[str]] = None) -> Callable[[str], List[Any]]:
    """An argparse type: a comma / space separated list of ``item`` values (from ``choices`` when given)."""
    def parse(text: str) -> List[Any]:
        values = [v for v in text.replace(",", " ").split()]
        if not values:
            raise argparse.ArgumentTypeError("empty list")
        if choices is not None:
            for value in values:
                if value not in choices:
                    raise argparse.ArgumentTypeError(f"unknown {value!r}; choose from {choices}")
        return [item(v) for v in values]
    return parse


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tables", type=_list(str, TABLES), default=list(TABLES), help="presets and/or memory")
    p.add_argument("--presets", type=_list(str, PRESETS), default=None,
                   help=f"rows of the presets table (default {','.join(NORMAL['presets'])})")
    p.add_argument("--memories", type=_list(int), default=None,
                   help=f"max_memory W of the memory table's rows (default "
                        f"{','.join(map(str, NORMAL['memories']))}, preset {MEMORY_PRESET})")
    p.add_argument("--memory-preset", choices=PRESETS, default=None, help=f"preset of the memory table (default "
                                                                          f"{MEMORY_PRESET})")
    p.add_argument("--batch-size", type=int, default=None, help="streams B (default: 1 on CPU, 16 on CUDA)")
    p.add_argument("--tgt-len", type=int, default=None, help="segment length T (default: 256 on CPU, 1024 on CUDA)")
    p.add_argument("--vocab", type=int, default=None, help=f"dictionary size incl. 4 specials (default "
                                                            f"{ENWIK8_VOCAB}, enwik8)")
    add_stream_run_arguments(p, QUICK, NORMAL, "memory")
    return p


def parse_bench_args(argv: Optional[Sequence[str]] = None) -> Namespace:
    opts = parse_stream_args(build_arg_parser(), argv, QUICK, NORMAL, CPU_DEFAULTS, CUDA_DEFAULTS)
    if opts.batch_size < 1 or opts.tgt_len < 1 or min(opts.memories) < 1:
        raise SystemExit("--batch-size, --tgt-len and every --memories value must be >= 1")
    if min(opts.memories) < opts.tgt_len:
        if opts.memories != NORMAL["memories"]:
            raise SystemExit(f"every --memories value must be >= --tgt-len {opts.tgt_len} (SHA-RNN trims the memory "
                             f"to max_memory - T before each segment)")
        opts.memories = sorted({max(memory, opts.tgt_len) for memory in opts.memories})  # CUDA's T = 1024
    return opts


# ====================================================================================================================
# Building a configuration like fairseq-train, and the training step
# ====================================================================================================================

def row_flags(opts: Namespace, preset: str, memory: Optional[int]) -> List[str]:
    """fairseq-train flags of one row (memory None: the preset's max_memory, raised to T when shorter)."""
    flags = [*STREAM_TASK, "--tokens-per-sample", str(opts.tgt_len), "--batch-size", str(opts.batch_size), "--arch",
             preset, "--optimizer", "lamb_torch", "--lr", str(LR), "--min-trust", str(MIN_TRUST),
             "--trust-denominator", "update_norm", "--weight-decay", str(WEIGHT_DECAY), "--clip-norm", str(CLIP_NORM)]
    if memory is None and preset_max_memory(preset) < opts.tgt_len:
        memory = opts.tgt_len  # the model refuses a window shorter than a segment (sha_rnn_tiny's 40 < T = 256)
    return flags + (["--max-memory", str(memory)] if memory is not None else [])


def preset_max_memory(preset: str) -> int:
    """The preset's max_memory W (its arch function applied to empty args)."""
    from fairseq.models import ARCH_CONFIG_REGISTRY

    args = Namespace()
    ARCH_CONFIG_REGISTRY[preset](args)
    return int(getattr(args, "max_memory", SHARNNConfig.max_memory))


def memory_lengths(row: FairseqRow) -> List[int]:
    """Attention-memory lengths held by the attention blocks of the carried "train" stream."""
    state = row.model.decoder.stream_state("train")
    return [] if state is None else [int(s.memory.size(1)) for s in state.layers if s.memory is not None]


def run_config(opts: Namespace, table: str, preset: str, memory: Optional[int]) -> Result:
    """Throughput and peak memory of one row, in this process: build, fill the attention memories to max_memory
    (ceil(W / T) no-grad forwards), the warm-up steps (peak memory) and the timed steps."""
    result: Result = {"table": table, "preset": preset, "batch": opts.batch_size, "tgt": opts.tgt_len}

    def build_and_fill() -> Tuple[FairseqRow, int]:
        row = FairseqRow(row_flags(opts, preset, memory), opts.vocab, opts.device, opts.dtype, opts.seed)
        fills = math.ceil(row.model.decoder.max_memory / opts.tgt_len)
        row.fill(fills)
        return row, fills

    def telemetry(row: FairseqRow) -> Result:
        decoder = row.model.decoder
        return dict(max_memory=decoder.max_memory, memory_held=memory_lengths(row),
                    attn_layers=list(decoder.attn_layers), layers=len(decoder.layers),
                    dim=decoder.embed_tokens.embedding_dim)

    return measure_stream_training(result, opts, build_and_fill, opts.batch_size * opts.tgt_len, MEMORY_WINDOW,
                                   telemetry)


# ====================================================================================================================
# Driver: one subprocess per row
# ====================================================================================================================

def iter_configs(opts: Namespace) -> Iterator[str]:
    """Worker specs ``presets|PRESET|`` and ``memory|PRESET|W``."""
    if "presets" in opts.tables:
        for preset in opts.presets:
            yield f"presets|{preset}|"
    if "memory" in opts.tables:
        for memory in opts.memories:
            yield f"memory|{opts.memory_preset}|{memory}"


def run_spec(opts: Namespace, spec: str) -> Result:
    table, preset, memory = spec.split("|")
    return run_config(opts, table, preset, int(memory) if memory else None)


def run_isolated(argv: Sequence[str], spec: str, timeout: Optional[float]) -> Result:
    """One row in a fresh Python process running this script with ``--worker``."""
    table, preset, _ = spec.split("|")
    return run_worker(__file__, argv, spec, {"table": table, "preset": preset}, RESULT_PREFIX, timeout, spec)


# ====================================================================================================================
# Report
# ====================================================================================================================

HEADER = ("| preset | B × T | layers × d | attention blocks | W (max_memory) | memory held | tokens/s (fastest) | "
          "tokens/s (median) | {ref} | peak tensor memory (MB) | peak RSS (MB) | params |")
ALIGN = "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"


def table_rows(results: Sequence[Result], table: str) -> List[str]:
    rows = []
    ok = [r for r in results if r["table"] == table and r.get("status") == "ok"]
    ref = ok[0] if ok else None  # the first successful row of the table
    for r in results:
        if r["table"] != table:
            continue
        if r["status"] != "ok":
            rows.append(f"| {r['preset']} | {r.get('batch', '-')} × {r.get('tgt', '-')} | {r['status']} | - | - | - "
                        f"| - | - | - | - | - | - |")
            continue
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}×"
        rss = f"{r['rss_mb']:,.0f}" if r.get("rss_mb") is not None else "n/a (in-process)"
        held = ", ".join(f"{m:,}" for m in r["memory_held"]) or "-"
        rows.append(f"| {r['preset']} | {r['batch']} × {r['tgt']} | {r['layers']} × {r['dim']} | "
                    f"{','.join(map(str, r['attn_layers'])) or 'none'} | {r['max_memory']:,} | {held} | "
                    f"{r['tokens_per_s']:,.0f} | {r['median_tokens_per_s']:,.0f} | {ratio} | {r['peak_mb']:,.1f} | "
                    f"{rss} | {r['params'] / 1e6:.2f}M |")
    return rows


def render_report(opts: Namespace, results: Sequence[Result], command: str,
                  load: Tuple[float, float] = (float("nan"), float("nan"))) -> str:
    device = torch.device(opts.device)
    lines = [
        "## SHA-RNN training benchmark",
        "",
        *run_header(command, device, opts.dtype, load,
                    "in-process" if opts.in_process else "one fresh subprocess per row", "; rerun on an idle host"),
        f"- random tokens, V {opts.vocab:,}; step = forward over the carried streams + lm_loss + backward + grad-norm "
        f"clip {CLIP_NORM} + lamb_torch (lr {LR}, --min-trust {MIN_TRUST}, --trust-denominator update_norm, "
        f"--weight-decay {WEIGHT_DECAY})",
        f"- attention memories filled to W by ceil(W / T) no-grad forwards, then {opts.warmup} warm-up and "
        f"{opts.steps} timed training steps; tokens/s = B·T / step time",
        f"- peak tensor memory: {memory_description(device).replace('warm-up steps', 'warm-up training steps')}"
        + (f"; peak RSS: {RSS_DESCRIPTION}" if device.type == "cpu" else ""),
    ]
    if "presets" in opts.tables:
        lines += ["", "### Presets", "", HEADER.format(ref="vs first row"), ALIGN, *table_rows(results, "presets")]
    if "memory" in opts.tables:
        lines += ["", f"### Attention memory length W ({opts.memory_preset})", "", HEADER.format(ref="vs first row"),
                  ALIGN, *table_rows(results, "memory")]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    return bench_main(__file__, argv, parse_bench_args, RESULT_PREFIX, iter_configs, run_spec, run_isolated,
                      render_report)


if __name__ == "__main__":
    sys.exit(main())
