"""``streaming_lm``'s evaluation protocols: the ``stream(B, T, cold | warm-up W tokens unscored)`` label, the
evaluation warm-up (``--eval-warmup-tokens``: run, never scored), and fairseq-eval-lm's argument checks."""
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq.logging import metrics
from torch import Tensor, nn

from fairseq_ext.data import StreamDataset
from fairseq_ext.errors import ConfigError

CONTEXT_WINDOW_ERROR = (
    "--task streaming_lm evaluates contiguous streams with carried state and does not support --context-window "
    "{window} (the sliding-window protocol). For streaming evaluation omit --context-window (protocol "
    "stream(B=--batch-size, T=--tokens-per-sample)); for a stateless model's sliding-window evaluation use "
    "--task language_modeling --context-window N."
)
WARMUP_KEY = "warmup_segment"  # logging output of a warm-up valid_step


def protocol_label(dataset: StreamDataset, memory: Optional[str] = None) -> str:
    """``stream(B=…, T=…, cold)`` or ``stream(B=…, T=…, warm-up W tokens unscored)``; B counts every stream.
    With ``memory`` (the model's ``memory_description``) the label says what is carried, e.g.
    ``…, memory: mem_len 64``."""
    warmup = (f"warm-up {dataset.warmup_tokens} tokens unscored" if dataset.warmup_tokens else "cold")
    label = f"stream(B={dataset.batch_size * dataset.num_shards}, T={dataset.tokens_per_sample}, {warmup})"
    return label if memory is None else f"{label}, memory: {memory}"


def eval_warmup_tokens(requested: int, tokens_per_sample: int) -> int:
    """W: ``--eval-warmup-tokens`` (``requested``) rounded up to a multiple of T."""
    if requested < 0:
        raise ConfigError(f"--eval-warmup-tokens must be >= 0, got {requested}: pass the evaluation mem_len for "
                          f"NVIDIA's warm-up protocol, or 0 (the default) for cold streams")
    return math.ceil(requested / tokens_per_sample) * tokens_per_sample


def with_eval_warmup(dataset: StreamDataset, warmup_tokens: int, tokens_per_sample: int,
                     split: str = "the evaluation split") -> StreamDataset:
    """``dataset`` with the evaluation warm-up W = ``warmup_tokens`` (``eval_warmup_tokens``)."""
    if warmup_tokens > len(dataset.tokens):
        raise ConfigError(f"--eval-warmup-tokens {warmup_tokens} (rounded up to a multiple of "
                          f"--tokens-per-sample {tokens_per_sample}) exceeds {split} "
                          f"({len(dataset.tokens):,} tokens): the warm-up would repeat the split; lower "
                          f"--eval-warmup-tokens to at most the split length or evaluate a longer split")
    return dataset.with_warmup(warmup_tokens)


def check_eval_lm(dataset: Any, batch_size: Optional[int], context_window: int) -> None:
    """fairseq-eval-lm's arguments: no ``--context-window``, a ``--batch-size`` (B), a StreamDataset."""
    if context_window > 0:
        raise ConfigError(CONTEXT_WINDOW_ERROR.format(window=context_window))
    if batch_size is None:
        raise ConfigError("fairseq-eval-lm --task streaming_lm needs --batch-size: the number of evaluation "
                          "streams B (the protocol is stream(B, T=--tokens-per-sample))")
    if not isinstance(dataset, StreamDataset):
        raise TypeError(f"--task streaming_lm evaluates StreamDatasets, got {type(dataset).__name__}")


def run_warmup_segment(sample: Dict[str, Any], model: nn.Module) -> Tuple[Tensor, int, Dict[str, Any]]:
    """valid_step of a warm-up segment: only run the model (filling the "eval" state); score nothing."""
    model.eval()
    with torch.no_grad():
        model(**sample["net_input"])
    return torch.zeros(()), 0, {WARMUP_KEY: 1, "ntokens": 0, "nsentences": 0, "sample_size": 0}


def reduce_warmup_metrics(logging_outputs: List[Dict[str, Any]]) -> bool:
    """If every logging output is a warm-up step's, log only a weightless ``loss`` and return True: the criterion
    has nothing to reduce (and some divide by the sample size), and without a ``loss`` key fairseq's trainer would
    log loss = -1 with weight 1 into the validation average."""
    if logging_outputs and all(log.get(WARMUP_KEY, 0) > 0 for log in logging_outputs):
        metrics.log_scalar("loss", 0.0, weight=0, round=3)
        return True
    return False
