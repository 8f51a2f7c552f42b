#!/usr/bin/env python3
"""`make demo`: "train short, test long" (Press et al. 2021, Table 5) in miniature, on the embedded corpus.

Trains ``alibi_lm`` and fairseq's stock sinusoidal ``transformer_lm`` of identical size (pre-norm, same dims, same
optimizer, same number of updates, same seed) on samples of L tokens, then evaluates both on the validation split
at L, 2L and 4L with ``fairseq-eval-lm`` (protocol: non-overlapping blocks, ``--context-window 0``) and prints the
perplexity table. ALiBi needs no override to score longer inputs; the sinusoidal model needs its position table
widened (``--model-overrides "{'max_target_positions': 4L}"``), exactly as in the paper's comparison.
Everything goes through the real CLIs (``fairseq-train`` / ``fairseq-eval-lm`` with ``--user-dir fairseq_ext``).

Training prints a progress line per fairseq log interval. A model whose finished run with the same command is
already in ``--out`` is reused (and says so), and so is each of its finished evaluations with the same command, so a
re-run prints the same table in seconds; any other content of its directory is removed first (fairseq-train would
otherwise resume from it), evaluations included. The table is also written as
``extrapolation.csv`` and plotted to ``extrapolation.png`` in ``--out``.
"""
import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
USER_DIR = os.path.join(REPO, "fairseq_ext")
PPL_RE = re.compile(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)")
TOKENS_RE = re.compile(r"Evaluated ([0-9,]+) tokens")
PROGRESS_RE = re.compile(r"num_updates[= ](\d+)")
LOSS_RE = re.compile(r"\bloss[= ]([0-9.]+)")
FINISHED = "demo-run.json"  # written next to a model's checkpoint when its training run completed
EVALUATED = "demo-evals.json"  # beside it: {eval command: its result} for the evaluations that finished


def run(cmd: List[str], log_path: str, progress: Optional[str] = None) -> str:
    """Run a CLI, tee its output to log_path, fail loudly with the log tail. With ``progress`` (a model name), print
    one line per fairseq training log line (update count and loss) while it runs."""
    lines = []
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            lines.append(line.rstrip("\n"))
            updates, loss = PROGRESS_RE.search(line), LOSS_RE.search(line)
            if progress and updates and loss and "train_inner" in line:
                print(f"    {progress}: update {updates.group(1)}, training loss {loss.group(1)} bits", flush=True)
        returncode = proc.wait()
    if returncode != 0:
        sys.exit(f"command failed ({returncode}): {' '.join(cmd)}\n--- last lines of {log_path} ---\n"
                 + "\n".join(lines[-30:]))
    return "\n".join(lines)


def model_args(name: str, dims: List[str]) -> List[str]:
    if name == "alibi":
        return ["--arch", "alibi_lm", *dims]
    return ["--arch", "transformer_lm", *dims]  # sinusoidal positions (fairseq's default)


def train(name: str, args: argparse.Namespace, data: str) -> str:
    save_dir = os.path.join(args.out, name)
    dims = ["--decoder-layers", str(args.layers), "--decoder-embed-dim", str(args.dim),
            "--decoder-ffn-embed-dim", str(4 * args.dim), "--decoder-attention-heads", str(args.heads),
            "--decoder-normalize-before", "--dropout", "0.1"]
    if args.cutoffs:  # the paper's WikiText-103 models use an adaptive softmax; here it keeps 16k words cheap on CPU
        dims += ["--adaptive-softmax-cutoff", args.cutoffs, "--adaptive-softmax-dropout", "0.1"]
    cmd = [os.path.join(BIN, "fairseq-train"), data, "--user-dir", USER_DIR, "--task", "language_modeling",
           *model_args(name, dims), "--tokens-per-sample", str(args.seq_len), "--sample-break-mode", "none",
           "--max-tokens", str(args.batch_tokens), "--max-update", str(args.updates),
           "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(args.lr), "--clip-norm", "1.0",
           "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(max(1, args.updates // 10)),
           "--criterion", "lm_loss", "--seed", "1", "--cpu", "--num-workers", "0",
           "--save-dir", save_dir, "--no-epoch-checkpoints", "--disable-validation",
           "--log-format", "simple", "--log-interval", str(args.log_interval)]
    checkpoint, finished = os.path.join(save_dir, "checkpoint_last.pt"), os.path.join(save_dir, FINISHED)
    if os.path.exists(checkpoint) and os.path.exists(finished) and json.load(open(finished)) == {"command": cmd}:
        print(f"  reusing {name}'s finished run in {save_dir} (same command; delete the directory to retrain)",
              flush=True)
        return checkpoint
    if os.path.exists(save_dir):  # an interrupted or different run: fairseq-train would resume from it
        shutil.rmtree(save_dir)
    print(f"  training {name} ({args.updates} updates; log {os.path.join(args.out, f'train-{name}.log')})",
          flush=True)
    start = time.time()
    run(cmd, os.path.join(args.out, f"train-{name}.log"), progress=name)
    with open(finished, "w") as f:
        json.dump({"command": cmd}, f)
    print(f"  trained {name:10s} {args.updates} updates in {time.time() - start:.0f}s", flush=True)
    return checkpoint


def evaluate(name: str, ckpt: str, length: int, args: argparse.Namespace, data: str) -> Dict[str, float]:
    cmd = [os.path.join(BIN, "fairseq-eval-lm"), data, "--user-dir", USER_DIR, "--path", ckpt,
           "--gen-subset", "valid", "--tokens-per-sample", str(length), "--context-window", "0",
           "--max-tokens", str(max(length, 4096)), "--cpu", "--num-workers", "0", "--log-format", "simple"]
    if name == "sinusoidal":
        cmd += ["--model-overrides", f"{{'max_target_positions': {length}}}"]
    done_path = os.path.join(os.path.dirname(ckpt), EVALUATED)  # removed with the run when the model is retrained
    done = json.load(open(done_path)) if os.path.exists(done_path) else {}
    key = " ".join(cmd)
    if key in done:
        print(f"  reusing {name}'s evaluation at L_valid={length} (same checkpoint and command)", flush=True)
        return done[key]
    out = run(cmd, os.path.join(args.out, f"eval-{name}-{length}.log"))
    match, tokens = PPL_RE.search(out), TOKENS_RE.search(out)
    if not match or not tokens:
        sys.exit(f"could not find the perplexity in fairseq-eval-lm's output ({args.out}/eval-{name}-{length}.log)")
    done[key] = {"ppl": float(match.group(2)), "tokens": int(tokens.group(1).replace(",", ""))}
    with open(done_path + ".tmp", "w") as f:  # replaced in one step: an interrupted write leaves the old file
        json.dump(done, f, indent=1)
    os.replace(done_path + ".tmp", done_path)
    return done[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.join(REPO, "data-bin", "embedded-word"))
    parser.add_argument("--out", default=os.path.join(REPO, "demo-out"))
    parser.add_argument("--seq-len", type=int, default=64, help="training length L")
    parser.add_argument("--updates", type=int, default=600)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--cutoffs", default="2000,6000", help="adaptive softmax cutoffs ('' for a full softmax)")
    parser.add_argument("--log-interval", type=int, default=50, help="updates between progress lines")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not os.path.exists(os.path.join(args.data, "dict.txt")):
        print("building the embedded corpus (scripts/prepare-embedded.sh) ...", flush=True)
        env = dict(os.environ, PYTHON=sys.executable)
        subprocess.run(["bash", os.path.join(REPO, "scripts", "prepare-embedded.sh")], cwd=REPO, env=env, check=True)

    lengths = [args.seq_len, 2 * args.seq_len, 4 * args.seq_len]
    results: Dict[str, Dict[int, Dict[str, float]]] = {}
    for name in ("alibi", "sinusoidal"):
        ckpt = train(name, args, args.data)
        results[name] = {length: evaluate(name, ckpt, length, args, args.data) for length in lengths}

    tokens = results["alibi"][lengths[0]]["tokens"]
    print(f"\nValidation perplexity, data {args.data}, protocol nonoverlap(L_valid), "
          f"{tokens:,} tokens scored, fp32, CPU")
    print(f"models: {args.layers} layers, d={args.dim}, {args.heads} heads, trained on L={args.seq_len} for "
          f"{args.updates} updates of {args.batch_tokens} tokens\n")
    print("| model | " + " | ".join(f"L_valid={n}" for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for name in ("alibi", "sinusoidal"):
        print(f"| {name} | " + " | ".join(f"{results[name][n]['ppl']:.2f}" for n in lengths) + " |")
    write_curve(results, lengths, args)


def write_curve(results: Dict[str, Dict[int, Dict[str, float]]], lengths: List[int], args: argparse.Namespace) -> None:
    """extrapolation.csv (model, L_valid, perplexity, tokens) and extrapolation.png (perplexity vs L_valid)."""
    csv_path, png_path = os.path.join(args.out, "extrapolation.csv"), os.path.join(args.out, "extrapolation.png")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "train_length", "eval_length", "perplexity", "tokens_scored"])
        for name, by_length in results.items():
            for n in lengths:
                writer.writerow([name, args.seq_len, n, f"{by_length[n]['ppl']:.2f}", by_length[n]["tokens"]])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, by_length in results.items():
        ax.plot(lengths, [by_length[n]["ppl"] for n in lengths], marker="o", label=name)
    ax.axvline(args.seq_len, color="grey", linestyle=":", label=f"training length L={args.seq_len}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("evaluation length L_valid (tokens)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"train short, test long: nonoverlap(L_valid), {os.path.basename(args.data.rstrip('/'))}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    print(f"\nwrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
