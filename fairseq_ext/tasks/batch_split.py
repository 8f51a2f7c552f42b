"""``streaming_lm --batch-split K``: a training batch run as K row slices, forward and backward per slice, each
StatefulDecoder continuing the same rows of its "train" state (``StatefulDecoder.stream_rows``). The criterion's
losses, sample sizes and logging outputs are sums over rows, so their sums over the slices are the whole batch's,
and fairseq's division of the summed gradient by the summed sample size is unchanged: the same losses, gradients
and carried state as K = 1, with less peak memory."""
import contextlib
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from fairseq.distributed import FullyShardedDataParallel
from torch import Tensor, nn

from fairseq_ext.criterions.lm_loss import STAT_COUNT, STAT_PREFIX
from fairseq_ext.errors import ConfigError
from fairseq_ext.models.base import StatefulDecoder

StepOutput = Tuple[Tensor, int, Dict[str, Any]]  # (loss, sample size, logging output) of one train_step


def row_slices(batch_size: int, parts: int) -> List[Tuple[int, int]]:
    """``--batch-split``: [start, stop) of ``parts`` consecutive row slices of a batch, sizes as
    ``torch.tensor_split`` (the first ``batch_size % parts`` slices have one more row)."""
    if parts > batch_size:
        raise ConfigError(f"--batch-split {parts} exceeds the {batch_size} streams of a training batch (--batch-size "
                          f"per worker): every slice needs at least one stream; use --batch-split <= {batch_size} "
                          f"or a larger --batch-size")
    bounds, start = [], 0
    for index in range(parts):
        stop = start + batch_size // parts + (1 if index < batch_size % parts else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def sample_rows(sample: Dict[str, Any], start: int, stop: int, pad: int) -> Dict[str, Any]:
    """Rows [start, stop) of a streaming batch: every tensor (``id`` (B,), ``net_input.src_tokens`` (B, T),
    ``net_input.src_lengths`` (B,), ``target`` (B, T), ...) is cut on its batch dimension, other values (``segment``,
    ``warmup``) are kept, and ``ntokens`` / ``nsentences`` are recounted for the slice."""
    batch_size = sample["net_input"]["src_tokens"].size(0)

    def cut(value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: cut(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, Tensor):
            if value.dim() == 0 or value.size(0) != batch_size:
                raise ValueError(f"--batch-split: sample[{key!r}] of shape {tuple(value.shape)} is not one row per "
                                 f"stream (B = {batch_size}); cannot slice it")
            return value[start:stop]
        return value

    rows = {key: cut(value, key) for key, value in sample.items()}
    rows["nsentences"] = stop - start
    rows["ntokens"] = int(rows["target"].ne(pad).sum())
    return rows


def merge_slice_logging_outputs(logging_outputs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One logging output for a batch from its row slices' (``--batch-split``): values are summed per key (losses,
    token and sentence counts and sample sizes are sums over rows), except ``lm_loss``'s module statistics
    (``stat:*``, averages over modules that the criterion counts once per batch in ``stat_count``), which are
    averaged over the slices so that the batch still counts once, as with K = 1."""
    merged: Dict[str, Any] = {}
    for logging_output in logging_outputs:
        for key, value in logging_output.items():
            merged[key] = merged[key] + value if key in merged else value
    parts = len(logging_outputs)
    for key in merged:
        if key.startswith(STAT_PREFIX):
            merged[key] = merged[key] / parts
        elif key == STAT_COUNT:
            merged[key] = merged[key] // parts if merged[key] % parts == 0 else merged[key] / parts
    return merged


def _no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """Data-parallel wrappers' ``no_sync`` (gradients accumulate locally; fairseq's trainer does the same between
    --update-freq micro-batches), except under FSDP, where fairseq prefers the communication to the memory."""
    if hasattr(model, "no_sync") and not isinstance(model, FullyShardedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def split_train_step(step: Callable[[Dict[str, Any]], StepOutput], sample: Dict[str, Any], model: nn.Module,
                     criterion: Any, decoders: Sequence[StatefulDecoder], parts: int, pad: int) -> StepOutput:
    """``step`` (fairseq's train_step on a sample) on ``parts`` row slices of ``sample`` in turn, each of
    ``decoders`` continuing the same rows of its "train" state; returns the summed loss and sample size and the
    merged logging output."""
    if not criterion.logging_outputs_can_be_summed():
        raise ConfigError(f"--batch-split needs a criterion whose logging outputs are sums over rows; "
                          f"{type(criterion).__name__}'s cannot be summed: use --batch-split 1 or lm_loss")
    batch_size = sample["net_input"]["src_tokens"].size(0)
    bounds = row_slices(batch_size, parts)
    losses: List[Tensor] = []
    sample_size, logging_outputs = 0, []
    for index, (start, stop) in enumerate(bounds):
        with contextlib.ExitStack() as stack:
            for decoder in decoders:
                stack.enter_context(decoder.stream_rows(start, stop, batch_size))
            if index < len(bounds) - 1:  # data parallel: all-reduce once, after the last slice
                stack.enter_context(_no_sync(model))
            loss, size, logging_output = step(sample_rows(sample, start, stop, pad))
        losses.append(loss.detach())
        sample_size += size
        logging_outputs.append(logging_output)
    return torch.stack(losses).sum(), sample_size, merge_slice_logging_outputs(logging_outputs)
