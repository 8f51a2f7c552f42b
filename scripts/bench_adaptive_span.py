#!/usr/bin/env python
"""Adaptive-span training cost: small vs large learned spans vs a fixed span, at the same maximum span L.

Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers" (arXiv 1905.07799), Sec. 3 and Fig. 3: a head's
span z·L only costs what it uses, because each layer trims its keys/values and cache to the largest span of its
heads (spec adaptive_span.md §1.3-§1.5: computed window L_pos = L - trim, trim a multiple of 64; attention cost per
layer ∝ M·(M + L_pos)·d per head; cache C = L_pos + 64). This bench measures that saving on ``adaptive_span_lm``:

* ``small``  -- adaptive span, every z = 0: the soft mask keeps distances 1..R, trimming leaves L_pos = 64;
* ``large``  -- adaptive span, every z = 1: L_pos = L (mask and renormalisation still applied);
* ``fixed``  -- ``--fixed-span``: every head attends to all L positions, no mask (the paper's baseline);
* ``z=F``    -- adaptive span with every z = F (e.g. ``z=0.125``), for intermediate points.

Each row is one training configuration built the way ``fairseq-train`` builds it (``--task streaming_lm``,
``--criterion lm_loss``, a ``dict.txt`` of ``--vocab`` entries) and trained by fairseq's ``Trainer``
(``scripts/benchrow.py``) on Zipf(1) tokens as B streams of M tokens with the per-layer caches carried from step to
step (the decoder's "train" stream). A step is forward, ``lm_loss`` (mean NLL + the span loss), backward, and the
paper's optimizer (``--optimizer adagrad_clip``, lr 0.07, per-tensor clip 0.03). z is pinned: after every
optimizer step it is reset to the configured value (a real run clamps it to [0, 1] there), so every step computes
the same window; its gradient is still computed. Before timing, the caches are filled by no-grad forwards
(ceil(C / M) segments) and ``--warmup`` training steps run; tokens/s = B·M / step time (fastest of ``--steps``, the
``timeit`` convention on a shared machine; the median is printed too).

Reported per row: L, the computed window L_pos and the cache length C of every layer, the forward attention GFLOP of
one step (``decoder.attention_gflop(B, M)``: content, position and value products over the materialised
M x (L_pos + M) skew layout; backward is about twice that), tokens/s, and peak memory over the warm-up training
steps (caches full): on CUDA ``torch.cuda.max_memory_allocated``; on CPU (a) the maximum of live tensor bytes in
PyTorch's CPU allocator replayed from ``torch.profiler`` events and (b) the peak RSS of the worker process
(``resource.getrusage``), each configuration in a fresh subprocess unless ``--in-process``.

A second table compares the op implementations (``--attn-impl skew``, the strided skew layout, against ``blocked``,
the same layout per block of query rows over the block's own keys, ``fused``, blocked's layout per group of heads
on cache-sized tiles with a hand-written backward (``auto`` on CPU for large scores), and ``naive``, which gathers
every query's L-key window explicitly: O(M·L·d) memory) at a moderate size (``--impl-attn-span``,
``--impl-tgt-len``).

    python scripts/bench_adaptive_span.py            # CPU defaults (about 1.5 min on 2 idle cores): enwik8_small cut to
                                                     # 2 layers, H 256, 4 heads, B 1, M 512, L 8192
    python scripts/bench_adaptive_span.py --quick    # tiny sizes (the test)
    python scripts/bench_adaptive_span.py --device cuda --dtype bf16 --preset adaptive_span_enwik8 \\
        --batch-size 8                               # the paper's enwik8 model (12 layers, H 512), 8 streams per GPU
"""

import argparse
import math
import os
import sys
from argparse import Namespace
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run as `python scripts/bench_adaptive_span.py` from a checkout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/benchlib.py
from benchlib import (RSS_DESCRIPTION, Result, add_stream_run_arguments, bench_main,  # noqa: E402
                      measure_stream_training, memory_description, parse_stream_args, run_header, run_worker)
from benchrow import STREAM_TASK, FairseqRow  # noqa: E402

NAMED_CONFIGS = {"small": 0.0, "large": 1.0, "fixed": None}  # z (None: --fixed-span)
DEFAULT_CONFIGS = ("small", "large", "fixed")
IMPLS = ("skew", "blocked", "fused", "naive")
TABLES = ("main", "impls")
ENWIK8_VOCAB = 205  # dictionary entries incl. fairseq's 4 specials (the preset docstrings' enwik8 vocabulary)
LR, ADAGRAD_CLIP = 0.07, 0.03  # the paper's scripts: --lr 0.07 --grad-clip 0.03 (adagrad)
CPU_DEFAULTS = dict(layers=2, batch_size=1)
CUDA_DEFAULTS = dict(layers=None, batch_size=8)  # None: the preset's depth
QUICK = dict(preset="adaptive_span_tiny", layers=1, batch_size=1, tgt_len=16, attn_span=256, vocab=32, steps=2,
             warmup=1, impl_attn_span=128, impl_tgt_len=8)
NORMAL = dict(preset="adaptive_span_enwik8_small", tgt_len=512, attn_span=8192, vocab=ENWIK8_VOCAB, steps=3,
              warmup=1, impl_attn_span=1024, impl_tgt_len=256)
RESULT_PREFIX = "BENCH_SPAN_RESULT "
MEMORY_WINDOW = "bench_span_warmup"


# ====================================================================================================================
# Command line
# ====================================================================================================================

def parse_config_name(name: str) -> Optional[float]:
    """small -> 0.0, large -> 1.0, fixed -> None, z=F -> F (in [0, 1])."""
    if name in NAMED_CONFIGS:
        return NAMED_CONFIGS[name]
    if name.startswith("z="):
        try:
            z = float(name[2:])
        except ValueError:
            z = -1.0
        if 0.0 <= z <= 1.0:
            return z
    raise argparse.ArgumentTypeError(f"unknown config {name!r}: choose small, large, fixed or z=F with 0 <= F <= 1")


def _names(choices: Optional[Sequence[str]] = None):
    def parse(text: str) -> List[str]:
        names = [v for v in text.replace(",", " ").split()]
        if not names:
            raise argparse.ArgumentTypeError("empty list")
        for name in names:
            if choices is None:
                parse_config_name(name)
            elif name not in choices:
                raise argparse.ArgumentTypeError(f"unknown {name!r}; choose from {choices}")
        return names
    return parse


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=None, help=f"adaptive_span_lm arch preset (default {NORMAL['preset']})")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default: 2 on CPU, the preset's on CUDA; 0 = the preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="streams B (default: 1 on CPU, 8 on CUDA)")
    p.add_argument("--tgt-len", type=int, default=None, help=f"segment length M (default {NORMAL['tgt_len']})")
    p.add_argument("--attn-span", type=int, default=None, help=f"maximum span L (default {NORMAL['attn_span']})")
    p.add_argument("--vocab", type=int, default=None, help=f"dictionary size incl. 4 specials (default "
                                                            f"{ENWIK8_VOCAB}, enwik8)")
    p.add_argument("--configs", type=_names(), default=list(DEFAULT_CONFIGS),
                   help="comma-separated rows of the main table: small (z=0), large (z=1), fixed, z=F")
    p.add_argument("--attn-impl", choices=IMPLS, default=None,
                   help="op implementation of the main table (default: fused on CPU, skew on CUDA)")
    p.add_argument("--tables", type=_names(TABLES), default=list(TABLES),
                   help="main (span configs) and/or impls (skew vs blocked vs fused vs naive at --impl-attn-span / "
                        "--impl-tgt-len)")
    p.add_argument("--impl-configs", type=_names(), default=["small", "large"], help="span configs of the impls "
                                                                                       "table")
    p.add_argument("--impl-attn-span", type=int, default=None,
                   help=f"L of the impls table (default {NORMAL['impl_attn_span']}; naive needs O(B·K·M·L·d) "
                        f"memory)")
    p.add_argument("--impl-tgt-len", type=int, default=None, help=f"M of the impls table (default "
                                                                   f"{NORMAL['impl_tgt_len']})")
    add_stream_run_arguments(p, QUICK, NORMAL, "cache")
    return p


def parse_bench_args(argv: Optional[Sequence[str]] = None) -> Namespace:
    opts = parse_stream_args(build_arg_parser(), argv, QUICK, NORMAL, CPU_DEFAULTS, CUDA_DEFAULTS)
    if opts.layers == 0:
        opts.layers = None
    if opts.attn_impl is None:
        opts.attn_impl = "fused" if opts.device == "cpu" else "skew"
    for name in ("batch_size", "tgt_len", "attn_span", "impl_attn_span", "impl_tgt_len"):
        if getattr(opts, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    return opts


# ====================================================================================================================
# Building a configuration like fairseq-train
# ====================================================================================================================

@dataclass(frozen=True)
class Shape:
    batch: int
    tgt: int
    span: int
    vocab: int


def table_shape(opts: Namespace, table: str) -> Shape:
    if table == "impls":
        return Shape(opts.batch_size, opts.impl_tgt_len, opts.impl_attn_span, opts.vocab)
    return Shape(opts.batch_size, opts.tgt_len, opts.attn_span, opts.vocab)


def row_flags(opts: Namespace, config: str, impl: str, shape: Shape) -> List[str]:
    z = parse_config_name(config)
    flags = [*STREAM_TASK, "--tokens-per-sample", str(shape.tgt), "--batch-size", str(shape.batch), "--arch",
             opts.preset, "--optimizer", "adagrad_clip", "--lr", str(LR), "--adagrad-clip", str(ADAGRAD_CLIP),
             "--attn-span", str(shape.span), "--attn-impl", impl]
    if opts.layers is not None:
        flags += ["--decoder-layers", str(opts.layers)]
    flags += ["--fixed-span"] if z is None else ["--adapt-span-init", repr(z)]
    return flags


# ====================================================================================================================
# Training steps: fairseq's Trainer (scripts/benchrow.py) with the spans pinned
# ====================================================================================================================

class PinnedSpanRow(FairseqRow):
    """A row of fairseq's Trainer (forward over the carried caches + lm_loss (NLL + span loss), backward, AdagradClip
    step) that resets every z to the configured value after each step (``FairseqRow.pin``)."""

    def __init__(self, opts: Namespace, config: str, impl: str, shape: Shape) -> None:
        super().__init__(row_flags(opts, config, impl, shape), shape.vocab, opts.device, opts.dtype, opts.seed)
        self.pin()  # z as built: the configured --adapt-span-init (none with --fixed-span)


def fill_caches(row: PinnedSpanRow) -> int:
    """No-grad training-mode forwards until every layer's cache holds its full length C; returns their number."""
    longest = max(layer.self_attn.window().cache for layer in row.model.decoder.layers)
    count = math.ceil(longest / row.length)
    row.fill(count)
    return count


def run_config(opts: Namespace, table: str, config: str, impl: str) -> Result:
    """Throughput, telemetry and peak memory of one (table, config, impl), in this process: build, fill the caches,
    the warm-up steps (peak memory) and the timed steps."""
    shape = table_shape(opts, table)
    result: Result = {"table": table, "config": config, "impl": impl, "batch": shape.batch, "tgt": shape.tgt,
                      "span": shape.span, "vocab": shape.vocab}

    def build_and_fill() -> Tuple[PinnedSpanRow, int]:
        row = PinnedSpanRow(opts, config, impl, shape)
        return row, fill_caches(row)

    def telemetry(row: PinnedSpanRow) -> Result:
        decoder = row.model.decoder
        windows = [layer.self_attn.window() for layer in decoder.layers]
        stats = decoder.log_stats()
        return dict(
            l_pos=[w.span for w in windows], cache=[w.cache for w in windows],
            cache_held=[s.length for s in decoder.stream_state("train").layers],
            attn_gflop=decoder.attention_gflop(shape.batch, shape.tgt), span_avg=stats.get("span_avg"),
            layers=len(decoder.layers), heads=decoder.layers[0].self_attn.num_heads, dim=decoder.embed_dim)

    return measure_stream_training(result, opts, build_and_fill, shape.batch * shape.tgt, MEMORY_WINDOW, telemetry)


# ====================================================================================================================
# Driver: one subprocess per configuration
# ====================================================================================================================

def iter_configs(opts: Namespace) -> Iterator[str]:
    """Worker specs ``TABLE|CONFIG|IMPL``."""
    if "main" in opts.tables:
        for config in opts.configs:
            yield f"main|{config}|{opts.attn_impl}"
    if "impls" in opts.tables:
        for config in opts.impl_configs:
            for impl in IMPLS:
                yield f"impls|{config}|{impl}"


def run_spec(opts: Namespace, spec: str) -> Dict[str, Any]:
    table, config, impl = spec.split("|")
    return run_config(opts, table, config, impl)


def run_isolated(argv: Sequence[str], spec: str, timeout: Optional[float]) -> Result:
    """One configuration in a fresh Python process running this script with ``--worker``."""
    table, config, impl = spec.split("|")
    return run_worker(__file__, argv, spec, {"table": table, "config": config, "impl": impl}, RESULT_PREFIX,
                      timeout, spec)


# ====================================================================================================================
# Report
# ====================================================================================================================

def config_label(config: str) -> str:
    z = parse_config_name(config)
    if z is None:
        return "fixed span"
    return f"adaptive, z = {z:g}" + (f" ({config})" if config in NAMED_CONFIGS else "")


def per_layer(values: Sequence[int]) -> str:
    """'64 ×2' when every layer has the same value, else the comma-separated list."""
    return f"{values[0]:,} ×{len(values)}" if len(set(values)) == 1 else ", ".join(f"{v:,}" for v in values)


HEADER = ("| config | impl | B × M | L | L_pos per layer | cache C per layer | attn GFLOP / step (fwd) | "
          "tokens/s (fastest) | tokens/s (median) | {ref} | peak tensor memory (MB) | peak RSS (MB) | params |")
ALIGN = "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"


def table_rows(results: Sequence[Dict[str, Any]], table: str) -> List[str]:
    rows = []
    for r in results:
        if r["table"] != table:
            continue
        shape = f"{r['batch']} × {r['tgt']} | {r['span']:,}" if "span" in r else "- | -"
        head = f"| {config_label(r['config'])} | {r['impl']} | {shape} |"
        if r["status"] != "ok":
            rows.append(f"{head} {r['status']} | - | - | - | - | - | - | - | - |")
            continue
        if table == "main":  # the fixed-span row of the same implementation
            ref = next((x for x in results if x["table"] == table and x["impl"] == r["impl"]
                        and x.get("status") == "ok" and parse_config_name(x["config"]) is None), None)
        else:  # the skew row of the same span configuration
            ref = next((x for x in results if x["table"] == table and x["config"] == r["config"]
                        and x.get("status") == "ok" and x["impl"] == "skew"), None)
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}×" if ref is not None else "n/a"
        rss = f"{r['rss_mb']:,.0f}" if r.get("rss_mb") is not None else "n/a (in-process)"
        rows.append(f"{head} {per_layer(r['l_pos'])} | {per_layer(r['cache'])} | {r['attn_gflop']:.4g} | "
                    f"{r['tokens_per_s']:,.0f} | {r['median_tokens_per_s']:,.0f} | {ratio} | {r['peak_mb']:,.1f} | "
                    f"{rss} | {r['params'] / 1e6:.2f}M |")
    return rows


def model_description(results: Sequence[Dict[str, Any]], opts: Namespace) -> str:
    r = next((x for x in results if x.get("status") == "ok"), None)
    if r is None:
        return f"`{opts.preset}` (no configuration succeeded)"
    return (f"`{opts.preset}`{f' with --decoder-layers {opts.layers}' if opts.layers else ''}: {r['layers']} "
            f"layers, H {r['dim']}, {r['heads']} heads, V {r['vocab']:,}")


def render_report(opts: Namespace, results: Sequence[Dict[str, Any]], command: str,
                  load: Tuple[float, float] = (float("nan"), float("nan"))) -> str:
    device = torch.device(opts.device)
    lines = [
        "## Adaptive-span training benchmark",
        "",
        *run_header(command, device, opts.dtype, load,
                    "in-process" if opts.in_process else "one fresh subprocess per row", "; rerun on an idle host"),
        f"- model {model_description(results, opts)}; random tokens; step = forward over the carried caches + "
        f"lm_loss (NLL + span loss) + backward + AdagradClip (lr {LR}, clip {ADAGRAD_CLIP}), z reset to its "
        f"configured value after every step",
        f"- caches filled by no-grad forwards, then {opts.warmup} warm-up and {opts.steps} timed training steps; "
        f"tokens/s = B·M / step time; attn GFLOP: decoder.attention_gflop(B, M) (forward, skew layout "
        f"M x (L_pos + M), or M x (L_pos + R) per block of R rows for blocked; backward ≈ 2× more)",
        f"- peak tensor memory: {memory_description(device).replace('warm-up steps', 'warm-up training steps')}"
        + (f"; peak RSS: {RSS_DESCRIPTION}" if device.type == "cpu" else ""),
    ]
    if "main" in opts.tables:
        lines += ["", f"### Span configurations at L = {opts.attn_span:,} (--attn-impl {opts.attn_impl})", "",
                  HEADER.format(ref="vs fixed"), ALIGN, *table_rows(results, "main")]
    if "impls" in opts.tables:
        lines += ["", f"### Op implementations: skew vs blocked vs fused vs naive at L = {opts.impl_attn_span:,}, M = "
                      f"{opts.impl_tgt_len}", "", HEADER.format(ref="vs skew"), ALIGN, *table_rows(results, "impls")]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    return bench_main(__file__, argv, parse_bench_args, RESULT_PREFIX, iter_configs, run_spec, run_isolated,
                      render_report)


if __name__ == "__main__":
    sys.exit(main())
