"""The one contract for state carried across segments (docs/design.md, "State carried across segments").

Every stateful layer is pure: ``forward(x, state) -> (y, new_state)`` and never stores state on ``self``. States
are small frozen dataclasses of tensors whose leading dimension is the batch (stream) dimension B. They support:

* ``detach()``      -- cut the autograd graph (truncated BPTT between training steps);
* ``reorder(order)`` -- select / permute batch rows (beam search, fairseq's ``reorder_incremental_state``);
* ``batch_size``    -- B, so the owner can reset state when the number of streams changes;
* ``rows(start, stop)`` and ``cat_states(states)`` -- cut a state into row slices and join them back in row order
  (``streaming_lm --batch-split``).

Only the decoder base class keeps state between calls (per stream, "train" / "eval"); incremental decoding keeps
the very same objects in fairseq's ``incremental_state``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple, TypeVar, Union

import torch
from torch import Tensor

S = TypeVar("S", bound="SegmentState")


@dataclasses.dataclass(frozen=True)
class SegmentState:
    """Base class: a frozen dataclass whose fields are tensors (batch-first), tuples of tensors, or None.
    ``retired_fields``: fields older checkpoints' saved states hold and this class no longer has, with the only
    value ``state_from_plain`` accepts for them."""

    retired_fields: ClassVar[Dict[str, Any]] = {}

    def _map(self: S, fn) -> S:
        def apply(value):
            if isinstance(value, Tensor):
                return fn(value)
            if isinstance(value, SegmentState):
                return value._map(fn)
            if isinstance(value, tuple):
                return tuple(apply(v) for v in value)
            return value

        changes = {f.name: apply(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **changes)

    def detach(self: S) -> S:
        return self._map(lambda t: t.detach())

    def reorder(self: S, new_order: Tensor) -> S:
        """Select rows ``new_order`` (B',) of the batch dimension of every tensor."""
        return self._map(lambda t: t.index_select(0, new_order.to(t.device)))

    def rows(self: S, start: int, stop: int) -> S:
        """Rows [start, stop) of the batch dimension of every tensor (views); other fields unchanged."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows [{start}, {stop}) out of range for a {type(self).__name__} of batch size "
                             f"{self.batch_size}")
        return self._map(lambda t: t[start:stop])

    def to(self: S, device: Union[str, torch.device]) -> S:
        return self._map(lambda t: t.to(device))

    def contiguous(self: S) -> S:
        """Every tensor contiguous (a view of a larger buffer is copied: a checkpoint then holds only its rows)."""
        return self._map(lambda t: t.contiguous())

    def tensors(self):
        """Yield every tensor held, depth first."""
        stack = [getattr(self, f.name) for f in reversed(dataclasses.fields(self))]
        while stack:
            value = stack.pop()
            if isinstance(value, Tensor):
                yield value
            elif isinstance(value, SegmentState):
                stack.extend(getattr(value, f.name) for f in reversed(dataclasses.fields(value)))
            elif isinstance(value, tuple):
                stack.extend(reversed(value))

    @property
    def batch_size(self) -> int:
        for tensor in self.tensors():
            return tensor.size(0)
        raise ValueError(f"{type(self).__name__} holds no tensor; its batch size is undefined")


@dataclasses.dataclass(frozen=True)
class KVCache(SegmentState):
    """Keys and values of all tokens seen so far by one softmax-attention layer (incremental decoding).

    key, value: (B, H, S, D); key_padding_mask: (B, S) bool, True where the key is padding, or None.
    """

    key: Tensor
    value: Tensor
    key_padding_mask: Optional[Tensor] = None

    @property
    def length(self) -> int:
        return self.key.size(2)

    def append(self, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor]) -> "KVCache":
        """Return a cache extended by new keys/values (B, H, T, D) along the sequence dimension."""
        old_mask, new_mask = self.key_padding_mask, key_padding_mask
        if old_mask is not None or new_mask is not None:
            b, s, t = key.size(0), self.length, key.size(2)
            old_mask = old_mask if old_mask is not None else key.new_zeros((b, s), dtype=torch.bool)
            new_mask = new_mask if new_mask is not None else key.new_zeros((b, t), dtype=torch.bool)
            mask: Optional[Tensor] = torch.cat([old_mask, new_mask], dim=1)  # (B, S+T)
        else:
            mask = None
        return KVCache(torch.cat([self.key, key], dim=2), torch.cat([self.value, value], dim=2), mask)


@dataclasses.dataclass(frozen=True)
class FastWeightState(SegmentState):
    """Fast-weight memory of one linear-attention layer (Schlag et al. 2021): ``weight`` (B, H, D_k, D_v) in fp32 (or
    fp64), and ``key_sum`` (B, H, D_k), the running sum of keys of the normalised variants (None otherwise)."""

    weight: Tensor
    key_sum: Optional[Tensor] = None


@dataclasses.dataclass(frozen=True)
class HiddenCache(SegmentState):
    """One layer's cached inputs (B, S, C): the memory of earlier segments (Transformer-XL, adaptive span, the
    composed core's ``memory`` source), followed during incremental decoding by the tokens of the current segment
    read so far."""

    hidden: Tensor

    @property
    def length(self) -> int:
        return self.hidden.size(1)


@dataclasses.dataclass(frozen=True)
class SHARNNBlockState(SegmentState):
    """One SHA-RNN block's carried state (``modules/blocks/sha_rnn_block.py``, Merity 2019): LSTM ``h``, ``c``
    (B, d); ``memory`` (B, M, d) of ``lnmem`` outputs (attention blocks; None otherwise). The offset into an
    unfinished segment is the decoder's (``DecoderState.offset``)."""

    retired_fields = {"pending": 0}  # train streams saved before DecoderState held the offset here (always 0)

    h: Tensor
    c: Tensor
    memory: Optional[Tensor] = None


@dataclasses.dataclass(frozen=True)
class DecoderState(SegmentState):
    """Every decoder's whole state: one state per layer (a SegmentState or None) and ``offset``, the number of tokens
    of the current segment already read (0 at every segment boundary; > 0 only inside incremental decoding)."""

    layers: Tuple[Optional[SegmentState], ...]
    offset: int = 0


def cat_states(states: Sequence[Optional[SegmentState]]) -> Optional[SegmentState]:
    """Join row slices of one state back along the batch dimension, in the given order: the inverse of
    ``rows``. Tensors are concatenated on dim 0; every other field (None, ``DecoderState.offset``, the structure of
    nested states and tuples) must be the same in all slices. All None (a stateless step) gives None."""
    if not states:
        raise ValueError("cat_states needs at least one state")
    if all(state is None for state in states):
        return None
    if any(state is None for state in states):
        raise ValueError("cat_states: some slices have a state and others none")

    def join(values: Sequence[Any], where: str) -> Any:
        first = values[0]
        if isinstance(first, Tensor):
            if not all(isinstance(v, Tensor) for v in values):
                raise ValueError(f"cat_states: {where} is a tensor in some slices only")
            return torch.cat(list(values), dim=0)
        if isinstance(first, SegmentState):
            if not all(type(v) is type(first) for v in values):
                raise ValueError(f"cat_states: {where} has types {sorted({type(v).__name__ for v in values})}")
            return type(first)(**{f.name: join([getattr(v, f.name) for v in values], f"{where}.{f.name}")
                                  for f in dataclasses.fields(first)})
        if isinstance(first, tuple):
            if not all(isinstance(v, tuple) and len(v) == len(first) for v in values):
                raise ValueError(f"cat_states: {where} is a tuple of different lengths across slices")
            return tuple(join([v[i] for v in values], f"{where}[{i}]") for i in range(len(first)))
        if not all(v == first for v in values):  # None, numbers: one value for the whole batch
            raise ValueError(f"cat_states: {where} differs across slices ({list(values)}); only tensor rows "
                             f"can be joined")
        return first

    return join(list(states), "state")


def _state_classes() -> dict:
    """Every SegmentState subclass by class name (fairseq_ext's and any model's own)."""
    found, stack = {}, [SegmentState]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            found.setdefault(sub.__name__, sub)
            stack.append(sub)
    return found


def state_to_plain(state: Optional[SegmentState]):
    """A state as plain dicts/lists of tensors and numbers (what torch's weights-only checkpoint loader accepts);
    ``state_from_plain`` inverts it."""
    def encode(value):
        if isinstance(value, SegmentState):
            return {"__state__": type(value).__name__,
                    **{f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v) for v in value]}
        return value

    return None if state is None else encode(state)


def _hidden_memory(layers: Tuple[Tensor, ...], pending: int = 0) -> DecoderState:
    return DecoderState(tuple(HiddenCache(layer) for layer in layers), pending)


def _layer_states(layers: Tuple[Optional[SegmentState], ...]) -> DecoderState:
    return DecoderState(layers, 0)


# Classes of train streams saved before every decoder held one DecoderState: Transformer-XL's and adaptive span's
# per-layer memory (pending = the offset), fast weights' and SHA-RNN's tuple of layer states.
LEGACY_STATES = {"HiddenMemory": _hidden_memory, "LayerStates": _layer_states}


def state_from_plain(plain) -> Optional[SegmentState]:
    classes = _state_classes()

    def decode(value):
        if isinstance(value, dict) and "__state__" in value:
            name = value["__state__"]
            fields = {k: decode(v) for k, v in value.items() if k != "__state__"}
            if name in LEGACY_STATES:
                return LEGACY_STATES[name](**fields)
            if name not in classes:
                raise ValueError(f"unknown state class {name!r} in a checkpoint; known: {sorted(classes)}")
            cls = classes[name]
            for retired, default in cls.retired_fields.items():
                if retired in fields and fields.pop(retired) != default:
                    raise ValueError(f"a saved {name} holds {retired} != {default}, which this version no longer "
                                     f"keeps there; it cannot be resumed")
            return cls(**fields)
        if isinstance(value, dict) and "__tuple__" in value:
            return tuple(decode(v) for v in value["__tuple__"])
        return value

    return None if plain is None else decode(plain)
