"""The "train" stream in checkpoints, for exact resume: ``SavedTrainStream``, a mixin of ``StatefulDecoder``.

The decoder's "train" state is saved in the model's state dict (``<prefix>_extra_state``: the state as plain
dicts of contiguous tensors, weights-only loadable, plus the number of training segments that produced it; with
several data-parallel workers every rank's stream, gathered on rank 0 before each save). A loaded stream waits
until the task knows where training resumes (``has_saved_train_stream``), then is continued
(``resume_train_stream``) or dropped with the reason logged (``discard_saved_train_stream``).

It reads and writes the decoder's ``_streams["train"]`` and ``_train_segments`` and owns ``_pending_train`` (a
checkpoint's stream until resumed) and ``_gathered_train`` (every rank's stream for the next save, dropped when the
"train" stream moves on); ``StatefulDecoder.__init__`` creates all four.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from fairseq_ext.state import SegmentState, state_from_plain, state_to_plain

logger = logging.getLogger(__name__)


class SavedTrainStream(nn.Module):
    """The checkpoint side of a StatefulDecoder's "train" stream (see the module docstring)."""

    _streams: Dict[str, Optional[SegmentState]]
    _train_segments: int
    _pending_train: Optional[Dict[str, Any]]
    _gathered_train: Optional[List[Any]]

    def gather_train_stream(self, group: Any) -> None:
        """Collect every data-parallel rank's "train" stream on rank 0 of ``group`` for the next checkpoint.
        A collective: every rank of ``group`` calls it (``streaming_lm.gather_for_checkpoint``, before a save)."""
        import torch.distributed as dist

        plain = self._train_plain("cpu")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        gathered: Optional[List[Any]] = [None] * world if rank == 0 else None
        dist.gather_object(plain, gathered, dst=dist.get_global_rank(group, 0), group=group)
        self._gathered_train = gathered  # None on the other ranks

    def get_extra_state(self) -> Dict[str, Any]:
        """Saved in the model's state dict (key ``<prefix>_extra_state``): the "train" stream and how many training
        segments produced it, as plain tensors/dicts (weights-only loadable). With several data-parallel workers,
        "train" is rank 0's stream and "other_ranks" the others' (from ``gather_train_stream``; without a fresh
        gather, e.g. in ``crash.pt``, no stream is saved). A stream holding NaN/inf is not saved."""
        world = _world_size()
        streams: Optional[List[Any]] = [self._train_plain()]
        if world > 1:
            streams = self._gathered_train
        if streams is not None and not all(_finite(plain) for plain in streams):
            logger.warning("%s: the training streams hold NaN/inf; the checkpoint saves none (a resumed run starts "
                           "them cold)", type(self).__name__)
            streams = None
        return {"train": streams[0] if streams else None, "other_ranks": streams[1:] if streams else None,
                "train_segments": self._train_segments, "world_size": world}

    def _train_plain(self, device: Optional[str] = None) -> Any:
        """The "train" stream as plain dicts of contiguous tensors (on ``device``, if given), or None."""
        state = self._streams["train"]
        if state is None:
            return None
        return state_to_plain((state if device is None else state.to(device)).contiguous())

    def set_extra_state(self, extra: Optional[Dict[str, Any]]) -> None:
        """Keep a checkpoint's train stream until ``resume_train_stream`` knows where training resumes."""
        self._pending_train = extra if extra and extra.get("train") is not None else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        state_dict.setdefault(prefix + "_extra_state", None)  # converted/older checkpoints carry no stream
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def has_saved_train_stream(self) -> bool:
        """A loaded checkpoint's training streams wait for ``resume_train_stream``."""
        return self._pending_train is not None

    def resume_train_stream(self, segment: int) -> bool:
        """Called before a training step on segment ``segment`` of the streams, once the task has checked that the
        step continues the saved streams where they ended: continue this rank's saved stream if the checkpoint has
        it (same number of workers, every rank's stream saved) and it ends exactly before ``segment``."""
        pending, self._pending_train = self._pending_train, None
        if pending is None:
            return False
        saved_world, world, rank = pending.get("world_size", 1), _world_size(), _rank()
        others = pending.get("other_ranks") or []
        reason = None
        if saved_world != world:
            reason = f"the checkpoint holds the streams of {saved_world} worker(s), this run has {world}"
        elif len(others) != world - 1:
            reason = "the checkpoint holds only rank 0's stream (written without gathering every worker's)"
        elif segment != pending["train_segments"]:
            reason = f"training resumes at segment {segment}, the saved stream ends before {pending['train_segments']}"
        if reason is not None:
            self.discard_saved_train_stream(reason)
            return False
        plain = pending["train"] if rank == 0 else others[rank - 1]
        device = next(self.parameters()).device
        self._streams["train"] = None if plain is None else state_from_plain(plain).to(device)
        self._train_segments = segment
        logger.info("%s: resumed the training streams' state at segment %d", type(self).__name__, segment)
        return True

    def discard_saved_train_stream(self, reason: str) -> None:
        """Forget a loaded checkpoint's train stream: training starts the streams cold (logged with ``reason``)."""
        self._pending_train = None
        logger.info("%s: training streams start cold: %s", type(self).__name__, reason)


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else 1


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else 0


def _finite(plain: Any) -> bool:
    """Whether every floating-point tensor inside a plain state (nested dicts/lists/tuples) is finite."""
    if isinstance(plain, Tensor):
        return not plain.is_floating_point() or bool(torch.isfinite(plain).all())
    if isinstance(plain, dict):
        return all(_finite(value) for value in plain.values())
    if isinstance(plain, (list, tuple)):
        return all(_finite(value) for value in plain)
    return True
