#!/usr/bin/env python
"""Transformer-XL throughput: our ``transformer_xl_lm`` kernels vs the original algorithm; streaming vs sliding eval.

Two tables (spec transformer_xl.md §6.4, §6.5, §12 item 9):

1. **Training** -- tokens/s (B*T per step of fairseq's ``Trainer``, ``scripts/benchrow.py``: forward, ``lm_loss``
   over the projected adaptive softmax, backward, clip 0.25, fairseq's Adam, the memory carried from step to step
   as in training) and peak memory, per (arch preset, implementation). Defaults: ``transformer_xl_tiny``
   (B 16, T 64, M 32, vocabulary 10,000) and ``transformer_xl_wiki103_nvidia_base`` at NVIDIA's tgt/mem 192/192,
   vocabulary 267,735, batch 2 (NVIDIA trains at 16-32 per GPU; batch 2 keeps a CPU run short).
2. **Evaluation** -- the paper's evaluation-speed comparison (Dai et al. 2019, Sec. 4.3 "1,874x faster"):
   *streaming* reads segments of T_eval tokens over a memory of M hidden states per layer (eval mode, no_grad,
   the wt103 base ``eval.py`` setting T 64 / M 640 by default); *sliding window* is the same model with mem_len 0
   re-encoding a window of M + T_eval tokens for every new block of T_eval tokens and scoring the last T_eval, so
   every predicted token attends over exactly the same span as in streaming (same_length and clamp_len off). The
   paper's vanilla baseline advances one token per window (stride 1), which is where its 363x-1,874x come from;
   here the stride is T_eval, so the expected gap is about (M + T_eval) / T_eval times smaller.

Implementations (one row each):

* ``sdpa``, ``shift`` (``naive`` on request) -- ours: ``transformer_xl_lm --attn-impl <impl>`` (batch-first, the
  zero-copy strided relative shift; ``sdpa`` feeds the shifted position scores to ``scaled_dot_product_attention``
  as the additive bias, ``shift`` computes explicit scores with a softmax in fp32).
* ``original`` -- the layer stack of kimiyoung/transformer-xl ``pytorch/mem_transformer.py`` reproduced in
  ``scripts/originals/transformer_xl.py`` (time-first, einsum scores, pad-and-view ``_rel_shift``), with our
  embedding, adaptive softmax and weights, so only the layer stack differs; a test checks equal features.

Every model is built the way ``fairseq-train`` builds it (``scripts/benchrow.py``: fairseq's training parser with
``--task streaming_lm`` over a temporary ``dict.txt`` of exactly ``--vocab`` entries, 4 specials included, the
registries, ``lm_loss``). Tokens are random, drawn from a Zipf(1) law over the dictionary ids (fairseq
dictionaries are sorted by frequency), so the adaptive-softmax clusters see a text-like share of tokens (about 80%
in the 20k head at 267,735 types) rather than the 93% tail share of uniform tokens. The same rows run in
``scripts/bench.py`` (every family, generation too): ``--model LABEL="--arch ... --mem-len M" --original LABEL``.
Each configuration runs in a fresh subprocess by default (``--in-process``
to disable); an out-of-memory configuration prints ``OOM`` in its row.

Peak memory (training) is measured over the warm-up steps, which always include at least one step with a full
memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the maximum of live tensor bytes in PyTorch's CPU
allocator replayed from ``torch.profiler`` (``profile_memory=True``) allocation/free events (weights, gradients,
Adam state, carried memory and activations; the model build's transients excluded). Throughput is tokens per
fastest step after warm-up (the ``timeit`` convention: slower repeats measure interference from other processes);
the median is printed too.

    python scripts/bench_transformer_xl.py                          # CPU defaults, a few minutes on 2 cores
    python scripts/bench_transformer_xl.py --quick                  # tiny sizes (the test)
    python scripts/bench_transformer_xl.py --device cuda --dtype fp16 --arch transformer_xl_wiki103_nvidia_base \\
        --batch-size 16 --eval-batch-size 16                        # NVIDIA's README shapes (§6.4, §6.5)
"""

import argparse
import math
import os
import sys
from argparse import Namespace
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run as `python scripts/bench_transformer_xl.py` from a checkout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/benchlib.py
from benchlib import (Result, add_run_arguments, apply_run_arguments, bench_main, fairseq_config,  # noqa: E402
                      measure, memory_description, run_header, run_worker, speed, timed, warm_up_peak)
from benchrow import STREAM_TASK, FairseqRow, dtype_flags, zipf_tokens  # noqa: E402
import fairseq_ext  # noqa: E402,F401  (registers transformer_xl_lm, streaming_lm, lm_loss)
from fairseq_ext.criterions.lm_loss import nll_sum  # noqa: E402

OURS = ("sdpa", "blocked", "shift", "naive")
IMPLS = OURS + ("original",)
DEFAULT_IMPLS = ("sdpa", "shift", "original")
DEFAULT_ARCHS = ("transformer_xl_tiny", "transformer_xl_wiki103_nvidia_base")
PROTOCOLS = ("stream", "sliding")
TABLES = ("train", "eval")
WT103_VOCAB = 267_735  # NVIDIA n_token (spec §3)
# Per-arch training defaults (batch, tgt_len, mem_len or None = the preset's, vocabulary incl. 4 specials).
ARCH_DEFAULTS = {
    "transformer_xl_tiny": dict(batch=16, tgt=64, mem=None, vocab=10_000),
    "transformer_xl_wiki103_nvidia_base": dict(batch=2, tgt=192, mem=192, vocab=WT103_VOCAB),
}
FALLBACK_DEFAULTS = dict(batch=2, tgt=None, mem=None, vocab=None)  # tgt = mem = the preset's mem_len
# Everything --quick shrinks (explicit flags still win).
QUICK = dict(arch=["transformer_xl_tiny"], batch_size=2, tgt_len=8, mem_len=8, vocab=64, steps=2, warmup=1,
             eval_tgt_len=4, eval_mem_len=8, eval_batch_size=1, eval_steps=2, eval_warmup=1)
NORMAL = dict(arch=list(DEFAULT_ARCHS), steps=3, warmup=2, eval_tgt_len=64, eval_mem_len=640, eval_batch_size=1,
              eval_steps=5, eval_warmup=1)
RESULT_PREFIX = "BENCH_XL_RESULT "
MEMORY_WINDOW = "bench_xl_warmup"
CLIP_NORM = 0.25  # original and NVIDIA scripts


# ====================================================================================================================
# Command line
# ====================================================================================================================

def _names(choices: Optional[Sequence[str]] = None):
    def parse(text: str) -> List[str]:
        names = [v for v in text.replace(",", " ").split()]
        unknown = sorted(set(names) - set(choices)) if choices is not None else []
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown or empty {unknown or text!r}; choose from {choices}")
        return names
    return parse


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", type=_names(), default=None,
                   help=f"comma-separated transformer_xl_lm presets (default: {','.join(DEFAULT_ARCHS)})")
    p.add_argument("--impls", type=_names(IMPLS), default=list(DEFAULT_IMPLS),
                   help=f"comma-separated subset of {IMPLS}: ours with --attn-impl <impl>, or the original algorithm")
    p.add_argument("--tables", type=_names(TABLES), default=list(TABLES), help="which tables to measure")
    p.add_argument("--batch-size", type=int, default=None, help="training streams B (default per arch: tiny 16, "
                                                                 "NVIDIA base 2)")
    p.add_argument("--tgt-len", type=int, default=None, help="training segment length T (default per arch: tiny "
                                                              "64, NVIDIA base 192)")
    p.add_argument("--mem-len", type=int, default=None, help="training memory M (default: NVIDIA base 192, else "
                                                              "the preset's)")
    p.add_argument("--vocab", type=int, default=None,
                   help=f"dictionary size incl. 4 specials (default: {WT103_VOCAB:,} for wiki103 presets, 10,000 "
                        f"for tiny, 204 for enwik8/text8)")
    p.add_argument("--steps", type=int, default=None, help=f"timed training steps (default {NORMAL['steps']})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed training steps (default {NORMAL['warmup']}; raised to ceil(M/T) + 1 so that the "
                        f"memory is full before timing and during one warm-up step)")
    p.add_argument("--eval-arch", type=_names(), default=None, help="presets of the evaluation table (default: "
                                                                     "--arch)")
    p.add_argument("--eval-tgt-len", type=int, default=None, help=f"T_eval (default {NORMAL['eval_tgt_len']})")
    p.add_argument("--eval-mem-len", type=int, default=None,
                   help=f"M of streaming evaluation; sliding windows are M + T_eval (default {NORMAL['eval_mem_len']})")
    p.add_argument("--eval-batch-size", type=int, default=None, help="evaluation streams (default 1)")
    p.add_argument("--eval-steps", type=int, default=None, help=f"timed evaluation segments / windows (default "
                                                                 f"{NORMAL['eval_steps']})")
    p.add_argument("--eval-warmup", type=int, default=None,
                   help="untimed evaluation steps (default 1; streaming adds ceil(M/T_eval) to fill the memory)")
    add_run_arguments(p, QUICK, "fp32, or fairseq's --bf16 / --fp16 (CUDA)")
    return p


def parse_bench_args(argv: Optional[Sequence[str]] = None) -> Namespace:
    opts = build_arg_parser().parse_args(argv)
    apply_run_arguments(opts)
    dtype_flags(opts.device, opts.dtype)  # fp16 / bf16 need CUDA
    for name, value in (QUICK if opts.quick else NORMAL).items():
        if getattr(opts, name, None) is None:
            setattr(opts, name, value)
    if opts.eval_arch is None:
        opts.eval_arch = list(opts.arch)
    if opts.steps < 1 or opts.eval_steps < 1 or opts.warmup < 0 or opts.eval_warmup < 0:
        raise SystemExit("--steps and --eval-steps must be >= 1, --warmup and --eval-warmup >= 0")
    return opts


# ====================================================================================================================
# Configurations and building the models like fairseq-train
# ====================================================================================================================

@dataclass(frozen=True)
class Shape:
    batch: int
    tgt: int
    mem: int
    vocab: int


def arch_defaults(arch: str) -> Dict[str, Any]:
    if arch in ARCH_DEFAULTS:
        return dict(ARCH_DEFAULTS[arch])
    vocab = WT103_VOCAB if "wiki103" in arch else 204 if ("enwik8" in arch or "text8" in arch) else 10_000
    return {**FALLBACK_DEFAULTS, "vocab": vocab}


def preset_mem_len(arch: str) -> int:
    return int(model_config(arch, ["--tokens-per-sample", "1"]).mem_len)


def train_shape(opts: Namespace, arch: str) -> Shape:
    d = arch_defaults(arch)
    mem = opts.mem_len if opts.mem_len is not None else d["mem"] if d["mem"] is not None else preset_mem_len(arch)
    tgt = opts.tgt_len if opts.tgt_len is not None else d["tgt"] if d["tgt"] is not None else max(mem, 1)
    return Shape(opts.batch_size or d["batch"], tgt, mem, opts.vocab or d["vocab"])


def eval_shape(opts: Namespace, arch: str, protocol: str) -> Shape:
    """stream: segments of T_eval over a memory of M; sliding: windows of M + T_eval, mem_len 0."""
    vocab = opts.vocab or arch_defaults(arch)["vocab"]
    t, m = opts.eval_tgt_len, opts.eval_mem_len
    if protocol == "stream":
        return Shape(opts.eval_batch_size, t, m, vocab)
    return Shape(opts.eval_batch_size, m + t, 0, vocab)


def train_warmup(opts: Namespace, shape: Shape) -> int:
    """Warm-up steps: at least ceil(M/T) + 1, so the last warm-up step and every timed one see a full memory."""
    return max(opts.warmup, math.ceil(shape.mem / shape.tgt) + 1 if shape.mem else 1)


def row_flags(arch: str, impl: str, shape: Shape) -> List[str]:
    """fairseq-train flags of one row (``original``: our layers are built with ``shift``, then replaced)."""
    return [*STREAM_TASK, "--tokens-per-sample", str(shape.tgt), "--batch-size", str(shape.batch), "--arch", arch,
            "--optimizer", "adam", "--lr", "2.5e-4", "--clip-norm", str(CLIP_NORM), "--mem-len", str(shape.mem),
            "--attn-impl", impl if impl in OURS else "shift"]


def model_config(arch: str, extra: Sequence[str] = ()):
    """``cfg.model`` of a preset without building anything (for the header and preset mem_len)."""
    return fairseq_config(["/nonexistent", "--task", "streaming_lm", "--arch", arch, *extra]).model


def build_row(opts: Namespace, arch: str, impl: str, shape: Shape) -> FairseqRow:
    """The row as fairseq-train builds and trains it; ``original``: the reproduction holding its weights."""
    return FairseqRow(row_flags(arch, impl, shape), shape.vocab, opts.device, opts.dtype, opts.seed,
                      original=impl == "original")


# ====================================================================================================================
# Training: fairseq's Trainer over the carried memory (scripts/benchrow.py)
# ====================================================================================================================

def run_train(opts: Namespace, arch: str, impl: str) -> Result:
    """Training throughput and peak memory of one (arch, impl), in this process."""
    shape = train_shape(opts, arch)
    result: Result = {"table": "train", "arch": arch, "impl": impl, "batch": shape.batch, "tgt": shape.tgt,
                      "mem": shape.mem, "vocab": shape.vocab, "warmup": train_warmup(opts, shape)}
    torch.manual_seed(opts.seed)

    def run() -> Result:
        row, peak = warm_up_peak(torch.device(opts.device), lambda: build_row(opts, arch, impl, shape),
                                 FairseqRow.train_step, train_warmup(opts, shape), MEMORY_WINDOW)
        times = timed(row.train_step, opts.steps, row.device)
        return {**speed(row.tokens, times), "peak_mb": peak / 2 ** 20,
                "params": sum(p.numel() for p in row.model.parameters())}

    return measure(result, opts.device, run)


# ====================================================================================================================
# Evaluation: streaming vs sliding window
# ====================================================================================================================

class Evaluator:
    """Scores blocks of T_eval tokens of one random stream per row: ``stream`` carries the memory across segments,
    ``sliding`` re-encodes the M previous tokens with every block (mem_len 0). Eval mode, no_grad."""

    def __init__(self, opts: Namespace, arch: str, impl: str, protocol: str) -> None:
        self.protocol, self.time_first = protocol, impl == "original"  # the original's outputs are (W, B, C)
        self.t, self.m = opts.eval_tgt_len, opts.eval_mem_len
        shape = eval_shape(opts, arch, protocol)
        row = build_row(opts, arch, impl, shape)
        self.model, self.device = row.model.eval(), row.device
        self.pad = row.task.dictionary.pad()
        self.fill = math.ceil(self.m / self.t) if protocol == "stream" else 0  # segments that fill the memory
        self.steps = self.fill + opts.eval_warmup + opts.eval_steps
        length = self.m + self.steps * self.t + 1
        gen = torch.Generator().manual_seed(opts.seed)
        self.tokens = zipf_tokens(shape.vocab, row.nspecial, (shape.batch, length), gen).to(self.device)  # (B, L)
        self.k = 0

    def window(self, k: int) -> Tuple[Tensor, Tensor]:
        """Inputs and targets (B, W) of step k: segment k (stream) or the M tokens before block k plus it."""
        end = self.m + (k + 1) * self.t
        start = end - self.t if self.protocol == "stream" else end - self.t - self.m
        return self.tokens[:, start:end], self.tokens[:, start + 1:end + 1]

    @torch.no_grad()
    def step(self) -> float:
        """Encode the next segment/window and return the NLL (nats) of its last T_eval targets."""
        src, tgt = self.window(self.k)
        self.k += 1
        out = self.model(src)[0]  # ours (B, W, C), the decoder carrying its "eval" memory; the original (W, B, C)
        if self.time_first:
            return float(nll_sum(self.model, (out[-self.t:], {}), tgt.t()[-self.t:], self.pad))
        return float(nll_sum(self.model, (out[:, -self.t:], {}), tgt[:, -self.t:], self.pad))


def run_eval(opts: Namespace, arch: str, impl: str, protocol: str) -> Result:
    shape = eval_shape(opts, arch, protocol)
    result: Result = {"table": "eval", "arch": arch, "impl": impl, "protocol": protocol, "batch": shape.batch,
                      "tgt": opts.eval_tgt_len, "mem": opts.eval_mem_len, "vocab": shape.vocab}
    torch.manual_seed(opts.seed)

    def run() -> Result:
        ev = Evaluator(opts, arch, impl, protocol)
        for _ in range(ev.fill + opts.eval_warmup):
            ev.step()
        times = timed(ev.step, opts.eval_steps, ev.device)
        return {**speed(shape.batch * opts.eval_tgt_len, times),
                "params": sum(p.numel() for p in ev.model.parameters())}

    return measure(result, opts.device, run)


# ====================================================================================================================
# Running configurations
# ====================================================================================================================

def iter_configs(opts: Namespace) -> Iterator[str]:
    """Worker specs: ``train:ARCH:IMPL`` and ``eval:ARCH:IMPL:PROTOCOL``."""
    if "train" in opts.tables:
        for arch in opts.arch:
            for impl in opts.impls:
                yield f"train:{arch}:{impl}"
    if "eval" in opts.tables:
        for arch in opts.eval_arch:
            for impl in opts.impls:
                for protocol in PROTOCOLS:
                    yield f"eval:{arch}:{impl}:{protocol}"


def run_spec(opts: Namespace, spec: str) -> Dict[str, Any]:
    table, arch, impl, *rest = spec.split(":")
    return run_train(opts, arch, impl) if table == "train" else run_eval(opts, arch, impl, rest[0])


def spec_stub(spec: str) -> Dict[str, Any]:
    table, arch, impl, *rest = spec.split(":")
    return {"table": table, "arch": arch, "impl": impl, **({"protocol": rest[0]} if rest else {})}


def run_isolated(argv: Sequence[str], spec: str, timeout: Optional[float]) -> Result:
    """One configuration in a fresh Python process running this script with ``--worker``."""
    return run_worker(__file__, argv, spec, spec_stub(spec), RESULT_PREFIX, timeout, spec)


# ====================================================================================================================
# Report
# ====================================================================================================================

def impl_label(impl: str) -> str:
    return "original (kimiyoung, reproduced)" if impl == "original" else f"ours ({impl})"


def arch_description(arch: str) -> str:
    try:
        m = model_config(arch, ["--tokens-per-sample", "1"])
    except Exception as exc:  # an unknown arch: its rows say ERROR, the header says why
        return f"`{arch}`: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}"
    heads = m.decoder_attention_heads
    head_dim = m.decoder_attention_head_dim or m.decoder_embed_dim // heads
    softmax = f"adaptive softmax {m.adaptive_softmax_cutoff} (div_val {m.adaptive_softmax_factor})" \
        if m.adaptive_softmax_cutoff else "full softmax"
    return (f"`{arch}`: {m.decoder_layers} layers, d {m.decoder_embed_dim}, {heads} x {head_dim} heads, FFN "
            f"{m.decoder_ffn_embed_dim}, dropout {m.dropout} / dropatt {m.attention_dropout}, "
            f"{'pre' if m.decoder_normalize_before else 'post'}-LN, {softmax}")


def _find(results: Sequence[Dict[str, Any]], **keys: Any) -> Optional[Dict[str, Any]]:
    return next((r for r in results if all(r.get(k) == v for k, v in keys.items())), None)


def _ok(r: Optional[Dict[str, Any]]) -> bool:
    return r is not None and r.get("status") == "ok"


def _config_label(r: Dict[str, Any]) -> str:
    vocab = f", V {r['vocab']:,}" if r.get("vocab") else ""
    return f"{r['arch']}{vocab}"


def train_rows(results: Sequence[Dict[str, Any]]) -> List[str]:
    rows = []
    for r in results:
        if r["table"] != "train":
            continue
        shape = f"{r.get('batch', '-')} × {r.get('tgt', '-')} / {r.get('mem', '-')}"
        head = f"| {_config_label(r)} | {impl_label(r['impl'])} | {shape} |"
        if r["status"] != "ok":
            rows.append(f"{head} {r['status']} | - | - | - | - | - |")
            continue
        ref = _find(results, table="train", arch=r["arch"], impl="original")
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}×" if _ok(ref) else "n/a"
        rows.append(f"{head} {r['tokens_per_s']:,.0f} | {r['median_tokens_per_s']:,.0f} | {ratio} | "
                    f"{r['peak_mb']:,.1f} | {r['step_ms']:,.0f} / {r['median_step_ms']:,.0f} | "
                    f"{r['params'] / 1e6:.2f}M |")
    return rows


def eval_rows(results: Sequence[Dict[str, Any]]) -> List[str]:
    rows, seen = [], set()
    for r in results:
        if r["table"] != "eval" or (r["arch"], r["impl"]) in seen:
            continue
        seen.add((r["arch"], r["impl"]))
        stream = _find(results, table="eval", arch=r["arch"], impl=r["impl"], protocol="stream")
        sliding = _find(results, table="eval", arch=r["arch"], impl=r["impl"], protocol="sliding")
        any_r = stream or sliding
        span = f"{any_r.get('batch', '-')} × {any_r.get('tgt', '-')} / {any_r.get('mem', '-')}"
        cells = []
        for x in (stream, sliding):
            cells += [f"{x['tokens_per_s']:,.1f}", f"{x['median_tokens_per_s']:,.1f}"] if _ok(x) \
                else [x["status"] if x is not None else "-", "-"]
        speedup = f"{stream['tokens_per_s'] / sliding['tokens_per_s']:.1f}×" if _ok(stream) and _ok(sliding) \
            else "n/a"
        ref = _find(results, table="eval", arch=r["arch"], impl="original", protocol="stream")
        vs_orig = f"{stream['tokens_per_s'] / ref['tokens_per_s']:.2f}×" if _ok(stream) and _ok(ref) else "n/a"
        rows.append(f"| {_config_label(any_r)} | {impl_label(r['impl'])} | {span} | {' | '.join(cells)} | "
                    f"{speedup} | {vs_orig} |")
    return rows


def render_report(opts: Namespace, results: Sequence[Dict[str, Any]], command: str,
                  load: Tuple[float, float] = (float("nan"), float("nan"))) -> str:
    device = torch.device(opts.device)
    archs = list(dict.fromkeys([*(opts.arch if "train" in opts.tables else []),
                                *(opts.eval_arch if "eval" in opts.tables else [])]))
    lines = [
        "## Transformer-XL benchmark",
        "",
        *run_header(command, device, opts.dtype, load,
                    "in-process" if opts.in_process else "one fresh subprocess per row and protocol",
                    ", and every multi-threaded op can wait for a descheduled thread; rerun on an idle host or with "
                    "--threads 1"),
        *[f"- model {arch_description(a)}" for a in archs],
        "- implementations: `ours (impl)` = transformer_xl_lm --attn-impl impl; `original` = the layer stack of "
        "kimiyoung/transformer-xl pytorch/mem_transformer.py reproduced (time-first, one qkv_net on cat(mem, h), "
        "pad-and-view _rel_shift, fp32 masked_fill, einsum), same weights and parameter count, our adaptive "
        "input/softmax modules; random Zipf(1) tokens",
    ]
    if "train" in opts.tables:
        lines += [
            "",
            "### Training (fairseq Trainer: forward + lm_loss over the adaptive softmax + backward + clip 0.25 + "
            "fairseq's Adam, memory carried)",
            "",
            f"{opts.steps} timed steps after max({opts.warmup}, ceil(M/T) + 1) warm-up steps; tokens/s = B·T / step "
            f"time (fastest and median); peak memory: {memory_description(device)}.",
            "",
            "| config | implementation | B × T / M | tokens/s (fastest) | tokens/s (median) | vs original | "
            "peak memory (MB) | step ms (min / median) | params |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
            *train_rows(results),
        ]
    if "eval" in opts.tables:
        lines += [
            "",
            "### Evaluation: streaming with memory vs sliding window (eval mode, no_grad, same span per token)",
            "",
            f"stream: segments of T_eval over a memory of M (first ceil(M/T_eval) segments fill it, untimed); "
            f"sliding: mem_len 0, a window of M + T_eval tokens re-encoded for every block of T_eval, the last "
            f"T_eval scored. {opts.eval_warmup} warm-up + {opts.eval_steps} timed steps; tokens/s = B·T_eval / step "
            f"time. same_length and clamp_len off. The paper's 1,874× compares against a stride-1 vanilla model.",
            "",
            "| config | implementation | B × T_eval / M | stream tokens/s (fastest) | stream (median) | "
            "sliding tokens/s (fastest) | sliding (median) | stream speed-up | stream vs original |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
            *eval_rows(results),
        ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    return bench_main(__file__, argv, parse_bench_args, RESULT_PREFIX, iter_configs, run_spec, run_isolated,
                      render_report)


if __name__ == "__main__":
    sys.exit(main())
