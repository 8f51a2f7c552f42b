#!/usr/bin/env python
"""Plot the learned attention spans of an ``adaptive_span_lm`` checkpoint, per head and per layer.

Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers" (arXiv 1905.07799), Fig. 4: the span learned by
each head of each layer (x = layer, y = span in tokens). Here the span of a head is the original's monitoring value
(spec adaptive_span.md §1.4), min(L, ceil(z·L) + R) clamped at 0, from the head's span parameter z, the maximum span
L (``attn_span``) and the ramp R (``adapt_span_ramp``) of the checkpoint's ``cfg['model']`` -- the same number as
``AdaptiveSpanMask.spans()`` and the ``span_avg`` / ``span_max`` training logs.

The checkpoint is read weights-only (``torch.load(..., weights_only=True)``: fairseq's layout of plain containers
and tensors, nothing unpickled beyond that); the spans are ``model['decoder.layers.{i}.self_attn.span.z']``, shape
(K,) per head or (1,) with ``--adapt-span-layer``. A checkpoint of another model, or of the fixed-span baseline
(``--fixed-span``: no z), is refused with the reason.

    python scripts/plot_spans.py checkpoints/checkpoint_best.pt --out spans.png [--log-y]
    python scripts/plot_spans.py checkpoints/checkpoint_best.pt --no-plot     # the text table only
"""

import argparse
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_NAME = "adaptive_span_lm"
Z_KEY = re.compile(r"^decoder\.layers\.(\d+)\.self_attn\.span\.z$")


class SpanCheckpointError(ValueError):
    """The checkpoint cannot be plotted (another model, fixed span, missing config); the message says why."""


@dataclass(frozen=True)
class LayerSpans:
    layer: int  # 0-based index of the decoder layer
    z: List[float]  # per head (or one per layer)
    spans: List[float]  # tokens: min(L, ceil(z·L) + R), clamped at 0

    @property
    def mean(self) -> float:
        return sum(self.spans) / len(self.spans)

    @property
    def max(self) -> float:
        return max(self.spans)


@dataclass(frozen=True)
class CheckpointSpans:
    arch: str
    max_span: int  # L
    ramp: int  # R
    layers: List[LayerSpans]


def span_tokens(z: torch.Tensor, max_span: int, ramp: int) -> torch.Tensor:
    """min(L, ceil(z·L) + R) clamped at 0, in fp64 as ``AdaptiveSpanMask.spans()`` (z (K,) -> spans (K,))."""
    return (torch.ceil(z.detach().double() * max_span) + ramp).clamp(0, max_span)


def model_of_arch(arch: str) -> Optional[str]:
    """The registered model an arch preset belongs to (fairseq stores the arch as ``cfg['model']['_name']``);
    None when no registered model has that arch."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)  # run as `python scripts/plot_spans.py` from a checkout
    import fairseq_ext  # noqa: F401  (registers adaptive_span_lm and the other fairseq_ext models)
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    return ARCH_MODEL_NAME_REGISTRY.get(arch)


def _model_cfg(state: Dict[str, Any], path: str) -> Dict[str, Any]:
    cfg = state.get("cfg")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        has_args = state.get("args") is not None
        raise SpanCheckpointError(
            f"{path}: no cfg['model'] in the checkpoint"
            + (" (an argparse-era checkpoint: load and re-save it with fairseq >= 0.10 first)" if has_args else
               "; expected a checkpoint written by fairseq-train"))
    return cfg["model"]


def read_spans(path: str) -> CheckpointSpans:
    """Spans of every layer of the ``adaptive_span_lm`` checkpoint at ``path`` (weights-only load)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SpanCheckpointError(f"{path}: no such file") from None
    except Exception as exc:  # not a torch file, or not loadable weights-only
        raise SpanCheckpointError(f"{path}: cannot be read as a weights-only fairseq checkpoint: "
                                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise SpanCheckpointError(f"{path}: not a fairseq checkpoint (no 'model' state dict)")
    model_cfg = _model_cfg(state, path)
    arch = str(model_cfg.get("_name", model_cfg.get("arch")))
    name = model_of_arch(arch)
    if name != MODEL_NAME:
        raise SpanCheckpointError(f"{path}: not an {MODEL_NAME} checkpoint: its arch is {arch!r} (model "
                                  f"{name or 'not registered'}); only adaptive-span models learn spans")
    max_span, ramp = int(model_cfg["attn_span"]), int(model_cfg["adapt_span_ramp"])
    found = {int(m.group(1)): value for key, value in state["model"].items() for m in (Z_KEY.match(key),) if m}
    if model_cfg.get("fixed_span") or not found:
        raise SpanCheckpointError(
            f"{path}: a fixed-span {MODEL_NAME} checkpoint (arch {arch!r}, --fixed-span: every head attends to all "
            f"L = {max_span} positions); it has no learned spans to plot")
    layers = []
    for index in sorted(found):
        z = found[index].reshape(-1)
        layers.append(LayerSpans(index, z.double().tolist(), span_tokens(z, max_span, ramp).tolist()))
    return CheckpointSpans(arch, max_span, ramp, layers)


def _fmt(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def render_table(spans: CheckpointSpans) -> str:
    """Markdown table: layer (1-based, as the paper's figure), per-head spans, mean, max."""
    lines = [f"{spans.arch}: L = {spans.max_span}, R = {spans.ramp}; span = min(L, ceil(z·L) + R) tokens", "",
             "| layer | spans per head | mean | max |", "|---:|---|---:|---:|"]
    for layer in spans.layers:
        lines.append(f"| {layer.layer + 1} | {', '.join(_fmt(s) for s in layer.spans)} | {layer.mean:.1f} | "
                     f"{_fmt(layer.max)} |")
    every = [s for layer in spans.layers for s in layer.spans]
    lines += ["", f"average span {sum(every) / len(every):.1f}, largest {_fmt(max(every))} "
                  f"({len(every)} spans over {len(spans.layers)} layers)"]
    return "\n".join(lines) + "\n"


def plot(spans: CheckpointSpans, out: str, log_y: bool, title: Optional[str] = None) -> None:
    """One marker per head at x = layer (heads spread slightly around it), y = span; a dashed line at L."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import may leave the root at DEBUG
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("matplotlib is not installed: run scripts/install.sh (or pip install matplotlib), or pass "
                         "--no-plot for the text table only") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = max(len(layer.spans) for layer in spans.layers)
    width = 0.6 if heads > 1 else 0.0
    fig, ax = plt.subplots(figsize=(max(5.5, 0.6 * len(spans.layers) + 2.5), 3.8), dpi=120)
    for head in range(heads):
        xs, ys = [], []
        for layer in spans.layers:
            if head < len(layer.spans):
                offset = (head / (heads - 1) - 0.5) * width if heads > 1 else 0.0
                xs.append(layer.layer + 1 + offset)
                ys.append(layer.spans[head])
        ax.scatter(xs, ys, s=18, label=f"head {head + 1}" if heads <= 16 else None)
    ax.axhline(spans.max_span, color="grey", linestyle="--", linewidth=0.8, label=f"max span L = {spans.max_span}")
    ax.set_xlabel("layer")
    ax.set_ylabel("span (tokens)")
    ax.set_xticks([layer.layer + 1 for layer in spans.layers])
    if log_y:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, spans.max_span * 1.05)
    ax.set_title(title or f"learned attention spans: {spans.arch}", fontsize=10)
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2 if heads > 4 else 1, loc="best")
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a fairseq checkpoint of adaptive_span_lm (checkpoint_best.pt, ...)")
    p.add_argument("--out", default="spans.png", help="PNG to write (default: spans.png)")
    p.add_argument("--log-y", action="store_true", help="logarithmic span axis")
    p.add_argument("--title", default=None, help="plot title (default: the arch)")
    p.add_argument("--no-plot", action="store_true", help="print the table only (no matplotlib needed)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    opts = build_arg_parser().parse_args(argv)
    try:
        spans = read_spans(opts.checkpoint)
    except SpanCheckpointError as exc:
        print(f"plot_spans.py: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render_table(spans))
    if not opts.no_plot:
        plot(spans, opts.out, opts.log_y, opts.title)
        print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
