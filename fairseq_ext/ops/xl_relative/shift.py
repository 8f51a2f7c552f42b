"""The relative shift of Transformer-XL (Dai et al. 2019, Appendix B; spec transformer_xl.md §1.3).

``BD = (q + v) R^T`` scores query i against every relative-encoding row; row c of R encodes distance S - 1 - c
(descending). Query i must read distance i + M - j at key j (M = S - T), i.e. column c = j + T - 1 - i:

    shifted[..., i, j] = BD[..., i, j + T - 1 - i]

* ``rel_shift_pad``: the original code's form (prepend a zero column, view (T, S+1) as (S+1, T), drop the first
  row, view back). One copy.
* ``rel_shift``: the same values as a zero-copy strided view: element (i, j) sits at flat offset
  (T - 1) + i (S - 1) + j of each (T, S) slice.

Entries above the causal diagonal (j > i + M) read the next row's values in both forms (the original does not
zero them); the caller must mask them, and must not write into the strided view (its junk entries alias real
ones of the next row).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def rel_shift_pad(x: Tensor) -> Tensor:
    """x (..., T, S) -> (..., T, S) realigned by relative distance (original pad-and-view form, copies)."""
    *lead, t, s = x.shape
    padded = F.pad(x, (1, 0))  # (..., T, S+1) zero column in front
    return padded.reshape(*lead, s + 1, t)[..., 1:, :].reshape(*lead, t, s)  # (..., T, S)


def rel_shift(x: Tensor) -> Tensor:
    """x (..., T, S) -> (..., T, S) realigned by relative distance, as a strided view (no copy)."""
    *lead, t, s = x.shape
    if t > s:
        raise ValueError(f"relative shift needs at least as many keys ({s}) as queries ({t})")
    x = x.contiguous()
    lead_strides = x.stride()[:-2]
    offset = x.storage_offset() + (t - 1)
    return x.as_strided((*lead, t, s), (*lead_strides, s - 1, 1), offset)  # (..., T, S)
