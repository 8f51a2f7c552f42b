"""Reference Transformer-XL relative attention, Dai et al. 2019, Eq. (Sec. 3.3), written per (i, j):

    A[i, j] = ( (q_i + u) . k_j  +  (q_i + v) . r_{i+M-j} ) / sqrt(D)
    P = softmax_j(A masked to j <= i + M [and j > i + M - W]),   O = P V

r_d is gathered explicitly for every (i, j) (no relative shift); everything is materialised. It is the
specification the fast forms are tested against, O(T S D) memory.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..dropout import dropout
from .mask import xl_attention_mask


def xl_relative_attention_naive(q: Tensor, k: Tensor, v: Tensor, r: Tensor, content_bias: Tensor,
                                position_bias: Tensor, *, window: Optional[int] = None,
                                dropout_p: float = 0.0) -> Tensor:
    """q: (B, H, T, D); k, v: (B, H, S, D); r: (H, S, D), row c = encoding of distance S-1-c;
    content_bias (u), position_bias (v): (H, D). Returns (B, H, T, D)."""
    _, _, t, d = q.shape
    s = k.size(2)
    acc = torch.promote_types(q.dtype, torch.float32)
    i = torch.arange(t, device=q.device)[:, None]  # (T, 1)
    j = torch.arange(s, device=q.device)[None, :]  # (1, S)
    distance = i + (s - t) - j  # (T, S)
    row = (s - 1 - distance).clamp(0, s - 1)  # (T, S) row of r for that distance (clamped where masked)
    r_ij = r.to(acc)[:, row]  # (H, T, S, D)
    qu = (q + content_bias[:, None]).to(acc)  # (B, H, T, D)
    qv = (q + position_bias[:, None]).to(acc)  # (B, H, T, D)
    ac = torch.einsum("bhtd,bhsd->bhts", qu, k.to(acc))  # (B, H, T, S)
    bd = torch.einsum("bhtd,htsd->bhts", qv, r_ij)  # (B, H, T, S)
    scores = (ac + bd) / math.sqrt(d)  # (B, H, T, S)
    scores = scores.masked_fill(xl_attention_mask(t, s, window, q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (B, H, T, S)
    probs = dropout(probs, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, v.to(acc)).to(q.dtype)  # (B, H, T, D)
