#!/usr/bin/env python
"""ALiBi against the sinusoidal transformer and the original fork: ``scripts/bench.py`` with three rows.

At each sequence length T, with B = max(1, ``--tokens-per-batch`` // T) sequences per step (a constant number of
tokens), three models of the same size are trained by fairseq's ``Trainer`` (``scripts/benchrow.py``: forward,
``lm_loss``, backward, clip 0.25, fairseq's Adam) and their peak memory measured:

* ``alibi`` -- ours, ``alibi_lm`` (``--attn-impl`` auto/sdpa/blocked/naive/flex, ``--alibi-bias-form``);
* ``sinusoidal`` -- fairseq's stock ``transformer_lm`` (``transformer_lm_X`` for an ``alibi_lm_X`` preset) with
  sinusoidal position embeddings;
* ``alibi-original`` -- the original fork (``scripts/originals/alibi.py``: stock fairseq layers with a
  materialised (B*H, T, T) bias mask) holding the alibi row's weights, interleaved with it.

This script only chooses those rows: it runs ``scripts/bench.py`` (whose table, JSON and plot it writes to ``--out``,
with the equivalent ``bench.py`` command in the table header), then checks the two ALiBi targets: training throughput
>= 0.95x the sinusoidal model at T = 512, and peak memory below the fork's at T >= 2048.

    python scripts/bench_alibi.py                                   # d 256, 4 layers, 4 heads, T = 512..4096
    python scripts/bench_alibi.py --arch alibi_lm_wiki103 --vocab 267744 --device cuda --dtype fp16 \\
        --tokens-per-batch 9216
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any, Dict, List, Optional, Sequence

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, SCRIPTS)  # scripts/bench.py
import bench  # noqa: E402

MODELS = ("alibi", "sinusoidal", "fork")
FORK_ROW = "alibi" + bench.ORIGINAL_SUFFIX
DEFAULT_DIMS = {"layers": 4, "embed_dim": 256, "heads": 4, "ffn_dim": 1024}  # when no --arch preset is given
DIM_FLAGS = {"layers": "--decoder-layers", "embed_dim": "--decoder-embed-dim", "heads": "--decoder-attention-heads",
             "ffn_dim": "--decoder-ffn-embed-dim"}
IMPLS = ("auto", "sdpa", "blocked", "naive", "flex")
BIAS_FORMS = ("relative", "key_index")


def _names(text: str) -> List[str]:
    names = [v for v in text.replace(",", " ").split()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown or "alibi" not in names and "fork" in names:
        raise argparse.ArgumentTypeError(f"choose from {MODELS} ({unknown or 'fork'}: the fork holds the alibi "
                                         f"row's weights, so it needs alibi)")
    return names


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", type=_names, default=list(MODELS), help=f"comma-separated subset of {MODELS}")
    p.add_argument("--seq-lens", default="512,1024,2048,4096", help="sequence lengths T")
    p.add_argument("--tokens-per-batch", type=int, default=4096, help="batch = max(1, tokens_per_batch // T)")
    p.add_argument("--arch", default=None, help="an alibi_lm preset for every dimension (e.g. alibi_lm_wiki103); "
                                                f"default: alibi_lm with {DEFAULT_DIMS}, which the dimension "
                                                f"flags override")
    for name, flag in DIM_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"{flag} of every row")
    p.add_argument("--vocab", type=int, default=10000, help="dictionary entries incl. 4 specials")
    p.add_argument("--attn-impl", choices=IMPLS, default="auto", help="alibi_lm attention kernel")
    p.add_argument("--alibi-bias-form", choices=BIAS_FORMS, default="relative", help="alibi_lm bias form")
    p.add_argument("--metrics", default="train", help=f"comma list of {', '.join(bench.METRICS)}")
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (peak memory over them)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs of every row")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="fairseq's --bf16 / --fp16")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="bench-out/alibi", help="directory of bench.py's bench.json, bench.md, bench.png")
    p.add_argument("--in-process", action="store_true", help="every row in this process")
    p.add_argument("--timeout", type=float, default=None, help="seconds per row and run (subprocesses)")
    return p


def sinusoidal_arch(arch: Optional[str]) -> str:
    """Stock fairseq's counterpart of an alibi_lm arch: transformer_lm, or transformer_lm_X for alibi_lm_X."""
    if arch is None or arch == "alibi_lm":
        return "transformer_lm"
    import fairseq_ext  # noqa: F401  (registers the alibi_lm presets)
    from fairseq.models import ARCH_MODEL_REGISTRY

    stock = "transformer_lm" + arch.removeprefix("alibi_lm")
    if not arch.startswith("alibi_lm") or stock not in ARCH_MODEL_REGISTRY:
        raise SystemExit(f"--arch {arch}: the sinusoidal row needs stock fairseq's {stock}, which does not exist; "
                         f"give --models alibi,fork, or no --arch and the dimension flags")
    return stock


def bench_argv(opts: argparse.Namespace) -> List[str]:
    """The ``scripts/bench.py`` command line of these rows."""
    dims: List[str] = []
    for name, flag in DIM_FLAGS.items():
        value = getattr(opts, name)
        if value is None and opts.arch is None:
            value = DEFAULT_DIMS[name]
        dims += [flag, str(value)] if value is not None else []
    rows = []
    if "alibi" in opts.models:
        rows += ["--model", shlex.join(["alibi=--arch", opts.arch or "alibi_lm", *dims, "--attn-impl", opts.attn_impl,
                                        "--alibi-bias-form", opts.alibi_bias_form])]
    if "sinusoidal" in opts.models:
        rows += ["--model", shlex.join(["sinusoidal=--arch", sinusoidal_arch(opts.arch), *dims])]
    if "fork" in opts.models:
        rows += ["--original", "alibi"]
    return ["--models", "none", *rows, "--lengths", opts.seq_lens, "--tokens-per-batch", str(opts.tokens_per_batch),
            "--vocab", str(opts.vocab), "--metrics", opts.metrics, "--steps", str(opts.steps), "--warmup",
            str(opts.warmup), "--repeats", str(opts.repeats), "--dtype", opts.dtype, "--seed", str(opts.seed),
            "--out", opts.out, *(["--device", opts.device] if opts.device else []),
            *(["--in-process"] if opts.in_process else []),
            *(["--timeout", str(opts.timeout)] if opts.timeout is not None else [])]


def _find(rows: Sequence[Dict[str, Any]], model: str, t: int) -> Optional[Dict[str, Any]]:
    return next((r for r in rows if r["model"] == model and r["T"] == t and r.get("status") == "ok"), None)


def target_lines(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """ALiBi's two targets against the measured rows (``n/a`` where a row is missing or failed)."""
    lines = []
    for t in sorted({r["T"] for r in rows}):
        a, s = _find(rows, "alibi", t), _find(rows, "sinusoidal", t)
        if a and s and "train" in a and "train" in s:
            ratio = a["train"] / s["train"]
            target = " (target >= 0.95x: " + ("met)" if ratio >= 0.95 else "NOT met)") if t == 512 else ""
            lines.append(f"- alibi / sinusoidal training tokens/s at T={t}: {ratio:.2f}x{target}")
    if not any("T=512" in line for line in lines):
        lines.append("- ALiBi >= 0.95x sinusoidal throughput at T=512: n/a (not measured)")
    long = sorted({r["T"] for r in rows if r["T"] >= 2048})
    for t in long:
        a, f = _find(rows, "alibi", t), _find(rows, FORK_ROW, t)
        if a and f and "peak_mb" in a and "peak_mb" in f:
            verdict = "met" if a["peak_mb"] < f["peak_mb"] else "NOT met"
            lines.append(f"- ALiBi peak memory < fork at T={t}: {a['peak_mb']:,.1f} vs {f['peak_mb']:,.1f} MB "
                         f"-> {verdict}")
        else:
            lines.append(f"- ALiBi peak memory < fork at T={t}: n/a (a row is missing or failed)")
    if not long:
        lines.append("- ALiBi peak memory < fork at T >= 2048: n/a (no T >= 2048 measured)")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_arg_parser().parse_args(sys.argv[1:] if argv is None else argv)
    status = bench.main(bench_argv(opts))
    with open(os.path.join(opts.out, "bench.json")) as f:
        rows = json.load(f)["rows"]
    print("\nTargets:\n" + "\n".join(target_lines(rows)))
    return status


if __name__ == "__main__":
    sys.exit(main())
