"""Shared test harness: numeric comparison, tiny builders, segment runners, in-process fairseq helpers.

Per-model test files stay thin and call these helpers.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from fairseq.data import Dictionary

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO_ROOT, "fairseq_ext")


def assert_close(actual: Tensor, expected: Tensor, *, atol: Optional[float] = None, rtol: Optional[float] = None,
                 msg: str = "") -> None:
    """torch.testing.assert_close with dtype-aware defaults (float64: 1e-10) and a readable max-error message."""
    if atol is None:
        atol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}.get(
            expected.dtype, 1e-5)
    if rtol is None:
        rtol = 0.0 if expected.dtype == torch.float64 else 1e-4
    err = (actual.detach().double() - expected.detach().double()).abs().max().item() if actual.numel() else 0.0
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol,
                               msg=lambda m: f"{msg} max abs err {err:.3e} (atol {atol}): {m}")


def assert_same_grads(fn_a: Callable[[], Tensor], fn_b: Callable[[], Tensor], inputs: Sequence[Tensor],
                      **tol) -> None:
    """Compare outputs of fn_a and fn_b and the gradients of a random projection of them w.r.t. ``inputs``."""
    out_a = fn_a()
    out_b = fn_b()
    assert_close(out_a, out_b, msg="outputs differ", **tol)
    weight = torch.randn_like(out_a)
    grads_a = torch.autograd.grad((out_a * weight).sum(), inputs, allow_unused=True)
    grads_b = torch.autograd.grad((out_b * weight).sum(), inputs, allow_unused=True)
    for i, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        assert (ga is None) == (gb is None), f"gradient {i}: one side is None"
        if ga is not None:
            assert_close(ga, gb, msg=f"gradient of input {i} differs", **tol)


def single_thread():
    """Body of a pytest fixture (``name = pytest.fixture(autouse=True)(single_thread)``): one intra-op thread while a
    test runs. The test models are tiny; on a busy 2-core machine OpenMP threads otherwise spin-wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def split_segments(tokens: Tensor, lengths: Sequence[int]) -> List[Tensor]:
    """Split (B, T) tokens along time into consecutive segments of the given lengths."""
    assert sum(lengths) == tokens.size(1), (lengths, tokens.shape)
    return list(torch.split(tokens, list(lengths), dim=1))


def run_in_segments(step: Callable[[Tensor, object], Tuple[Tensor, object]], tokens: Tensor,
                    lengths: Sequence[int], state: object = None) -> Tuple[Tensor, object]:
    """Run ``step(segment, state) -> (out (B, t, ...), state)`` over consecutive segments; concat outputs on time."""
    outs = []
    for seg in split_segments(tokens, lengths):
        out, state = step(seg, state)
        outs.append(out)
    return torch.cat(outs, dim=1), state


def stream_segments(decoder: torch.nn.Module, tokens: Tensor, lengths: Sequence[int],
                    state: object = None) -> Tuple[Tensor, object]:
    """A stateful decoder's ``forward_segment`` over consecutive segments of ``tokens`` (B, N), the state carried
    from one to the next: (features (B, N, C), final state)."""
    return run_in_segments(lambda seg, carried: decoder.forward_segment(seg, carried)[:2], tokens, lengths, state)


def tiny_dictionary(num_words: int = 50):
    """A fairseq Dictionary with the 4 specials plus ``num_words`` symbols w0..w{n-1}."""
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(num_words):
        d.add_symbol(f"w{i}")
    return d


class _DictTask:
    """The two attributes build_model needs from a language-modelling task."""

    def __init__(self, dictionary) -> None:
        self.source_dictionary = self.target_dictionary = dictionary


def training_cfg(arch: str, extra_args: Sequence[str] = (), task: str = "language_modeling",
                 data: str = "/nonexistent"):
    """The omegaconf config fairseq-train builds from these CLI args (arch preset applied)."""
    import fairseq_ext.models  # noqa: F401  (registers the plugin)
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data, "--arch", arch, "--task", task, *extra_args])
    return convert_namespace_to_omegaconf(args)


def build_model(arch: str, dictionary, extra_args: Sequence[str] = (), task: str = "language_modeling"):
    """Build a registered model exactly as fairseq-train does: CLI args -> arch preset -> dataclass config."""
    from fairseq import models

    return models.build_model(training_cfg(arch, extra_args, task).model, _DictTask(dictionary))


# ======================================================================================================================
# in-process fairseq train/eval helpers
# ======================================================================================================================
# fairseq's command-line programs run in this process (no subprocess, no console script): the arguments go through
# fairseq's own parsers and omegaconf conversion, so registered test-only models (imported by the test) resolve.


def random_corpus(path: str, num_lines: int, num_words: int = 20, max_len: int = 15, seed: int = 0,
                  total_tokens: Optional[int] = None) -> str:
    """Write ``num_lines`` lines of random words w0..w{num_words-1} (1..max_len words each) and return ``path``.

    With ``total_tokens`` the last line is sized so that the binarised split (every line plus its ``</s>``) has
    exactly that many tokens.
    """
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (num_lines,), generator=generator).tolist()
    if total_tokens is not None:
        lengths[-1] = total_tokens - num_lines - sum(lengths[:-1])
        if lengths[-1] < 0:
            raise ValueError(f"{num_lines} lines of up to {max_len} words exceed {total_tokens} tokens")
    with open(path, "w") as f:
        for length in lengths:
            words = torch.randint(0, num_words, (length,), generator=generator).tolist()
            f.write(" ".join(f"w{w}" for w in words) + "\n")
    return path


def fairseq_preprocess(destdir: str, trainpref: str, validpref: Optional[str] = None,
                       testpref: Optional[str] = None, srcdict: Optional[str] = None) -> str:
    """``fairseq-preprocess --only-source`` (language-model data) into ``destdir``; returns ``destdir``."""
    from fairseq import options
    from fairseq_cli import preprocess

    args = ["--only-source", "--trainpref", trainpref, "--destdir", destdir, "--workers", "1"]
    for flag, value in (("--validpref", validpref), ("--testpref", testpref), ("--srcdict", srcdict)):
        if value is not None:
            args += [flag, value]
    preprocess.main(options.get_preprocessing_parser().parse_args(args))
    return destdir


def generated_data_dir(tmp_path_factory, train_lines: int, valid_lines: int = 10) -> str:
    """A binarised corpus of random words (train and valid splits) in a fresh temporary directory: the body of a
    module-scoped ``data`` fixture."""
    raw = tmp_path_factory.mktemp("raw")
    return fairseq_preprocess(str(tmp_path_factory.mktemp("bin")),
                              trainpref=random_corpus(str(raw / "train.txt"), train_lines, seed=0),
                              validpref=random_corpus(str(raw / "valid.txt"), valid_lines, seed=1))


def split_token_count(data_dir: str, split: str) -> int:
    """Tokens in a binarised split: every line plus its ``</s>`` (= the number of LM targets)."""
    from fairseq.data import data_utils

    dataset = data_utils.load_indexed_dataset(os.path.join(data_dir, split), None)
    return int(dataset.sizes.sum())


def fairseq_train(args: Sequence[str]) -> None:
    """``fairseq-train ARGS`` in this process (single worker), through ``call_main`` like the command line (so the
    ``fairseq_ext.compat`` config checks run)."""
    from fairseq import options
    from fairseq.distributed import utils as distributed_utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train

    parsed = options.parse_args_and_arch(options.get_training_parser(), list(args))
    distributed_utils.call_main(convert_namespace_to_omegaconf(parsed), train.main)  # as fairseq-train's cli_main


def fairseq_eval_lm(args: Sequence[str]) -> dict:
    """``fairseq-eval-lm ARGS`` in this process, through ``call_main`` like the command line; returns fairseq's
    result: {"loss": bits/token, "perplexity"}."""
    from fairseq import options
    from fairseq.distributed import utils as distributed_utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import eval_lm

    parsed = options.parse_args_and_arch(options.get_eval_lm_parser(), list(args))
    return distributed_utils.call_main(convert_namespace_to_omegaconf(parsed), eval_lm.main)  # returns main's result


def streaming_eval_lm(data: str, checkpoint: str, caplog, *extra: str, split: str = "valid") -> Tuple[float, int, str]:
    """``fairseq-eval-lm --task streaming_lm`` on ``split`` (CPU, in process) -> (bits/token, the number of
    tokens fairseq reports as evaluated, the captured log)."""
    import logging
    import re

    args = [data, "--user-dir", USER_DIR, "--path", checkpoint, "--task", "streaming_lm", "--gen-subset", split,
            "--cpu", "--num-workers", "0", "--no-progress-bar", *extra]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        result = fairseq_eval_lm(args)
    scored = int(re.search(r"Evaluated ([0-9,]+) tokens", caplog.text).group(1).replace(",", ""))
    return float(result["loss"]), scored, caplog.text


def whole_stream_loss(model: torch.nn.Module, dictionary: "Dictionary", data: str, num_streams: int,
                      split: str = "valid") -> float:
    """Bits/token on ``split`` when each of the ``num_streams`` streams streaming_lm cuts it into (the lines
    concatenated, split into equal parts, the first ``N % B`` one token longer) is read in ONE forward pass of
    ``model.decoder.forward_segment`` with no carried state: the reference for streaming evaluation."""
    import math

    import numpy as np
    from fairseq.data import data_utils

    from fairseq_ext.data import concat_lines

    lines = data_utils.load_indexed_dataset(os.path.join(data, split), dictionary)
    stream = torch.from_numpy(concat_lines(lines, len(dictionary)).astype(np.int64))  # (N,)
    inputs = torch.cat([torch.tensor([dictionary.eos()]), stream[:-1]])  # (N,)
    n = len(stream)
    base, extra = divmod(n, num_streams)
    nll, start = 0.0, 0
    with torch.no_grad():
        for s in range(num_streams):
            length = base + (s < extra)
            x, y = inputs[start:start + length][None], stream[start:start + length][None]
            feats, _, _ = model.decoder.forward_segment(x, None)
            logits = model.decoder.output_layer(feats)  # (1, L, V) (features as they are with an adaptive softmax)
            lprobs = model.get_normalized_probs((logits, {}), log_probs=True)  # (1, L, V)
            nll -= lprobs.gather(-1, y[..., None]).sum().item()
            start += length
    return nll / n / math.log(2)


# ======================================================================================================================
# fairseq commands in subprocesses (several workers, signals, exit status)
# ======================================================================================================================

LAUNCH_ENV_DROP = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_JOB_NODELIST",
                   "SLURM_STEP_NODELIST")


def command_env(**extra: str) -> dict:
    """The environment for a fairseq command in a subprocess: no inherited torchrun/SLURM variables, one OpenMP
    thread per process (several workers share the CI machine's 2 cores)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV_DROP}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def fairseq_command(program: str, args: Sequence[str], timeout: float = 300, env: Optional[dict] = None,
                    check: bool = True):
    """Run ``.venv/bin/<program> ARGS`` (e.g. ``fairseq-train``, ``torchrun``); returns the CompletedProcess (stdout
    and stderr as text). With ``check``, a non-zero exit fails with the end of the output."""
    import subprocess
    import sys

    executable = os.path.join(os.path.dirname(sys.executable), program)
    proc = subprocess.run([executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=command_env() if env is None else env, cwd=REPO_ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{program} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def logged_updates(log: str) -> dict:
    """{num_updates: loss} from fairseq-train's ``train_inner`` lines (``--log-format simple --log-interval 1``)."""
    import re

    pattern = re.compile(r"train_inner \| .*?loss=([-0-9.e+]+|nan|inf).*?num_updates=(\d+)")
    return {int(m.group(2)): float(m.group(1)) for m in pattern.finditer(log)}


def checkpoint_weights(path: str) -> dict:
    """The tensors of a checkpoint's model state (extra state left out)."""
    from fairseq import checkpoint_utils

    state = checkpoint_utils.load_checkpoint_to_cpu(path)["model"]
    return {k: v for k, v in state.items() if torch.is_tensor(v)}
