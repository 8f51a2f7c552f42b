"""The relative shift of Transformer-XL (Dai et al. 2019, Appendix B; spec transformer_xl.md §1.3).

``BD = (q + v) R^T`` scores query i against every relative-encoding row; row c of R encodes distance S - 1 - c
(descending). Query i must read distance i + M - j at key j (M = S - T), i.e. column c = j + T - 1 - i:

    shifted[..., i, j] = BD[..., i, j + T - 1 - i]

* ``rel_shift_pad``: the original code's form (prepend a zero column, view (T, S+1) as (S+1, T), drop the first
  row, view back). One copy.
* ``rel_shift``: the same values as a zero-copy strided view: element (i, j) sits at flat offset
  (T - 1) + i (S - 1) + j of each (T, S) slice. Its backward (``unshift_grad``) writes the gradient back through the
  same offsets with two slice copies; autograd's generic ``as_strided`` backward (an index_add over the whole
  storage) took a fifth of a Transformer-XL training step on CPU at T = M = 512.

Entries above the causal diagonal (j > i + M) read the next row's values in both forms (the original does not
zero them); the caller must mask them, and must not write into the strided view (its junk entries alias real
ones of the next row).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rel_shift_pad(x: Tensor) -> Tensor:
    """x (..., T, S) -> (..., T, S) realigned by relative distance (original pad-and-view form, copies)."""
    *lead, t, s = x.shape
    padded = F.pad(x, (1, 0))  # (..., T, S+1) zero column in front
    return padded.reshape(*lead, s + 1, t)[..., 1:, :].reshape(*lead, t, s)  # (..., T, S)


def rel_shift(x: Tensor) -> Tensor:
    """x (..., T, S) -> (..., T, S) realigned by relative distance, as a strided view (no copy)."""
    t, s = x.shape[-2:]
    if t > s:
        raise ValueError(f"relative shift needs at least as many keys ({s}) as queries ({t})")
    return _RelShift.apply(x.contiguous())


def _strided_view(x: Tensor) -> Tensor:
    """The shifted view of a contiguous x (..., T, S)."""
    *lead, t, s = x.shape
    return x.as_strided((*lead, t, s), (*x.stride()[:-2], s - 1, 1), x.storage_offset() + (t - 1))


def unshift_grad(grad: Tensor) -> Tensor:
    """The gradient of ``rel_shift``: grad (..., T, S) of the shifted view -> (..., T, S) of its input. Element
    (i, j) of the view is flat offset (T - 1) + i (S - 1) + j, so columns 0..S-2 of all rows fill the contiguous
    block [T - 1, T - 1 + T (S - 1)) and column S - 1 of row i aliases column 0 of row i + 1 (added in)."""
    *lead, t, s = grad.shape
    if s == 1:  # then T == 1: the view is the input
        return grad.clone()
    flat = grad.new_zeros(*lead, t * s)  # (..., T S)
    flat[..., t - 1:t - 1 + t * (s - 1)] = grad[..., :, :s - 1].reshape(*lead, t * (s - 1))
    flat[..., t + s - 2::s - 1] += grad[..., :, s - 1]  # (..., T) the aliased last column
    return flat.view(*lead, t, s)


class _RelShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _strided_view(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return unshift_grad(grad)
