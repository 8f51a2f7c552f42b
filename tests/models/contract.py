"""Helpers of the stateful-model contract suite (tests/models/test_contract.py): rows, cached builds, stream /
incremental runners and a checkpoint writer. Nothing here knows a particular model.

A row is ``"<arch>"`` or ``"<arch>:<variant>"`` (several configurations of one arch); its command-line args come from
the suite's ``PRESETS`` table.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import fairseq_ext  # noqa: F401  (registers the plugin's models and tasks)
from fairseq_ext.criterions.lm_loss import aux_loss
from fairseq_ext.optim.bounds import collect_bounds
from tests.harness import _DictTask, split_segments, training_cfg

STREAM_SOURCE = "contract"  # attach_streams: consecutive calls continue the same streams
SHARPEN_STD = 0.3  # random parameters below this standard deviation are scaled up to it (see ``build``)


@dataclasses.dataclass(frozen=True)
class Properties:
    """What a row of the contract table states beyond its preset args (every field has the strict default).

    exact_segments: args added to the preset that make "[A;B] at once == A then B with carried state" exact for ANY
        segmentation (a memory at least as long as the sequence, no positions restarting per segment, ...); None:
        the model has no such setting, and ``not_exact`` says why (the segment-equivalence test is skipped, the
        streaming evaluation only counts tokens). The streaming-evaluation test also uses these args, and then
        compares eval-lm's number with each stream read in one pass.
    unused_parameters: {regex over parameter names: why the parameter legitimately gets no gradient}.
    warmup_invariant: W such that streaming evaluation with ``--eval-warmup-tokens W`` gives the same number for any
        number of streams and any segment length (every target sees the same context: a bounded receptive field
        <= W); None: the protocol promises no such invariance (only the token count is checked).
    """

    exact_segments: Optional[Tuple[str, ...]] = ()
    not_exact: str = ""
    unused_parameters: Dict[str, str] = dataclasses.field(default_factory=dict)
    warmup_invariant: Optional[int] = None

    def is_unused(self, name: str) -> bool:
        return any(re.fullmatch(pattern, name) for pattern in self.unused_parameters)


def arch_of(row: str) -> str:
    """``"fast_weight_tiny:sum"`` -> ``"fast_weight_tiny"``."""
    return row.split(":", 1)[0]


@functools.lru_cache(maxsize=None)
def _cfg(arch: str, args: Tuple[str, ...], data: str):
    """fairseq's parsed config (the slow part of a build: ~0.3 s of argparse/omegaconf), cached."""
    return training_cfg(arch, args, task="streaming_lm", data=data)


def row_cfg(row: str, presets: Dict[str, List[str]], extra: Sequence[str] = (), tokens_per_sample: int = 5,
            data: str = "/nonexistent"):
    """The omegaconf config of ``row`` (preset args, then ``extra``) under ``--task streaming_lm``."""
    args = (*presets[row], *extra, "--tokens-per-sample", str(tokens_per_sample))
    return _cfg(arch_of(row), args, data)


def build(row: str, presets: Dict[str, List[str]], dictionary, extra: Sequence[str] = (), tokens_per_sample: int = 5,
          dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    """A fresh model of ``row`` as fairseq-train builds it, in evaluation mode, its streams attached.

    Parameters that come out of the initialisation as one constant (zero biases, unit LayerNorm gains, zero gates,
    z = adapt_span_init) are redrawn (bounded ones uniformly inside their bounds), and random ones with a smaller
    standard deviation than ``SHARPEN_STD`` are spread around their mean to it, so that no path of the model is
    silent and the predictions clearly depend on the context: a contract violation must change the numbers beyond
    fp32 evaluation noise (an initialised Transformer-XL, std 0.02, predicts almost uniformly whatever its memory).
    """
    from fairseq import models

    torch.manual_seed(seed)
    model = models.build_model(row_cfg(row, presets, extra, tokens_per_sample).model, _DictTask(dictionary))
    generator = torch.Generator().manual_seed(1000 + seed)
    bounds = {id(param): (low, high) for param, low, high in collect_bounds(model)}
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() > 1 and bool((param == param.reshape(-1)[0]).all()):
                noise = torch.rand(param.shape, generator=generator, dtype=torch.float64)  # [0, 1)
                if id(param) in bounds:
                    low, high = bounds[id(param)]
                    param.copy_(low + (high - low) * noise)
                else:
                    param.add_(noise - 0.5)
            elif param.numel() > 1 and id(param) not in bounds and float(param.std()) < SHARPEN_STD:
                mean, std = param.mean(), float(param.std())
                param.sub_(mean).mul_(SHARPEN_STD / std).add_(mean)  # spread around the mean
    model = model.to(dtype).eval()
    model.decoder.attach_streams(STREAM_SOURCE)
    return model


def random_tokens(model, batch: int, length: int, seed: int = 1) -> Tensor:
    """(batch, length) real words (no specials) of the model's dictionary."""
    vocab = len(model.decoder.dictionary)
    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def log_probs(model, net_output) -> Tensor:
    """(B, T, V) log-probabilities of a model output (full or adaptive softmax)."""
    return model.get_normalized_probs(net_output, log_probs=True)


def stream_log_probs(model, tokens: Tensor, lengths: Sequence[int], fresh: bool = True) -> Tensor:
    """Log-probs (B, N, V) of ``tokens`` (B, N) fed through the decoder's stream API (the "eval" stream in eval mode,
    "train" in training mode) in consecutive segments of ``lengths``, the state carried by the decoder; with
    ``fresh`` that stream starts cold (the other one is left alone)."""
    if fresh:
        model.decoder.reset_state("train" if model.training else "eval")
    return torch.cat([log_probs(model, model(segment)) for segment in split_segments(tokens, lengths)], dim=1)


def incremental_log_probs(model, tokens: Tensor, chunks: Sequence[int],
                          incremental_state: Optional[dict] = None) -> Tensor:
    """Log-probs of ``tokens`` (B, N) decoded through fairseq's ``incremental_state``: at each call the decoder gets
    the whole prefix and consumes the next chunk of new tokens (``chunks`` sums to N)."""
    state = {} if incremental_state is None else incremental_state
    outs, end = [], 0
    for chunk in chunks:
        end += chunk
        outs.append(log_probs(model, model(tokens[:, :end], incremental_state=state)))
    assert end == tokens.size(1), (chunks, tokens.shape)
    return torch.cat(outs, dim=1)


def training_loss(model, tokens: Tensor, targets: Tensor) -> Tensor:
    """Summed NLL of ``targets`` plus the auxiliary terms the model's modules expose (as ``lm_loss`` adds them)."""
    nll = -log_probs(model, model(tokens)).gather(-1, targets[..., None]).sum()
    extra = aux_loss(model)
    return nll if extra is None else nll + extra


def write_checkpoint(model, cfg, path: str) -> str:
    """A checkpoint in fairseq-train's layout (cfg as plain containers: weights-only loadable) of ``model``."""
    from fairseq import checkpoint_utils
    from omegaconf import OmegaConf

    checkpoint_utils.torch_persistent_save(
        {"cfg": OmegaConf.to_container(cfg), "model": model.state_dict(), "args": None,
         "optimizer_history": [{"num_updates": 0, "criterion_name": "LMLossCriterion", "optimizer_name": "none",
                                "lr_scheduler_state": {}}],
         "extra_state": {}}, path)
    return path


def state_tensors(state) -> List[Tensor]:
    return [] if state is None else list(state.tensors())
