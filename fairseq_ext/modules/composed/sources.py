"""Key/value sources of the composed core: what a softmax (or single-head) mixer reads besides the current tokens.

Every source answers ``read(x, state, project, keep) -> (k, v, before, new_state)``: the keys/values of the
context followed by those of x (B, T, C), ``before`` = how many context keys precede x's first token, and the state
after x (still open: the current segment may continue); ``close(state)`` is the state the next segment starts from.
``max_distance`` hides keys farther than it from a query (None: every earlier key is visible).

* ``segment``  the current segment only; incremental decoding caches the segment's inputs, dropped at the boundary.
* ``memory``   Transformer-XL's hidden-state memory (Dai et al. 2019, Sec. 3.2): the last M inputs of the layer,
               detached, re-projected with the current weights; query i sees M + i earlier keys.
* ``window``   a key/value cache of the last W projected keys and values; each query sees at most W earlier keys,
               so outputs do not depend on where segments are cut.
``keep`` (adaptive span, Sukhbaatar et al. 2019, Sec. 2.2) projects only the last ``keep`` cached entries: the keys
the span mask would zero anyway are never computed. The state keeps the full memory, so the span can grow.
Persistent slots (Sukhbaatar et al. 2019b) are owned by the mixer, not a source: they are learned, not read.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from fairseq_ext.state import HiddenCache, KVCache

SOURCES = ("segment", "memory", "window")
Projection = Callable[[Tensor], Tuple[Tensor, Tensor]]  # (B, S, C) -> k, v (B, H, S, D)
Read = Tuple[Tensor, Tensor, int, object]


class SegmentSource(nn.Module):
    kind = "segment"
    carries = False  # whether anything crosses a segment boundary
    max_distance: Optional[int] = None

    def read(self, x: Tensor, state: Optional[HiddenCache], project: Projection,
             keep: Optional[int] = None) -> Read:
        """x (B, T, C) -> (k, v (B, H, S, D), before, state)."""
        cached = None if state is None else state.hidden  # (B, S0, C)
        context = cached if cached is None or keep is None else cached[:, max(0, cached.size(1) - keep):]
        h = x if context is None else torch.cat([context, x], dim=1)  # (B, S, C)
        k, v = project(h)
        new = x.detach() if cached is None else torch.cat([cached, x.detach()], dim=1)  # (B, S0 + T, C)
        return k, v, h.size(1) - x.size(1), HiddenCache(new)

    def close(self, state: Optional[HiddenCache]) -> Optional[HiddenCache]:
        return None


class MemorySource(SegmentSource):
    kind = "memory"
    carries = True

    def __init__(self, mem_len: int) -> None:
        super().__init__()
        self.mem_len = _positive(mem_len, "memory")

    def close(self, state: Optional[HiddenCache]) -> Optional[HiddenCache]:
        return None if state is None else HiddenCache(state.hidden[:, -self.mem_len:])  # (B, M, C)

    def extra_repr(self) -> str:
        return f"mem_len={self.mem_len}"


class WindowSource(nn.Module):
    kind = "window"
    carries = True

    def __init__(self, window: int) -> None:
        super().__init__()
        self.max_distance = _positive(window, "window")

    def read(self, x: Tensor, state: Optional[KVCache], project: Projection, keep: Optional[int] = None) -> Read:
        k, v = project(x)  # (B, H, T, D)
        if state is not None:
            ck, cv = state.key, state.value  # (B, H, W', D)
            if keep is not None:
                ck, cv = ck[:, :, max(0, ck.size(2) - keep):], cv[:, :, max(0, cv.size(2) - keep):]
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)  # (B, H, S, D)
        before = k.size(2) - x.size(1)
        full_k = k if state is None or keep is None else torch.cat([state.key, k[:, :, before:]], dim=2)
        full_v = v if state is None or keep is None else torch.cat([state.value, v[:, :, before:]], dim=2)
        w = self.max_distance
        return k, v, before, KVCache(full_k[:, :, -w:].detach(), full_v[:, :, -w:].detach())

    def close(self, state: Optional[KVCache]) -> Optional[KVCache]:
        return state

    def extra_repr(self) -> str:
        return f"window={self.max_distance}"


def _positive(length: int, kind: str) -> int:
    if length < 1:
        raise ValueError(f"the {kind} source needs --mem-len >= 1 (its length), got {length}")
    return length


_BUILDERS = {"segment": lambda mem_len: SegmentSource(), "memory": MemorySource, "window": WindowSource}


def build_source(kind: str, mem_len: int) -> nn.Module:
    if kind not in _BUILDERS:
        raise ValueError(f"unknown key/value source {kind!r}; choose one of {SOURCES}")
    return _BUILDERS[kind](mem_len)
