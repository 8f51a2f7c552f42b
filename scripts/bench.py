#!/usr/bin/env python
"""One benchmark of every family: training, evaluation and generation speed and peak memory, per sequence length.

Each model is a row of fairseq-train flags (``--arch`` plus any model, optimizer and dropout flags), so an
original's configuration can be given exactly; ``{T}`` (and ``{W}``) in the flags is replaced by the row's segment
length (e.g. ``--mem-len {T}``). The default set (``--models families``, ``scripts/families.py``) is every family and
the composed hybrid at a matched size: 4 layers, d 256, FFN 1024, 8 heads (SHA-RNN: 4 LSTM layers of 256, Boom
1024, one attention layer), memory / span / attention window = T; the table states each model's parameter count,
in all and in the blocks. Every row is built the way
``fairseq-train`` builds it (fairseq's training parser over a temporary ``dict.txt`` of ``--vocab`` entries,
``--task streaming_lm``, ``--criterion lm_loss``) and measured on tokens drawn from a Zipf(1) law over the
dictionary (fairseq dictionaries are sorted by frequency, so adaptive-softmax clusters see a text-like share):

* **train**: tokens/s of ``fairseq.trainer.Trainer.train_step`` (forward over the carried streams, ``lm_loss``,
  backward, fairseq's optimizer step with ``--clip-norm``, fp16/bf16 as fairseq runs them), B x T per step, and the
  peak memory of the warm-up steps (CUDA: ``torch.cuda.max_memory_allocated``; CPU: live bytes of PyTorch's
  allocator replayed from ``torch.profiler`` events), which include at least one step with a full memory;
* **stream**: evaluation tokens/s of the streaming protocol (eval mode, no_grad, B streams of T-token segments with
  the state carried; a model that carries nothing reads non-overlapping segments);
* **sliding**: scored tokens/s of ``fairseq-eval-lm --context-window T/2`` (windows of T tokens scoring their last
  T/2), for models that carry no state (the protocol does not apply to the others: "n/a");
* **gen**: new tokens/s of greedy incremental decoding (one stream, G = ``--gen-tokens`` tokens, fairseq's
  ``incremental_state`` and ``get_normalized_probs``) after a prompt of min(16, T/4) tokens (short) or T - G
  tokens (long: the last new token sees a whole segment).

Rows run in a fresh subprocess each (``--in-process`` to disable); ``--repeats R`` runs the whole list R times,
interleaved (row 1, row 2, ..., row 1, ...), so a ratio between two rows is fair on a noisy machine; the table
shows the best run of each (the ``timeit`` convention) and the JSON keeps every run with the 1-minute load average
before and after it, and the machine. An out-of-memory row prints ``OOM``. Written to ``--out``: ``bench.json``,
``bench.md`` (the table) and, over more than one length, ``bench.png`` (training tokens/s and peak memory versus T).

    python scripts/bench.py                                   # every family, T 512 and 1024, CPU fp32
    python scripts/bench.py --quick                           # tiny presets, a minute on 2 cores (the test)
    python scripts/bench.py --lengths 512,1024,2048,4096,8192,16384 --device cuda --dtype bf16
    python scripts/bench.py --models none --original xl --model "xl=--arch transformer_xl_lm --decoder-layers 4 \\
        --decoder-embed-dim 256 --decoder-attention-heads 8 --decoder-ffn-embed-dim 1024 --mem-len 128 \\
        --dropout 0.1 --adaptive-softmax-cutoff 2000,8000 --optimizer adam" --lengths 128 --batch-size 8 --vocab 20000

``--original LABEL`` adds the row ``LABEL-original``: the same flags and weights run through a reproduction of the
original code's model (``scripts/originals``: the ALiBi fork's materialised bias mask on stock fairseq layers,
Transformer-XL's ``mem_transformer.py``, SHA-RNN's ``model.py``; for adaptive span fairseq's own port of the
original, ``fairseq.examples.adaptive_span``),
trained by the same ``Trainer``, interleaved with LABEL, and the table ends with ours / original ratios (train and
stream, best run and medians, and the range over the interleaved pairs; the reproductions have no incremental
decoding). ``--pin-spans`` resets every adaptive span to its initial value (``--adapt-span-init``) after each
training step, in ours and in the original alike: the steps still compute the spans' gradients and updates, but
the windows, hence the work, stay those of the initial spans (Adagrad's first steps move a span by lr x its maximum,
and the two sides learn different spans: ours adds the span loss and renormalises).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run as `python scripts/bench.py` from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/benchlib.py
from benchlib import (DTYPE_FLAGS, Result, bench_command, device_description, dtype_flags, measure,  # noqa: E402
                      memory_description, run_worker, timed, warm_up_peak)
from benchrow import STREAM_TASK, FairseqRow  # noqa: E402
from families import TINY, family_flags, fill, model_flag  # noqa: E402

FAMILIES = family_flags(layers=4, dim=256, heads=8)
MODEL_SETS = {"families": FAMILIES, "tiny": TINY}
METRICS = ("train", "stream", "sliding", "gen_short", "gen_long")
SHORT_PROMPT = 16
NORMAL = dict(models=["families"], lengths=[512, 1024], batch_size=4, vocab=10000, steps=3, warmup=2, gen_tokens=32)
QUICK = dict(models=["tiny"], lengths=[16, 32], batch_size=2, vocab=64, steps=1, warmup=1, gen_tokens=4)
TRAIN_FLAGS = ["--optimizer", "adam", "--lr", "2.5e-4", "--clip-norm", "0.25"]  # before the row's own flags
RESULT_PREFIX = "BENCH_RESULT "
ORIGINAL_SUFFIX = "-original"
ORIGINAL_METRICS = ("train", "stream")  # what a reproduction is timed on (Transformer-XL's and SHA-RNN's have no
#                                        incremental decoding; the ALiBi fork's generation is stock fairseq's)
MEMORY_WINDOW = "bench_warmup"


# ====================================================================================================================
# Command line: which rows
# ====================================================================================================================

def _ints(text: str) -> List[int]:
    values = [int(v) for v in text.replace(",", " ").split()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers, got {text!r}")
    return values


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None,
                   help=f"rows from the named sets ({', '.join(MODEL_SETS)}) or single names of them, e.g. "
                        f"'families' or 'alibi sha_rnn' (default families; --quick: tiny)")
    p.add_argument("--model", action="append", default=[], metavar="LABEL=FLAGS",
                   help="a row of fairseq-train flags (--arch and any others; {T} = the segment length); "
                        "repeatable, added after --models (give --models none for only these)")
    p.add_argument("--original", action="append", default=[], metavar="LABEL",
                   help="also time LABEL's row as the original code's algorithm (scripts/originals: alibi_lm, "
                        "transformer_xl_lm, sha_rnn_lm and adaptive_span_lm rows), interleaved with it as row "
                        "LABEL-original; repeatable")
    p.add_argument("--pin-spans", action="store_true",
                   help="reset every adaptive span to its initial value after each training step (ours and the "
                        "original), so a ratio compares the same windows; rows without spans are unaffected")
    p.add_argument("--lengths", type=_ints, default=None, help="segment lengths T, one row each (default 512,1024)")
    p.add_argument("--batch-size", type=int, default=None, help="streams B of training and evaluation (default 4)")
    p.add_argument("--tokens-per-batch", type=int, default=None, metavar="N",
                   help="B = max(1, N // T) at every length T instead of --batch-size (a sweep at a constant "
                        "number of tokens per step)")
    p.add_argument("--vocab", type=int, default=None, help="dictionary entries incl. 4 specials (default 10000)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; peak memory over them)")
    p.add_argument("--gen-tokens", type=int, default=None, help="generated tokens G per measurement (default 32)")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"comma list of {', '.join(METRICS)}")
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs of the whole list")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="TF",
                   help="the device's measured dense matmul TFLOP/s (scripts/matmul_peak.py): adds the column "
                        "MFU = training tokens/s x 6 x matmul parameters / TF (attention products not counted)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPE_FLAGS), default="fp32", help="fairseq's --bf16 / --fp16")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="bench-out", help="directory of bench.json and bench.md")
    p.add_argument("--quick", action="store_true", help="tiny presets and sizes (the test): " +
                   ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--in-process", action="store_true", help="every row in this process (default: a fresh "
                                                              "subprocess per row and run)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per row and run (subprocesses)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: one table, JSON and plot (in --out) from earlier runs' bench.json files of the "
                        "same device, precision, vocabulary and streams; a row (model, T) that ran ok in a later "
                        "file replaces the earlier one (e.g. lengths rerun alone with a longer --timeout)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one row index, JSON result
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    opts = build_arg_parser().parse_args(argv)
    for name, value in (QUICK if opts.quick else NORMAL).items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)
    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    opts.metrics = [m.strip() for m in opts.metrics.split(",") if m.strip()]
    unknown = sorted(set(opts.metrics) - set(METRICS))
    if unknown:
        raise SystemExit(f"--metrics: unknown {unknown}; choose from {', '.join(METRICS)}")
    if min(opts.batch_size, opts.steps, opts.warmup, opts.gen_tokens, opts.repeats) < 1:
        raise SystemExit("--batch-size, --steps, --warmup, --gen-tokens and --repeats must be >= 1")
    if opts.peak_tflops is not None and opts.peak_tflops <= 0:
        raise SystemExit("--peak-tflops must be > 0 (measure it with scripts/matmul_peak.py)")
    if opts.tokens_per_batch is not None and opts.tokens_per_batch < 1:
        raise SystemExit("--tokens-per-batch must be >= 1")
    dtype_flags(opts.device, opts.dtype)  # fp16 / bf16 need CUDA
    opts.rows = with_originals(model_rows(opts.models, opts.model, TINY if opts.quick else FAMILIES),
                               opts.original)
    return opts


def model_rows(names: Sequence[str], extra: Sequence[str], entries: Dict[str, str]) -> List[Tuple[str, str]]:
    """(label, flags template) of every model: the named sets or single ``entries`` (the families' default size, or
    their tiny presets under --quick), then each ``LABEL=FLAGS``."""
    rows: Dict[str, str] = {}
    for name in names:
        if name == "none":
            continue
        if name in MODEL_SETS:
            rows.update(MODEL_SETS[name])
        elif name in entries:
            rows[name] = entries[name]
        else:
            raise SystemExit(f"--models: unknown {name!r}; choose sets {', '.join(MODEL_SETS)}, none, or entries "
                             f"{', '.join(FAMILIES)}")
    for item in extra:
        label, flags = model_flag(item)
        rows[label] = flags
    if not rows:
        raise SystemExit("no models: give --models and/or --model")
    return list(rows.items())


def with_originals(rows: List[Tuple[str, str]], originals: Sequence[str]) -> List[Tuple[str, str, bool]]:
    """(label, flags template, run as the original) of every row: each row named by ``--original`` is followed by
    ``LABEL-original``, its flags run through the original code's algorithm."""
    labels = [label for label, _ in rows]
    unknown = sorted(set(originals) - set(labels))
    if unknown:
        raise SystemExit(f"--original {', '.join(unknown)}: not a row label (rows: {', '.join(labels)})")
    out: List[Tuple[str, str, bool]] = []
    for label, flags in rows:
        out.append((label, flags, False))
        if label in originals:
            check_original(label, flags)
            out.append((f"{label}{ORIGINAL_SUFFIX}", flags, True))
    return out


def check_original(label: str, flags: str) -> None:
    """Refuse ``--original LABEL`` before any run when LABEL's arch has no reproduction in scripts/originals."""
    import fairseq_ext  # noqa: F401  (registers the archs)
    from fairseq.models import ARCH_MODEL_REGISTRY
    from originals import ORIGINALS

    words = shlex.split(flags)
    arch = words[words.index("--arch") + 1]
    model = ARCH_MODEL_REGISTRY.get(arch)
    if model is None or not any(issubclass(model, cls) for cls, _ in ORIGINALS):
        raise SystemExit(f"--original {label}: no reproduction of the original code for --arch {arch}; "
                         f"scripts/originals has {', '.join(cls.__name__ for cls, _ in ORIGINALS)} "
                         f"(see its docstring for the other families)")


def row_list(opts: argparse.Namespace) -> List[Tuple[str, str, bool, int]]:
    """Every (label, flags template, original, T), model-major."""
    return [(label, flags, original, t) for label, flags, original in opts.rows for t in opts.lengths]


# ====================================================================================================================
# One row: build as fairseq-train does, then measure
# ====================================================================================================================

def batch_size(opts: argparse.Namespace, t: int) -> int:
    """Streams B at segment length T: ``--batch-size``, or max(1, N // T) under ``--tokens-per-batch N``."""
    return max(1, opts.tokens_per_batch // t) if opts.tokens_per_batch else opts.batch_size


def row_flags(opts: argparse.Namespace, flags: str, t: int) -> List[str]:
    """The fairseq-train flags of one row at segment length T (``FairseqRow`` adds the data, seed, device and
    precision flags); ``--max-tokens`` B x T sizes the ALiBi fork's bias buffer as its training run did."""
    b = batch_size(opts, t)
    return [*STREAM_TASK, "--tokens-per-sample", str(t), "--batch-size", str(b), "--max-tokens", str(b * t),
            *TRAIN_FLAGS, *shlex.split(fill(flags, t, t))]


def build_row(opts: argparse.Namespace, flags: str, t: int, original: bool = False) -> FairseqRow:
    row = FairseqRow(row_flags(opts, flags, t), opts.vocab, opts.device, opts.dtype, opts.seed, original)
    if opts.pin_spans:
        row.pin()
    return row


def run_row(opts: argparse.Namespace, index: int) -> Result:
    label, flags, original, t = row_list(opts)[index]
    result: Result = {"model": label, "T": t, "B": batch_size(opts, t), "flags": fill(flags, t, t),
                      "original": original}
    metrics = [m for m in opts.metrics if not original or m in ORIGINAL_METRICS]
    torch.manual_seed(opts.seed)

    def run() -> Result:
        bench, peak = warm_up_peak(torch.device(opts.device), lambda: build_row(opts, flags, t, original),
                                   FairseqRow.train_step, opts.warmup, MEMORY_WINDOW)
        out: Result = {"arch": bench.cfg.model._name, "params": bench.params[0], "layer_params": bench.params[1],
                       "flops_per_token": 6 * bench.matmul_params, "carries_state": bench.carries_state}
        tokens = bench.tokens
        if "train" in metrics:
            out.update(train=tokens / min(timed(bench.train_step, opts.steps, bench.device)), peak_mb=peak / 2 ** 20)
        bench.model.eval()
        with torch.no_grad():
            if "stream" in metrics:
                bench.reset_eval_state()
                timed(bench.eval_forward, opts.warmup, bench.device)  # fills the memory
                out["stream"] = tokens / min(timed(bench.eval_forward, opts.steps, bench.device))
            if "sliding" in metrics and not bench.carries_state:
                scored = bench.batch * (t - t // 2)  # windows of T scoring their last T - T/2 tokens
                out["sliding"] = scored / min(timed(bench.eval_forward, opts.steps, bench.device))
            prompts = (("gen_short", max(1, min(SHORT_PROMPT, t // 4))), ("gen_long", max(1, t - opts.gen_tokens)))
            for metric, prompt in prompts:
                if metric in metrics:
                    out[metric] = 1.0 / min(bench.generate(prompt, opts.gen_tokens))
        return out

    return measure(result, opts.device, run)


# ====================================================================================================================
# Driver, JSON and the table
# ====================================================================================================================

def machine(opts: argparse.Namespace) -> Result:
    import fairseq

    return {"device": device_description(torch.device(opts.device)), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "fairseq": fairseq.__version__,
            "dtype": opts.dtype, "memory": memory_description(torch.device(opts.device))}


def best_of(runs: Sequence[Result]) -> Result:
    """One row from its runs: the fastest of each speed, the largest peak memory, ``ok`` when any run was."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return dict(runs[-1])
    row = dict(ok[0])
    for metric in METRICS:
        values = [r[metric] for r in ok if metric in r]
        if values:
            row[metric], row[f"{metric}_median"] = max(values), statistics.median(values)
    if any("peak_mb" in r for r in ok):
        row["peak_mb"] = max(r["peak_mb"] for r in ok if "peak_mb" in r)
    return row


def run_all(opts: argparse.Namespace, argv: Sequence[str]) -> List[Result]:
    rows = row_list(opts)
    runs: List[List[Result]] = [[] for _ in rows]
    for repeat in range(opts.repeats):
        for index, (label, _, _, t) in enumerate(rows):
            load_before = os.getloadavg()[0]
            if opts.in_process:
                result = run_row(opts, index)
            else:
                result = run_worker(__file__, argv, str(index), {"model": label, "T": t, "B": batch_size(opts, t)},
                                    RESULT_PREFIX, opts.timeout, f"{label} T={t}")
            runs[index].append({**result, "repeat": repeat, "load_before": load_before,
                                "load_after": os.getloadavg()[0]})
            shown = f" train {result['train']:,.0f} tokens/s" if "train" in result else ""
            print(f"[bench] {label} T={t} run {repeat + 1}/{opts.repeats}: {result['status']}{shown}",
                  file=sys.stderr, flush=True)
    return [{**best_of(r), "runs": r} for r in runs]


def cell(row: Result, metric: str) -> str:
    if row.get("status") != "ok":
        return row.get("status", "?")
    if metric not in row:
        applies = metric in ORIGINAL_METRICS if row.get("original") else metric != "sliding"
        return "—" if applies or not row.get("carries_state") and metric == "sliding" else "n/a"
    return f"{row[metric]:,.0f}"


def streams_description(opts: argparse.Namespace) -> str:
    return f"B = max(1, {opts.tokens_per_batch} // T)" if opts.tokens_per_batch else f"B {opts.batch_size}"


def mfu(row: Result, peak_tflops: float) -> str:
    """Model FLOPs utilisation of the training row: tokens/s x FLOPs per token / the measured peak."""
    if row.get("status") != "ok" or "train" not in row:
        return cell(row, "train")
    return f"{100 * row['train'] * row['flops_per_token'] / (peak_tflops * 1e12):.1f}%"


def render(opts: argparse.Namespace, rows: Sequence[Result], commands: Sequence[str], host: Result) -> str:
    """The markdown table of ``rows`` measured on ``host`` (``machine``) by ``commands`` (one run, or the runs a
    ``--merge`` combined)."""
    head = ("| model | arch | params (layers) | T | B | train tok/s | peak MB | stream tok/s | sliding tok/s "
            "| gen tok/s (short) | gen tok/s (long) |" + (" MFU (6N) |" if opts.peak_tflops else ""))
    timing = (f"best of {opts.repeats} interleaved run(s) of {opts.steps} timed step(s) after {opts.warmup} warm-up"
              if len(commands) == 1 else
              "rows merged from these runs (a later run's ok row replaces an earlier one; each row's repeats, steps "
              "and warm-up as its command gives)")
    lines = [f"## Benchmark: {host['device']}, {opts.dtype}", "",
             *[f"- command: `{command}`" for command in commands],
             f"- {streams_description(opts)}, V {opts.vocab:,} (Zipf tokens), G {opts.gen_tokens}; {timing}; "
             f"peak MB: {host['memory']}",
             *([f"- MFU (6N): training tokens/s x 6 x parameters in matrices (the input embedding lookup excluded, "
                f"attention score and value products not counted) / the measured {opts.peak_tflops:g} TFLOP/s"]
               if opts.peak_tflops else []),
             "", head, "|" + "---|" * head.count(" |")]
    for row in rows:
        params = f"{row['params'] / 1e6:.2f}M ({row['layer_params'] / 1e6:.2f}M)" if "params" in row else "—"
        peak = f"{row['peak_mb']:,.1f}" if row.get("status") == "ok" and "peak_mb" in row else cell(row, "peak_mb")
        lines.append(f"| {row['model']} | {row.get('arch', '—')} | {params} | {row['T']} | {row['B']} | "
                     f"{cell(row, 'train')} | "
                     f"{peak} | {cell(row, 'stream')} | {cell(row, 'sliding')} | {cell(row, 'gen_short')} | "
                     f"{cell(row, 'gen_long')} |" + (f" {mfu(row, opts.peak_tflops)} |" if opts.peak_tflops else ""))
    return "\n".join(lines + original_ratios(rows)) + "\n"


def pair_ratios(ours: Result, original: Result, metric: str) -> List[float]:
    """ours / original ``metric`` of each interleaved pair (the two runs of the same repeat, adjacent in time)."""
    theirs = {run["repeat"]: run for run in original["runs"] if metric in run}
    return [run[metric] / theirs[run["repeat"]][metric] for run in ours["runs"]
            if metric in run and run["repeat"] in theirs]


def pair_spread(ours: Result, original: Result, metric: str) -> str:
    """"; pairs LOW-HIGHx" over the interleaved pairs (more than one): how much the ratio moves from run to run on
    this machine (whole processes land in faster or slower modes, on both sides)."""
    ratios = pair_ratios(ours, original, metric)
    return f"; pairs {min(ratios):.2f}-{max(ratios):.2f}x" if len(ratios) > 1 else ""


def original_ratios(rows: Sequence[Result]) -> List[str]:
    """One line per (LABEL, T) timed beside LABEL-original: ours / original tokens/s, best and median of the runs,
    and the range of the per-pair ratios."""
    found = {(r["model"], r["T"]): r for r in rows if r.get("status") == "ok"}
    lines: List[str] = []
    for row in rows:
        ours = found.get((row["model"].removesuffix(ORIGINAL_SUFFIX), row["T"])) if row.get("original") else None
        if ours is None or row.get("status") != "ok":
            continue
        parts = [f"{m} {ours[m] / row[m]:.2f}x (median {ours[f'{m}_median'] / row[f'{m}_median']:.2f}x"
                 + pair_spread(ours, row, m) + ")" for m in ORIGINAL_METRICS if m in ours and m in row]
        lines.append(f"- {ours['model']} / {row['model']}, T {row['T']}, {len(row['runs'])} interleaved run(s): "
                     + "; ".join(parts))
    title = "Ours against the original code's algorithm (tokens/s ratio, best run of each):"
    return ["", title, *lines] if lines else []


def plot(opts: argparse.Namespace, rows: Sequence[Result], path: str, host: Result) -> None:
    """Training tokens/s and peak memory versus the segment length T, one line per model (log-log)."""
    import logging

    import matplotlib
    import matplotlib.ticker

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's logging setup would print its font search
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, _, _ in opts.rows:
        ok = [r for r in rows if r["model"] == label and r.get("status") == "ok" and "train" in r]
        for ax, key in zip(axes, ("train", "peak_mb")):
            ax.plot([r["T"] for r in ok], [r[key] for r in ok], marker="o", label=label)
    for ax, ylabel in zip(axes, ("training tokens/s", "peak memory of a training step (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(opts.lengths, [str(t) for t in opts.lengths])
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("segment length T (tokens)")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{host['device']}, {opts.dtype}, {streams_description(opts)}, V {opts.vocab:,}: fairseq "
                 f"Trainer steps on Zipf tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SETTINGS = ("batch_size", "tokens_per_batch", "vocab", "gen_tokens", "peak_tflops")  # what merged runs share


def merge_runs(paths: Sequence[str]) -> Tuple[argparse.Namespace, List[Result], List[str], Result]:
    """(settings, rows, commands, machine) of earlier runs' bench.json files: rows in first-seen model order and
    increasing T; a later file's ok row (model, T) replaces an earlier one, each row keeps its ``source`` command.
    Files of other devices, precisions, vocabularies or streams are refused."""
    reports = []
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"--merge: no file {path}: give bench.json files written by scripts/bench.py --out")
        with open(path) as f:
            reports.append(json.load(f))
    first = reports[0]
    for path, report in zip(paths[1:], reports[1:]):
        for key, ours, theirs in [*((k, report.get(k), first.get(k)) for k in SETTINGS),
                                  *((k, report["machine"][k], first["machine"][k]) for k in ("device", "dtype"))]:
            if ours != theirs:
                raise SystemExit(f"--merge: {path} has {key} {ours}, {paths[0]} {theirs}: only runs of the same "
                                 f"device, precision, vocabulary and streams merge")
    found: Dict[Tuple[str, int], Result] = {}
    labels: Dict[str, bool] = {}  # label -> original, in first-seen order
    for report in reports:
        for row in report["rows"]:
            key = (row["model"], row["T"])
            labels.setdefault(row["model"], bool(row.get("original")))
            if key not in found or row.get("status") == "ok":
                found[key] = {**row, "source": row.get("source", report["command"])}  # a merged file keeps its own
    lengths = sorted({t for _, t in found})
    rows = [found[(label, t)] for label in labels for t in lengths if (label, t) in found]
    settings = argparse.Namespace(**{k: first.get(k) for k in SETTINGS}, dtype=first["machine"]["dtype"],
                                  repeats=None, steps=None, warmup=None, lengths=lengths,
                                  rows=[(label, "", original) for label, original in labels.items()])
    commands = [command for report in reports for command in report.get("merged_from", [report["command"]])]
    return settings, rows, commands, first["machine"]


def write_outputs(opts: argparse.Namespace, out: str, rows: Sequence[Result], commands: Sequence[str],
                  host: Result, report: Result) -> str:
    """bench.json (``report`` + the rows), bench.md and, over more than one length with training rows, bench.png in
    ``out``; returns the table."""
    table = render(opts, rows, commands, host)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump({**report, "machine": host, "rows": list(rows)}, f, indent=1)
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(table)
    if len(opts.lengths) > 1 and any("train" in row for row in rows):
        plot(opts, rows, os.path.join(out, "bench.png"), host)
    return table


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    if opts.worker is not None:
        print(RESULT_PREFIX + json.dumps(run_row(opts, int(opts.worker))), flush=True)
        return 0
    command = bench_command(__file__, argv)
    if opts.merge:
        settings, rows, commands, host = merge_runs(opts.merge)
        report = {"command": command, "merged_from": commands, **{k: getattr(settings, k) for k in SETTINGS}}
        print(write_outputs(settings, opts.out, rows, commands, host, report), end="")
        return 0
    rows = run_all(opts, argv)
    report = {"command": command, "batch_size": opts.batch_size, "tokens_per_batch": opts.tokens_per_batch,
              "peak_tflops": opts.peak_tflops, "vocab": opts.vocab, "steps": opts.steps, "warmup": opts.warmup,
              "gen_tokens": opts.gen_tokens, "repeats": opts.repeats}
    print(write_outputs(opts, opts.out, rows, [command], machine(opts), report), end="")
    return 0 if all(row.get("status") == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
