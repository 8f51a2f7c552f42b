#!/usr/bin/env python
"""Training throughput and peak memory of ``alibi_lm`` vs stock sinusoidal ``transformer_lm`` vs the original fork.

Three models of the same size, trained (forward + backward + Adam step on random tokens) at each sequence length T:

* ``alibi``      -- ours, ``alibi_lm`` (``--attn-impl`` auto/sdpa/naive/flex, ``--alibi-bias-form``);
* ``sinusoidal`` -- fairseq's stock ``transformer_lm`` with sinusoidal position embeddings;
* ``fork``       -- the original ALiBi fork (ofirpress/attention_with_linear_biases @ 3b7c2ec) reproduced for this
  bench: stock ``TransformerDecoder`` without position embeddings whose ``buffered_future_mask`` returns a
  materialised 3-D float mask (B*H, T, T) = causal -inf + m_h * j (key-index form, row b*H + h), built from a
  ``(max_tokens // tokens_per_sample) * H`` bias buffer, cached, and passed to every layer as ``self_attn_mask``
  through stock ``MultiheadAttention`` (the ``F.multi_head_attention_forward`` path). See specs/alibi.md Sec. 1.3.

Every model is built the way ``fairseq-train`` builds it: fairseq's training parser (``--task dummy_lm``), the arch
registries, ``convert_namespace_to_omegaconf``, ``task.build_model`` / ``task.build_criterion``. The batch holds
``max(1, tokens_per_batch // T)`` sequences. Each (model, T) runs in a fresh subprocess by default, so memory
numbers do not leak between configurations; an out-of-memory configuration prints ``OOM`` in its row.

Peak memory is measured over the warm-up steps (weights, gradients, Adam state, activations and cached masks
included; transients of the one-off model construction excluded): on CUDA ``torch.cuda.max_memory_allocated``; on CPU the
maximum of live tensor bytes allocated through PyTorch's CPU allocator, replayed from ``torch.profiler``
(``profile_memory=True``) allocation/free events -- the CPU analogue of ``max_memory_allocated``. Throughput is
batch * T / (time of the fastest step after warm-up), each step synchronised on GPU -- the ``timeit`` convention:
slower repeats measure interference from other processes on a shared machine; the median is printed too.

    python scripts/bench_alibi.py                                   # d=256, 4 layers, T = 512..4096
    python scripts/bench_alibi.py --arch alibi_lm_wiki103 --vocab 267744 --dtype fp16 --tokens-per-batch 9216
"""

import argparse
import copy
import json
import os
import shlex
import sys
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from omegaconf import II
from torch import Tensor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run as `python scripts/bench_alibi.py` from a checkout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/benchlib.py
from benchlib import (DTYPES, Result, device_description, lm_sample, measure, memory_description,  # noqa: E402
                      namespace_config, run_worker, speed, timed, warm_up_peak)
from benchlib import cpu_peak_bytes  # noqa: E402,F401  (the CPU peak-memory measurement, tested through this module)
import fairseq  # noqa: E402
import fairseq_ext  # noqa: E402,F401  (registers alibi_lm and its archs with fairseq)
from fairseq import options, tasks, utils  # noqa: E402
from fairseq.models import ARCH_CONFIG_REGISTRY, MODEL_REGISTRY, register_model  # noqa: E402
from fairseq.models.transformer import TransformerDecoder  # noqa: E402
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig  # noqa: E402
from fairseq_ext.ops.alibi import IMPLS, BIAS_FORMS, alibi_slopes, resolve_impl  # noqa: E402

MODELS = ("alibi", "sinusoidal", "fork")
FORK_ARCH = "alibi_fork_lm"
# Dimensions used when no --arch preset is given (small enough for a CPU run).
DEFAULT_DIMS = {"layers": 4, "embed_dim": 256, "heads": 4, "ffn_dim": 1024}
DIM_FLAGS = {"layers": "--decoder-layers", "embed_dim": "--decoder-embed-dim", "heads": "--decoder-attention-heads",
             "ffn_dim": "--decoder-ffn-embed-dim"}
RESULT_PREFIX = "BENCH_ALIBI_RESULT "
MEMORY_WINDOW = "bench_alibi_warmup"


# --------------------------------------------------------------------------------------------------------------------
# The original fork, reproduced (bench-only code)
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class ForkLanguageModelConfig(TransformerLanguageModelConfig):
    """``transformer_lm``'s config plus the fork's one-line change: the model reads ``--max-tokens``."""

    max_tokens: Optional[int] = field(default=II("dataset.max_tokens"))


def fork_alibi_tile(slopes: Tensor, maxpos: int, batch: int) -> Tensor:
    """The fork's bias buffer: (batch*H, 1, maxpos) with row b*H + h = m_h * j, j = 0..maxpos-1 (key-index form)."""
    heads = slopes.numel()
    alibi = slopes.unsqueeze(1).unsqueeze(1) * torch.arange(maxpos).unsqueeze(0).unsqueeze(0).expand(heads, -1, -1)
    alibi = alibi.view(heads, 1, maxpos)
    return alibi.repeat(batch, 1, 1)  # tiles the (H, 1, maxpos) block: index b*H + h


class ForkAlibiDecoder(TransformerDecoder):
    """Stock ``TransformerDecoder`` with the fork's ``buffered_future_mask`` (commit 3b7c2ec, transformer.py).

    The bias buffer is a plain attribute sized from ``max_tokens // tokens_per_sample`` at construction (not a
    registered buffer); the mask is (B_max*H, T_max, T_max) with T_max = ``tokens_per_sample``, built once, cached,
    and sliced to [:B*H, :T, :T]. Stock fairseq calls this per layer on x (T, B, C); the fork called it once before
    the layer loop on x (B, T, C). Both return the same cached tensor, so the cost is identical. ``.to(tensor)``
    follows x's dtype: fp32 under ``--dtype fp16/bf16`` (autocast, like the fork under fairseq ``--amp``), fp16 only
    when the whole model is cast to half (the paper's ``--fp16`` runs).
    """

    def __init__(self, args, dictionary, embed_tokens, no_encoder_attn: bool = False) -> None:
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)
        self.maxpos = args.tokens_per_sample
        self.fork_heads = args.decoder_attention_heads
        self.alibi = fork_alibi_tile(alibi_slopes(self.fork_heads), self.maxpos, args.max_tokens // self.maxpos)

    def buffered_future_mask(self, tensor: Tensor) -> Tensor:
        dim, bsz = tensor.size(0), tensor.size(1)  # x is (T, B, C) at fairseq 0.12's call site
        if (self._future_mask.size(0) == 0 or not self._future_mask.device == tensor.device
                or self._future_mask.size(1) < self.maxpos):
            causal = torch.triu(utils.fill_with_neg_inf(torch.zeros([self.maxpos, self.maxpos])), 1)
            self._future_mask = causal.unsqueeze(0) + self.alibi  # (B_max*H, T_max, T_max)
        self._future_mask = self._future_mask.to(tensor)
        return self._future_mask[: bsz * self.fork_heads, :dim, :dim]


class ForkLanguageModel(TransformerLanguageModel):
    """``transformer_lm`` whose decoder is ``ForkAlibiDecoder`` (position embeddings off, as the fork never adds them)."""

    @classmethod
    def build_model(cls, args, task):
        if not args.no_token_positional_embeddings:
            raise ValueError(f"{FORK_ARCH} adds no position embeddings; set no_token_positional_embeddings")
        stock = super().build_model(args, task)  # stock token embeddings / adaptive input, exactly as transformer_lm
        decoder = ForkAlibiDecoder(args, task.target_dictionary, stock.decoder.embed_tokens, no_encoder_attn=True)
        return cls(decoder)


def register_fork_model() -> None:
    """Register ``alibi_fork_lm`` with fairseq once per process (the script may also be imported by tests)."""
    if FORK_ARCH not in MODEL_REGISTRY:
        register_model(FORK_ARCH, dataclass=ForkLanguageModelConfig)(ForkLanguageModel)


register_fork_model()


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------

def _int_list(text: str) -> List[int]:
    return [int(v) for v in text.replace(",", " ").split()]


def _model_list(text: str) -> List[str]:
    names = [v for v in text.replace(",", " ").split()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown}; choose from {MODELS}")
    return names


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", type=_model_list, default=list(MODELS), help=f"comma-separated subset of {MODELS}")
    p.add_argument("--seq-lens", type=_int_list, default=[512, 1024, 2048, 4096], help="sequence lengths T")
    p.add_argument("--tokens-per-batch", type=int, default=4096, help="batch = max(1, tokens_per_batch // T)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (peak memory measured here)")
    p.add_argument("--arch", default=None,
                   help="alibi_lm arch preset for all dimensions (e.g. alibi_lm_tiny, alibi_lm_wiki103); default: "
                        f"alibi_lm with {DEFAULT_DIMS}; --layers/--embed-dim/--heads/--ffn-dim override it")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--embed-dim", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--ffn-dim", type=int, default=None)
    p.add_argument("--vocab", type=int, default=10000, help="dictionary size incl. 4 specials (padded to x8)")
    p.add_argument("--attn-impl", choices=IMPLS, default="auto", help="alibi_lm attention kernel")
    p.add_argument("--alibi-bias-form", choices=BIAS_FORMS, default="relative", help="alibi_lm bias form")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="fp32, or autocast to bf16/fp16")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--isolation", choices=("subprocess", "none"), default="subprocess",
                   help="run each (model, T) in a fresh subprocess (clean memory numbers) or all in this process")
    p.add_argument("--timeout", type=float, default=None, help="seconds per configuration (subprocess isolation)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: "MODEL:T", run one configuration
    return p


def parse_bench_args(argv: Optional[Sequence[str]] = None) -> Namespace:
    opts = build_arg_parser().parse_args(argv)
    if opts.warmup < 1 or opts.steps < 1:
        raise SystemExit("--warmup and --steps must be >= 1 (peak memory is measured during warm-up)")
    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    return opts


def batch_size(tokens_per_batch: int, seq_len: int) -> int:
    return max(1, tokens_per_batch // seq_len)


# --------------------------------------------------------------------------------------------------------------------
# Building the models like fairseq-train
# --------------------------------------------------------------------------------------------------------------------

def fairseq_flags(opts: Namespace, seq_len: int) -> List[str]:
    """fairseq-train flags for the alibi_lm run at length ``seq_len`` (the other models copy its namespace)."""
    batch = batch_size(opts.tokens_per_batch, seq_len)
    flags = ["--task", "dummy_lm", "--dict-size", str(max(1, opts.vocab - 4)), "--tokens-per-sample", str(seq_len),
             "--max-tokens", str(batch * seq_len), "--batch-size", str(batch), "--arch", opts.arch or "alibi_lm",
             "--criterion", "cross_entropy", "--ddp-backend", "legacy_ddp", "--optimizer", "adam",
             "--seed", str(opts.seed), "--attn-impl", opts.attn_impl, "--alibi-bias-form", opts.alibi_bias_form]
    for name, flag in DIM_FLAGS.items():
        value = getattr(opts, name)
        if value is None and opts.arch is None:
            value = DEFAULT_DIMS[name]
        if value is not None:
            flags += [flag, str(value)]
    return flags


def base_namespace(opts: Namespace, seq_len: int) -> Namespace:
    """The alibi_lm run's flat namespace, arch defaults applied (as ``fairseq-train`` parses it)."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=fairseq_flags(opts, seq_len))
    if getattr(args, "adaptive_softmax_cutoff", None):
        args.criterion = "adaptive_loss"
    return args


def model_namespace(base: Namespace, model: str) -> Namespace:
    """Same dimensions as ``base``; only the arch and the position handling differ."""
    args = copy.deepcopy(base)
    if model == "sinusoidal":
        args.arch = "transformer_lm"
        args.no_token_positional_embeddings = False
        args.decoder_learned_pos = False
    elif model == "fork":
        args.arch = FORK_ARCH
        args.no_token_positional_embeddings = True
    elif model != "alibi":
        raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
    ARCH_CONFIG_REGISTRY[args.arch](args)
    return args


def fairseq_config(opts: Namespace, model: str, seq_len: int):
    """The structured config ``fairseq-train`` would run with (``convert_namespace_to_omegaconf``)."""
    return namespace_config(model_namespace(base_namespace(opts, seq_len), model))


def build_model_and_criterion(opts: Namespace, model: str, seq_len: int):
    """(task, model, criterion) on CPU in fp32, built through fairseq's config conversion and registries."""
    cfg = fairseq_config(opts, model, seq_len)
    utils.set_torch_seed(opts.seed)
    task = tasks.setup_task(cfg.task)
    return task, task.build_model(cfg.model), task.build_criterion(cfg.criterion)


def random_sample(task, batch: int, seq_len: int, device: torch.device, seed: int) -> Dict[str, Any]:
    """A language-modelling batch of random (non-special) tokens, in fairseq's sample format."""
    gen = torch.Generator().manual_seed(seed)
    vocab = task.dictionary
    return lm_sample(torch.randint(vocab.nspecial, len(vocab), (batch, seq_len + 1), generator=gen), device)


# --------------------------------------------------------------------------------------------------------------------
# Training steps, timing and peak memory
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class Trainee:
    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    sample: Dict[str, Any]
    device: torch.device
    dtype: torch.dtype


def make_trainee(opts: Namespace, model_name: str, seq_len: int) -> Trainee:
    device, dtype = torch.device(opts.device), DTYPES[opts.dtype]
    task, model, criterion = build_model_and_criterion(opts, model_name, seq_len)
    model.to(device).train()
    criterion.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    sample = random_sample(task, batch_size(opts.tokens_per_batch, seq_len), seq_len, device, opts.seed)
    return Trainee(model, criterion, optimizer, scaler, sample, device, dtype)


def train_step(t: Trainee) -> None:
    """One update: forward + loss (fairseq criterion) under autocast, backward, Adam step."""
    t.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(t.device.type, dtype=t.dtype, enabled=t.dtype != torch.float32):
        loss, sample_size, _ = t.criterion(t.model, t.sample)
    t.scaler.scale(loss / sample_size).backward()
    t.scaler.step(t.optimizer)
    t.scaler.update()


def build_and_warm_up(opts: Namespace, model_name: str, seq_len: int) -> Tuple[Trainee, int]:
    """Build the model and run the warm-up steps; return it with the peak memory (bytes) of those steps."""
    return warm_up_peak(torch.device(opts.device), lambda: make_trainee(opts, model_name, seq_len), train_step,
                        opts.warmup, MEMORY_WINDOW)


def run_config(opts: Namespace, model_name: str, seq_len: int) -> Result:
    """Benchmark one (model, T) in this process; a failure becomes status ``OOM`` or ``ERROR`` (traceback on stderr)."""
    batch = batch_size(opts.tokens_per_batch, seq_len)
    result: Result = {"model": model_name, "seq_len": seq_len, "batch": batch}
    torch.manual_seed(opts.seed)

    def run() -> Result:
        trainee, peak = build_and_warm_up(opts, model_name, seq_len)
        times = timed(lambda: train_step(trainee), opts.steps, trainee.device)
        return {**speed(batch * seq_len, times), "peak_mb": peak / 2 ** 20,
                "params": sum(p.numel() for p in trainee.model.parameters())}

    return measure(result, opts.device, run)


def run_isolated(argv: Sequence[str], model_name: str, seq_len: int, timeout: Optional[float]) -> Result:
    """Benchmark one (model, T) in a fresh Python process running this script with ``--worker``."""
    return run_worker(__file__, argv, f"{model_name}:{seq_len}", {"model": model_name, "seq_len": seq_len,
                                                                    "batch": None},
                      RESULT_PREFIX, timeout, f"{model_name} T={seq_len}")


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------

def model_label(model: str, opts: Namespace) -> str:
    if model == "alibi":
        form = "" if opts.alibi_bias_form == "relative" else f", {opts.alibi_bias_form}"
        return f"alibi_lm ({resolve_impl(opts.attn_impl)}{form})"
    if model == "sinusoidal":
        return "transformer_lm (sinusoidal)"
    return "fork (3-D B·H mask)"


def dims_description(opts: Namespace) -> str:
    m = fairseq_config(opts, "alibi", max(opts.seq_lens)).model
    adaptive = ", adaptive input/softmax" if m.adaptive_softmax_cutoff else ""
    return (f"arch {opts.arch or 'alibi_lm (custom)'}: {m.decoder_layers} layers, d={m.decoder_embed_dim}, "
            f"{m.decoder_attention_heads} heads, FFN {m.decoder_ffn_embed_dim}, vocab {opts.vocab}{adaptive}, "
            f"dropout {m.dropout}, attention dropout {m.attention_dropout}")


def _fmt_row(opts: Namespace, r: Dict[str, Any], reference: Optional[Dict[str, Any]]) -> str:
    label = model_label(r["model"], opts)
    batch = "-" if r.get("batch") is None else str(r["batch"])
    if r["status"] != "ok":
        return f"| {label} | {r['seq_len']} | {batch} | {r['status']} | - | - | - | - |"
    ratio = "n/a"
    if reference is not None and reference["status"] == "ok":
        ratio = f"{r['tokens_per_s'] / reference['tokens_per_s']:.2f}×"
    return (f"| {label} | {r['seq_len']} | {batch} | {r['tokens_per_s']:,.0f} | {ratio} | {r['peak_mb']:,.1f} "
            f"| {r['step_ms']:,.0f} / {r['median_step_ms']:,.0f} | {r['params'] / 1e6:.2f}M |")


def _find(results: Sequence[Dict[str, Any]], model: str, seq_len: int) -> Optional[Dict[str, Any]]:
    return next((r for r in results if r["model"] == model and r["seq_len"] == seq_len), None)


def _ok(result: Optional[Dict[str, Any]]) -> bool:
    return result is not None and result["status"] == "ok"


def target_lines(results: Sequence[Dict[str, Any]]) -> List[str]:
    """Check the two README targets against the measured numbers (``n/a`` where a row is missing or failed)."""
    lines = []
    a, s = _find(results, "alibi", 512), _find(results, "sinusoidal", 512)
    if _ok(a) and _ok(s):
        ratio = a["tokens_per_s"] / s["tokens_per_s"]
        lines.append(f"- ALiBi >= 0.95x sinusoidal throughput at T=512: {ratio:.3f}x -> "
                     f"{'met' if ratio >= 0.95 else 'NOT met'}")
    else:
        lines.append("- ALiBi >= 0.95x sinusoidal throughput at T=512: n/a (not measured)")
    long_lens = sorted({r["seq_len"] for r in results if r["seq_len"] >= 2048})
    for t in long_lens:
        a, f = _find(results, "alibi", t), _find(results, "fork", t)
        if _ok(a) and _ok(f):
            verdict = "met" if a["peak_mb"] < f["peak_mb"] else "NOT met"
            lines.append(f"- ALiBi peak memory < fork at T={t}: {a['peak_mb']:,.1f} vs {f['peak_mb']:,.1f} MB "
                         f"-> {verdict}")
        elif a is not None and f is not None:
            lines.append(f"- ALiBi peak memory < fork at T={t}: alibi {a['status']}, fork {f['status']}")
    if not long_lens:
        lines.append("- ALiBi peak memory < fork at T >= 2048: n/a (no T >= 2048 measured)")
    return lines


def render_report(opts: Namespace, results: Sequence[Dict[str, Any]], command: str,
                  load: Tuple[float, float] = (float("nan"), float("nan"))) -> str:
    """The markdown report: run header, one table row per (model, T), and the target checks."""
    device = torch.device(opts.device)
    header = [
        "## ALiBi training benchmark",
        "",
        f"- command: `{command}`",
        f"- device: {device_description(device)}; dtype: {opts.dtype}"
        f"{' (autocast)' if opts.dtype != 'fp32' else ''}; torch {torch.__version__}; fairseq {fairseq.__version__}",
        f"- model: {dims_description(opts)}",
        f"- batch = max(1, {opts.tokens_per_batch} // T) sequences; {opts.warmup} warm-up + {opts.steps} timed steps "
        f"(forward + backward + Adam); tokens/s from the fastest timed step (step ms: fastest / median); "
        f"isolation: {opts.isolation}",
        f"- peak memory: {memory_description(device)}",
        f"- host load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f} on {os.cpu_count()} CPUs",
        "",
        "| model | T | batch | tokens/s | vs sinusoidal | peak memory (MB) | step ms (min / median) | params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [_fmt_row(opts, r, _find(results, "sinusoidal", r["seq_len"])) for r in results]
    return "\n".join(header + rows + ["", "Targets:"] + target_lines(results)) + "\n"


def iter_configs(opts: Namespace) -> Iterator[Tuple[str, int]]:
    for seq_len in opts.seq_lens:
        for model in opts.models:
            yield model, seq_len


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_bench_args(argv)
    if opts.worker is not None:
        model, seq_len = opts.worker.split(":")
        print(RESULT_PREFIX + json.dumps(run_config(opts, model, int(seq_len))), flush=True)
        return 0
    results = []
    load_start = os.getloadavg()[0]
    for model, seq_len in iter_configs(opts):
        if opts.isolation == "subprocess":
            result = run_isolated(argv, model, seq_len, opts.timeout)
        else:
            result = run_config(opts, model, seq_len)
        print(f"[bench_alibi] {model} T={seq_len}: {result['status']}", file=sys.stderr, flush=True)
        results.append(result)
    command = shlex.join(["python", os.path.relpath(os.path.abspath(__file__), os.getcwd()), *argv])
    print(render_report(opts, results, command, (load_start, os.getloadavg()[0])), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
