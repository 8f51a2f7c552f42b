"""Precision flags work for every family or are refused naming what works (``fairseq_ext.compat.precision``).

* ``--bf16``: fairseq-train a few updates for every family's tiny preset, then ``fairseq-eval-lm --bf16`` really
  evaluates in bf16 (every linear layer sees bf16 inputs) and lands within a measured distance of the fp32
  evaluation of the same checkpoint. Without ``bf16_without_tpu`` training crashes in ``get_tpu_device``; without the
  ``prepare_for_inference_`` shim the "bf16" evaluation runs in fp32.
* ``--fp16`` with flat master weights on the CPU trains (without the ``build_fp32_params`` shim: "Torch not compiled
  with CUDA enabled").
* ``--amp`` on the CPU, ``--amp`` at inference, ``--amp`` with ``--bf16`` and ``fairseq-validate --bf16`` are refused
  with the message naming what works (without the checks they would run in fp32).
"""
import contextlib
import io
import logging
import math
import os
from typing import Dict, Iterator, List

import pytest
import torch
import torch.nn.functional as F
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.optim.fp16_optimizer import FP16Optimizer
from torch.overrides import TorchFunctionMode

from fairseq_ext.errors import ConfigError
from tests.harness import (USER_DIR, build_model, checkpoint_weights, fairseq_command, fairseq_eval_lm,
                           fairseq_preprocess, fairseq_train, logged_updates, random_corpus, tiny_dictionary,
                           training_cfg)

UPDATES = 4
COMMON = ["--tokens-per-sample", "12", "--max-update", str(UPDATES), "--save-interval-updates", "2",
          "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--seed", "1", "--no-progress-bar",
          "--log-format", "simple", "--log-interval", "1"]
ADAM = ["--optimizer", "adam", "--lr", "0.003"]
# family -> fairseq-train arguments (task, arch and what the family's recipes use)
FAMILIES: Dict[str, List[str]] = {
    "alibi": ["--task", "language_modeling", "--arch", "alibi_lm_tiny", "--sample-break-mode", "none",
              "--max-tokens", "48", "--criterion", "lm_loss", *ADAM],
    "transformer_xl": ["--task", "streaming_lm", "--arch", "transformer_xl_tiny", "--batch-size", "4", "--mem-len",
                       "12", "--adaptive-softmax-cutoff", "10,16", "--adaptive-softmax-factor", "2",
                       "--criterion", "lm_loss", *ADAM],
    "adaptive_span": ["--task", "streaming_lm", "--arch", "adaptive_span_tiny", "--batch-size", "4",
                      "--criterion", "lm_loss", "--optimizer", "adagrad_clip", "--adagrad-clip", "0.03",
                      "--lr", "0.07"],
    "fast_weight": ["--task", "streaming_lm", "--arch", "fast_weight_tiny", "--batch-size", "4",
                    "--criterion", "lm_loss", *ADAM],
    "fast_weight_carry": ["--task", "streaming_lm", "--arch", "fast_weight_tiny", "--carry-over-fast-weight",
                          "--fwp-normalize", "output", "--batch-size", "4", "--criterion", "lm_loss", *ADAM],
    "sha_rnn": ["--task", "streaming_lm", "--arch", "sha_rnn_tiny", "--max-memory", "40", "--batch-size", "4",
                "--criterion", "lm_loss", "--optimizer", "lamb_torch", "--min-trust", "0.25",
                "--trust-denominator", "update_norm", "--lr", "0.002"],
}
EVAL_ARGS = {"alibi": ["--task", "language_modeling", "--sample-break-mode", "none", "--tokens-per-sample", "12",
                       "--max-tokens", "64", "--context-window", "0"]}
STREAM_EVAL = ["--task", "streaming_lm", "--batch-size", "3", "--tokens-per-sample", "12"]
# |bits/token of fairseq-eval-lm --bf16 - the fp32 eval of the same checkpoint| on the 559-token valid split after
# 4 bf16 updates (losses ~4.5-5.0 bits). Measured: alibi 1.0e-4, transformer_xl 5e-5, fast_weight_carry 6e-5,
# fast_weight 3e-5, adaptive_span 1e-5, sha_rnn 2e-5 (per-token errors ~1e-2 nats average out over the split).
BF16_EVAL_TOL = 5e-4


@contextlib.contextmanager
def captured_log() -> Iterator[io.StringIO]:
    """Everything logged (INFO and up) while the block runs, as text: ``<logger> | <message>`` lines."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    handler.setFormatter(logging.Formatter("%(name)s | %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield text
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


class LinearInputDtypes(TorchFunctionMode):
    """The dtypes of the inputs of every ``F.linear`` call made inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    raw = tmp_path_factory.mktemp("precision-raw")
    return fairseq_preprocess(str(tmp_path_factory.mktemp("precision-bin")),
                              trainpref=random_corpus(os.path.join(raw, "train.txt"), 120, seed=30),
                              validpref=random_corpus(os.path.join(raw, "valid.txt"), 60, seed=31))


def train(data: str, save_dir: str, family: str, *extra: str) -> str:
    """fairseq-train in process (one thread); returns the log text."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with captured_log() as log:
            fairseq_train([data, "--user-dir", USER_DIR, *FAMILIES[family], *COMMON, "--save-dir", save_dir, *extra])
    finally:
        torch.set_num_threads(threads)
    return log.getvalue()


def eval_lm(data: str, checkpoint: str, family: str, *extra: str) -> float:
    """fairseq-eval-lm bits/token on the valid split (streaming for the streaming families)."""
    args = [data, "--user-dir", USER_DIR, "--path", checkpoint, "--gen-subset", "valid", "--cpu", "--num-workers",
            "0", "--no-progress-bar", *EVAL_ARGS.get(family, STREAM_EVAL), *extra]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return float(fairseq_eval_lm(args)["loss"])
    finally:
        torch.set_num_threads(threads)


def finite_updates(log: str) -> Dict[int, float]:
    """{update: training loss} of the log, checked finite."""
    losses = logged_updates(log)
    assert losses and all(math.isfinite(loss) for loss in losses.values()), losses
    return losses


def moved(save_dir: str, halfway: int) -> bool:
    """Whether any weight differs between the checkpoint after ``halfway`` updates and the last one."""
    before = checkpoint_weights(os.path.join(save_dir, f"checkpoint_1_{halfway}.pt"))
    after = checkpoint_weights(os.path.join(save_dir, "checkpoint_last.pt"))
    return any(not torch.equal(before[k], after[k]) for k in after)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_training_then_bf16_evaluation(family, data, tmp_path):
    save_dir = str(tmp_path)
    training = LinearInputDtypes()
    with training:
        log = train(data, save_dir, family, "--bf16")
    assert training.dtypes == {torch.bfloat16}, f"fairseq-train --bf16 ran linear layers on {training.dtypes}"
    assert sorted(finite_updates(log)) == list(range(1, UPDATES + 1))
    assert moved(save_dir, UPDATES // 2), "no parameter moved"

    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    evaluation = LinearInputDtypes()
    with evaluation:
        bf16 = eval_lm(data, checkpoint, family, "--bf16")
    assert evaluation.dtypes == {torch.bfloat16}, f"eval-lm --bf16 ran linear layers on {evaluation.dtypes}"
    fp32 = eval_lm(data, checkpoint, family)  # the same checkpoint loads and evaluates in fp32
    assert 0 < bf16 < 10 and abs(bf16 - fp32) < BF16_EVAL_TOL, (bf16, fp32)


@pytest.mark.slow
def test_flat_fp16_trains_on_cpu(data, tmp_path):
    log = train(data, str(tmp_path), "transformer_xl", "--fp16", "--max-update", "3")
    assert len(finite_updates(log)) == 3
    assert "loss_scale=" in log  # fairseq's FP16Optimizer (dynamic loss scaling) ran
    assert moved(str(tmp_path), 2), "no parameter moved"


def test_flat_fp16_master_weights_of_cpu_parameters():
    """FP16Optimizer's flat fp32 copy of CPU parameters: built, stepped, synced back into the fp16 model."""
    cfg = training_cfg("transformer_xl_tiny", ["--fp16", "--optimizer", "adam", "--lr", "0.1", "--cpu"],
                       task="streaming_lm")
    model = build_model("transformer_xl_tiny", tiny_dictionary(20), task="streaming_lm").half()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = FP16Optimizer.build_optimizer(cfg, params)
    assert optimizer.has_flat_params and list(optimizer.fp32_params) == [None]
    assert optimizer.fp32_params[None].numel() == sum(p.numel() for p in params)
    generator = torch.Generator().manual_seed(0)
    targets = [torch.randn(p.shape, generator=generator) for p in params]
    loss = sum((p.float() - t).pow(2).sum() for p, t in zip(params, targets))
    optimizer.backward(loss)
    optimizer.step()
    moved = [not torch.equal(a, b) for a, b in zip(before, params)]
    assert all(moved) and all(p.dtype == torch.float16 for p in params)


def test_bf16_inference_casts_the_model_for_inference_commands_only():
    """prepare_for_inference_ casts to bf16 for an inference command's --bf16; the hub interface (a checkpoint's
    training config, no --path) is left as fairseq has it."""
    parsed = options.parse_args_and_arch(options.get_eval_lm_parser(), ["/nonexistent", "--path", "x.pt", "--bf16"])
    eval_cfg = convert_namespace_to_omegaconf(parsed)
    model = build_model("adaptive_span_tiny", tiny_dictionary(20), task="streaming_lm")
    model.prepare_for_inference_(eval_cfg)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    spans = {name: dtypes.pop(name) for name in list(dtypes) if name.endswith(".span.z")}
    assert spans and set(spans.values()) == {torch.float32}  # the fp32 island stays
    assert set(dtypes.values()) == {torch.bfloat16}

    train_cfg = training_cfg("adaptive_span_tiny", ["--bf16"], task="streaming_lm")
    hub_model = build_model("adaptive_span_tiny", tiny_dictionary(20), task="streaming_lm")
    hub_model.prepare_for_inference_(train_cfg)
    assert {p.dtype for p in hub_model.parameters()} == {torch.float32}


@pytest.mark.parametrize("flags,match", [
    (["--amp"], "use --bf16 for mixed precision on the CPU"),
    (["--amp", "--bf16"], "pass only one of them"),
    (["--amp", "--fp16"], "pass only one of them"),
])
def test_amp_refused_for_cpu_training(flags, match):
    args = ["/nonexistent", "--user-dir", USER_DIR, "--task", "streaming_lm", "--arch", "transformer_xl_tiny",
            "--cpu", *flags]
    with pytest.raises(ConfigError, match=match):
        fairseq_train(args)


def test_amp_refused_at_inference():
    with pytest.raises(ConfigError, match=r"no fairseq inference command reads --amp.*use --bf16"):
        fairseq_eval_lm(["/nonexistent", "--user-dir", USER_DIR, "--path", "x.pt", "--amp", "--cpu"])


@pytest.mark.slow
def test_validate_refuses_bf16(tmp_path):
    """The fairseq-validate command (the config check sees that call_main runs validate's main)."""
    args = [str(tmp_path), "--user-dir", USER_DIR, "--task", "language_modeling", "--path", "x.pt", "--bf16", "--cpu",
            "--batch-size", "1"]
    proc = fairseq_command("fairseq-validate", args, check=False, timeout=120)
    assert proc.returncode == 1
    assert "error: fairseq-validate has no bf16 path" in proc.stderr and "fairseq-eval-lm --bf16" in proc.stderr
    assert "Traceback" not in proc.stderr
