#!/usr/bin/env python
"""Quality of every family under one data pipeline, one trainer and every evaluation protocol it supports.

Each model (``scripts/families.py``: every family and the composed hybrid at one size, or ``--model LABEL=FLAGS``)
is trained with the same command apart from its ``--arch`` flags: ``fairseq-train DATA --task streaming_lm`` on
B contiguous streams of L-token segments for the same token budget (``--tokens``; updates = budget / (B·L)), Adam
(0.9, 0.98), inverse-sqrt schedule with 10% warm-up, clip 0.25, ``lm_loss``, seed 1. Each trained model is then
evaluated with ``fairseq-eval-lm`` at every evaluation length n in ``--lengths`` × L (default L, 2L, 4L, 8L):

* ``stream``: ``--task streaming_lm --tokens-per-sample n --batch-size Be``: Be contiguous streams read in n-token
  segments, the model's memory carried across them (a model that carries nothing reads non-overlapping segments:
  ``nonoverlap(n)``); the label fairseq-eval-lm logs is kept with the number;
* ``sliding`` (models that carry nothing): ``--task language_modeling --tokens-per-sample n --context-window n/2``:
  ``sliding(L=n, S=n/2)``, every token scored after at least n/2 tokens of context.

on every split the data-bin holds besides train (valid, test). Quality is perplexity, or bits per token
(``--unit bpc``; chosen automatically for a dictionary of at most 300 entries: bytes or characters) from
fairseq-eval-lm's base-2 loss.

Written to ``--out``: ``results.json`` (every command, number and training curve), ``results.md`` (the tables),
``commands.sh`` (the exact commands, runnable), ``curves.png`` (training loss versus tokens), ``lengths.png``
(quality versus evaluation length per protocol) and, for models with a learned span, ``spans-<model>.png``
(``scripts/plot_spans.py``). A second run reuses every finished training run and evaluation whose command is
unchanged (``<out>/<model>/done.json``), so an interrupted comparison resumes where it stopped. ``--jobs N`` runs
N models at once (each model's training, then its evaluations; the same commands): on CPU each job gets 1/N of
torch's threads, on CUDA each concurrent job sees one GPU (``CUDA_VISIBLE_DEVICES``, round robin over the visible
ones).

    python scripts/compare_quality.py --data data-bin/wt103-heldout-word          # the README's real-text run
    python scripts/compare_quality.py --quick                                     # tiny presets, the embedded corpus
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from queue import Queue
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/families.py
from families import TINY, family_flags, fill, model_flag  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
USER_DIR = os.path.join(REPO, "fairseq_ext")
LOSS_RE = re.compile(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)")
SCORED_RE = re.compile(r"Evaluated ([0-9,]+) tokens")
LABEL_RE = re.compile(r"evaluation protocol: (.+), [0-9,]+ tokens scored")
TRAIN_RE = re.compile(r"train_inner \| .*?\bloss=([-0-9.e+]+|nan|inf).*?num_updates=(\d+)")
DONE = "done.json"
NORMAL = dict(data=os.path.join(REPO, "data-bin", "embedded-word"), seq_len=128, batch_size=8, tokens=2_000_000,
              layers=4, dim=256, heads=8, lr=1e-3, eval_batch_size=8, lengths=[1, 2, 4, 8], log_interval=50)
QUICK = dict(data=os.path.join(REPO, "data-bin", "embedded-word"), seq_len=16, batch_size=4, tokens=4096,
             layers=None, dim=None, heads=None, lr=2e-3, eval_batch_size=2, lengths=[1, 2], log_interval=8)
Result = Dict[str, Any]


# ====================================================================================================================
# Command line
# ====================================================================================================================

def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="a fairseq data-bin (default data-bin/embedded-word, built by "
                                                "scripts/prepare-embedded.sh when missing)")
    p.add_argument("--out", default=os.path.join(REPO, "compare-out"))
    p.add_argument("--models", nargs="+", default=None, help=f"families to train (default all: "
                                                              f"{', '.join(TINY)}), or none")
    p.add_argument("--model", action="append", default=[], metavar="LABEL=FLAGS",
                   help="another model as fairseq-train flags ({T}: the segment length, {W}: the longest)")
    p.add_argument("--seq-len", type=int, default=None, help="training segment length L (default 128)")
    p.add_argument("--batch-size", type=int, default=None, help="training streams B (default 8)")
    p.add_argument("--tokens", type=int, default=None, help="training token budget per model (default 2,000,000)")
    p.add_argument("--layers", type=int, default=None, help="layers of every family (default 4)")
    p.add_argument("--dim", type=int, default=None, help="model width d (default 256; FFN 4d)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 8)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="evaluation streams Be (default 8)")
    p.add_argument("--lengths", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="evaluation lengths as multiples of L (default 1,2,4,8)")
    p.add_argument("--unit", choices=("auto", "ppl", "bpc"), default="auto")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu "
                                                                           "(fp32 either way)")
    p.add_argument("--log-interval", type=int, default=None, help="updates between training-curve points")
    p.add_argument("--jobs", type=int, default=1, help="models trained and evaluated at once (CPU: 1/N of torch's "
                                                       "threads each; CUDA: one visible GPU each, round robin)")
    p.add_argument("--quick", action="store_true", help="the families' tiny presets, a 4k-token budget, L 16 "
                                                        "(the test; a few minutes on 2 cores)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    opts = build_arg_parser().parse_args(argv)
    for name, value in (QUICK if opts.quick else NORMAL).items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)
    if opts.device is None:
        import torch

        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if min(opts.seq_len, opts.batch_size, opts.tokens, opts.eval_batch_size, opts.jobs, *opts.lengths) < 1:
        raise SystemExit("--seq-len, --batch-size, --tokens, --eval-batch-size, --jobs and --lengths must be >= 1")
    if opts.tokens < opts.seq_len * opts.batch_size:
        raise SystemExit(f"--tokens {opts.tokens} is less than one update (B·L = {opts.batch_size * opts.seq_len})")
    entries = TINY if opts.quick else family_flags(opts.layers, opts.dim, opts.heads)
    names = list(entries) if opts.models is None else [m for m in opts.models if m != "none"]
    unknown = [m for m in names if m not in entries]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {', '.join(entries)} or none")
    opts.rows = [(name, entries[name]) for name in names]
    opts.rows += [model_flag(item) for item in opts.model]
    if not opts.rows:
        raise SystemExit("no models: give --models and/or --model")
    labels = [label for label, _ in opts.rows]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:  # each model's runs live in <out>/<label>
        raise SystemExit(f"model labels must differ: {', '.join(twice)} given twice (rename one --model LABEL)")
    return opts


# ====================================================================================================================
# Running the CLIs, resumably
# ====================================================================================================================

def run(cmd: List[str], log_path: str, job_env: Optional[Dict[str, str]] = None) -> str:
    """Run a CLI from the repository root, its output in ``log_path``, with ``job_env`` added to the environment
    (a concurrent job's threads or GPU); a failure exits with the log's tail."""
    env = dict(os.environ, **job_env) if job_env else None
    with open(log_path, "w") as log:
        log.write(shlex.join(cmd) + "\n")
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    output = open(log_path).read()
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n--- end of {log_path} ---\n"
                 + "\n".join(output.splitlines()[-30:]))
    return output


class Done:
    """``<out>/<model>/done.json``: the finished commands of a model and what they gave."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, DONE)
        self.entries: Dict[str, Any] = json.load(open(self.path)) if os.path.exists(self.path) else {}

    def get(self, cmd: List[str]) -> Optional[Any]:
        return self.entries.get(shlex.join(cmd))

    def put(self, cmd: List[str], value: Any) -> None:
        self.entries[shlex.join(cmd)] = value
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.entries, f, indent=1)
        os.replace(self.path + ".tmp", self.path)


def cpu_flag(opts: argparse.Namespace) -> List[str]:
    return ["--cpu"] if opts.device == "cpu" else []


def train_command(opts: argparse.Namespace, flags: str, save_dir: str) -> Tuple[List[str], int]:
    updates = opts.tokens // (opts.batch_size * opts.seq_len)
    longest = opts.seq_len * max(opts.lengths)
    cmd = [os.path.join(BIN, "fairseq-train"), opts.data, "--user-dir", USER_DIR, "--task", "streaming_lm",
           *shlex.split(fill(flags, opts.seq_len, longest)), "--tokens-per-sample", str(opts.seq_len),
           "--batch-size", str(opts.batch_size), "--max-update", str(updates), "--optimizer", "adam",
           "--adam-betas", "(0.9, 0.98)", "--lr", str(opts.lr), "--lr-scheduler", "inverse_sqrt",
           "--warmup-updates", str(max(1, updates // 10)), "--clip-norm", "0.25", "--criterion", "lm_loss",
           "--seed", "1", *cpu_flag(opts), "--num-workers", "0", "--save-dir", save_dir, "--no-epoch-checkpoints",
           "--disable-validation", "--log-format", "simple", "--log-interval", str(opts.log_interval)]
    return cmd, updates


def train(opts: argparse.Namespace, label: str, flags: str, job_env: Optional[Dict[str, str]] = None) -> Result:
    """Train (or reuse the finished run of the same command): the checkpoint, the curve and the command."""
    save_dir = os.path.join(opts.out, label)
    cmd, updates = train_command(opts, flags, save_dir)
    done = Done(save_dir) if os.path.isdir(save_dir) else None
    if done is not None and done.get(cmd) is not None:
        print(f"  {label}: reusing the finished training run in {save_dir}", flush=True)
        return {**done.get(cmd), "command": cmd}
    if os.path.exists(save_dir):  # another command or an interrupted run: fairseq-train would resume from it
        shutil.rmtree(save_dir)
    os.makedirs(save_dir)
    print(f"  {label}: training, {updates} updates of {opts.batch_size} x {opts.seq_len} tokens", flush=True)
    start = time.time()
    log = run(cmd, os.path.join(save_dir, "train.log"), job_env)
    curve = [[int(u) * opts.batch_size * opts.seq_len, float(loss)] for loss, u in TRAIN_RE.findall(log)]
    trained = {"checkpoint": os.path.join(save_dir, "checkpoint_last.pt"), "updates": updates, "curve": curve,
               "seconds": round(time.time() - start, 1)}
    Done(save_dir).put(cmd, trained)
    return {**trained, "command": cmd}


def eval_command(opts: argparse.Namespace, checkpoint: str, protocol: str, length: int, split: str) -> List[str]:
    cmd = [os.path.join(BIN, "fairseq-eval-lm"), opts.data, "--user-dir", USER_DIR, "--path", checkpoint,
           "--gen-subset", split, "--tokens-per-sample", str(length), *cpu_flag(opts), "--num-workers", "0",
           "--log-format", "simple", "--no-progress-bar"]
    if protocol == "stream":
        return cmd + ["--task", "streaming_lm", "--batch-size", str(opts.eval_batch_size)]
    return cmd + ["--task", "language_modeling", "--context-window", str(length // 2),
                  "--max-tokens", str(max(4096, 4 * length))]


def evaluate(opts: argparse.Namespace, label: str, checkpoint: str, protocol: str, length: int,
             split: str, job_env: Optional[Dict[str, str]] = None) -> Result:
    cmd = eval_command(opts, checkpoint, protocol, length, split)
    done = Done(os.path.join(opts.out, label))
    if done.get(cmd) is None:
        log = run(cmd, os.path.join(opts.out, label, f"eval-{protocol}-{length}-{split}.log"), job_env)
        loss, scored = LOSS_RE.search(log), SCORED_RE.search(log)
        if not loss or not scored:
            sys.exit(f"no loss in fairseq-eval-lm's output: {os.path.join(opts.out, label)}")
        named = LABEL_RE.search(log)
        name = named.group(1) if named else f"sliding(L={length}, S={length - length // 2})"
        done.put(cmd, {"bits": float(loss.group(1)), "ppl": float(loss.group(2)),
                       "tokens": int(scored.group(1).replace(",", "")), "label": name})
    return {**done.get(cmd), "command": cmd, "protocol": protocol, "length": length, "split": split}


# ====================================================================================================================
# The comparison
# ====================================================================================================================

def splits(data: str) -> List[str]:
    return [s for s in ("valid", "test") if os.path.exists(os.path.join(data, f"{s}.bin"))]


def unit_of(opts: argparse.Namespace) -> str:
    if opts.unit != "auto":
        return opts.unit
    with open(os.path.join(opts.data, "dict.txt")) as f:
        return "bpc" if sum(1 for _ in f) + 4 <= 300 else "ppl"


def compare(opts: argparse.Namespace) -> Result:
    report: Result = {"data": opts.data, "unit": unit_of(opts), "splits": splits(opts.data),
                      "settings": {k: getattr(opts, k) for k in ("seq_len", "batch_size", "tokens", "lr",
                                                                 "eval_batch_size", "lengths", "device")},
                      "models": []}
    if not report["splits"]:
        sys.exit(f"{opts.data} has no valid or test split to evaluate")
    slots: "Queue[Dict[str, str]]" = Queue()
    for slot in job_slots(opts):
        slots.put(slot)

    failed = threading.Event()

    def one_model(label: str, flags: str) -> Optional[Result]:
        if failed.is_set():  # an earlier model's command failed: the comparison stops
            return None
        job_env = slots.get()
        try:
            return train_and_evaluate(opts, label, flags, report["splits"], job_env)
        except BaseException:
            failed.set()
            raise
        finally:
            slots.put(job_env)

    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        futures = [pool.submit(one_model, label, flags) for label, flags in opts.rows]
        report["models"] = [future.result() for future in futures]  # in --models order, whatever finished first
    return report


def job_slots(opts: argparse.Namespace) -> List[Dict[str, str]]:
    """The environment each concurrent job adds. CPU: nothing for one job, else 1/N of torch's threads each
    (oversubscribed, OpenMP's spinning threads made two 2-thread jobs on 2 cores 2x slower than one). CUDA: one GPU
    per job, round robin over the visible ones, also for a single job (fairseq-train would start a worker on every
    visible GPU, multiplying the token budget)."""
    if opts.device != "cuda":
        if opts.jobs == 1:
            return [{}]
        import torch

        threads = str(max(1, torch.get_num_threads() // opts.jobs))
        return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}] * opts.jobs
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
    else:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    if not gpus:
        sys.exit("--device cuda: no visible GPU (CUDA_VISIBLE_DEVICES is empty)")
    return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(opts.jobs)]


def train_and_evaluate(opts: argparse.Namespace, label: str, flags: str, split_names: List[str],
                       job_env: Dict[str, str]) -> Result:
    """One model's training run (or the reused one) and every evaluation its protocols allow."""
    trained = train(opts, label, flags, job_env)
    evals = []
    for length in (m * opts.seq_len for m in opts.lengths):
        for split in split_names:
            stream = evaluate(opts, label, trained["checkpoint"], "stream", length, split, job_env)
            evals.append(stream)
            if carries_nothing(stream):  # the sliding window applies
                evals.append(evaluate(opts, label, trained["checkpoint"], "sliding", length, split, job_env))
    print(f"  {label}: evaluated ({len(evals)} runs)", flush=True)
    return {"model": label, "flags": flags, **trained, "evals": evals}


def carries_nothing(stream: Result) -> bool:
    """Whether fairseq-eval-lm's stream label says the model carried nothing across segments."""
    return "memory: none" in stream["label"]


def protocol_name(entry: Result) -> str:
    """``stream``, ``nonoverlap`` (a stream of a model that carries nothing) or ``sliding``."""
    return "nonoverlap" if entry["protocol"] == "stream" and carries_nothing(entry) else entry["protocol"]


def metric(entry: Result, unit: str) -> float:
    return entry["bits"] if unit == "bpc" else entry["ppl"]


def render(report: Result) -> str:
    unit, settings = report["unit"], report["settings"]
    name = "bits per token" if unit == "bpc" else "perplexity"
    lines = [f"## Quality: {os.path.basename(report['data'].rstrip('/'))}, {name}", "",
             f"- every model: {settings['tokens']:,} training tokens (B {settings['batch_size']} streams x L "
             f"{settings['seq_len']}), the same optimizer, schedule and seed; evaluation streams Be "
             f"{settings['eval_batch_size']}; fp32, {settings['device'].upper()}",
             "- stream(n): segments of n tokens, memory carried; nonoverlap(n): the same for a model that carries "
             "nothing; sliding(n): windows of n tokens scoring the last n/2 (models that carry nothing)", ""]
    lengths = [m * settings["seq_len"] for m in settings["lengths"]]
    for split in report["splits"]:
        head = "| model | params | protocol | " + " | ".join(f"n={n}" for n in lengths) + " |"
        lines += [f"### {split}", "", head, "|---|---:|---|" + "---:|" * len(lengths)]
        for model in report["models"]:
            for protocol in ("stream", "nonoverlap", "sliding"):
                row = {e["length"]: e for e in model["evals"] if e["split"] == split and protocol_name(e) == protocol}
                if row:
                    lines.append(f"| {model['model']} | {model.get('params', '—')} | {protocol} | "
                                 + " | ".join(f"{metric(row[n], unit):.3f}" if n in row else "—" for n in lengths)
                                 + " |")
        lines.append("")
    return "\n".join(lines)


def plots(report: Result, out: str) -> List[str]:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written, data = [], os.path.basename(report["data"].rstrip("/"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in report["models"]:
        if model["curve"]:
            ax.plot(*zip(*model["curve"]), label=model["model"])
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss (bits per token)")
    ax.set_title(f"training curves, {data} (streaming_lm, same budget and optimizer)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(os.path.join(out, "curves.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    split, unit = report["splits"][0], report["unit"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for model in report["models"]:
        for protocol, style in (("stream", "-"), ("nonoverlap", "-"), ("sliding", "--")):
            points = sorted((e["length"], metric(e, unit)) for e in model["evals"]
                            if e["split"] == split and protocol_name(e) == protocol)
            if points:
                ax.plot(*zip(*points), style, marker="o", label=f"{model['model']} ({protocol})")
    ax.axvline(report["settings"]["seq_len"], color="grey", linestyle=":", label="training length L")
    lengths = [m * report["settings"]["seq_len"] for m in report["settings"]["lengths"]]
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("evaluation length n (tokens)")
    ax.set_ylabel(f"{split} {'bits per token' if unit == 'bpc' else 'perplexity'}")
    ax.set_title(f"quality vs evaluation length, {data} {split}\nstream(n) / nonoverlap(n) solid, sliding(n, n/2) "
                 f"dashed", fontsize=9)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    written.append(os.path.join(out, "lengths.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def span_plots(report: Result, out: str) -> List[str]:
    """``scripts/plot_spans.py`` for every adaptive-span model."""
    written = []
    for model in report["models"]:
        if "adaptive_span_lm" in model["flags"] or "adaptive_span_" in model["flags"]:
            path = os.path.join(out, f"spans-{model['model']}.png")
            run([sys.executable, os.path.join(REPO, "scripts", "plot_spans.py"), model["checkpoint"], "--out", path],
                os.path.join(out, model["model"], "plot_spans.log"))
            written.append(path)
    return written


def parameter_counts(report: Result) -> None:
    import torch

    for model in report["models"]:
        state = torch.load(model["checkpoint"], map_location="cpu", weights_only=False)["model"]
        tensors = {v.untyped_storage().data_ptr(): v for v in state.values()  # tied weights: one storage
                   if torch.is_tensor(v) and v.is_floating_point()}
        count = sum(v.numel() for v in tensors.values())
        model["params"] = f"{count / 1e6:.2f}M"


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = parse_args(argv)
    os.makedirs(opts.out, exist_ok=True)
    if not os.path.exists(os.path.join(opts.data, "dict.txt")):
        if opts.data != QUICK["data"]:
            sys.exit(f"{opts.data} is not a fairseq data-bin (no dict.txt): binarise a corpus first (README, "
                     f"'Results')")
        print("building the embedded corpus (scripts/prepare-embedded.sh) ...", flush=True)
        subprocess.run(["bash", os.path.join(REPO, "scripts", "prepare-embedded.sh")], cwd=REPO, check=True,
                       env=dict(os.environ, PYTHON=sys.executable))
    report = compare(opts)
    parameter_counts(report)
    table = render(report)
    with open(os.path.join(opts.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(opts.out, "results.md"), "w") as f:
        f.write(table)
    with open(os.path.join(opts.out, "commands.sh"), "w") as f:
        f.write("#!/usr/bin/env bash\n# the exact commands of this comparison (scripts/compare_quality.py)\nset -e\n")
        for model in report["models"]:
            f.write("\n" + shlex.join(model["command"]) + "\n")
            f.writelines(shlex.join(e["command"]) + "\n" for e in model["evals"])
    written = plots(report, opts.out) + span_plots(report, opts.out)
    print(table)
    names = ["results.json", "results.md", "commands.sh", *(os.path.basename(p) for p in written)]
    print(f"wrote {', '.join(names)} in {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
