"""The reference: explicit scores, softmax, then the soft span mask applied to the probabilities and renormalised
(Sukhbaatar et al. 2019, Eq. 4 with epsilon 0):

    a_ij = softmax_j(s · q_i·k_j + b_ij  over visible j),   a'_ij = m_ij a_ij / sum_j' m_ij' a_ij'

Scores, softmax and renormalisation in fp32 at least. A query row with no visible key outputs zeros.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..dropout import dropout


def biased_attention_naive(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], visible: Tensor,
                           span_mask: Optional[Tensor], scale: float, dropout_p: float = 0.0) -> Tensor:
    """q (B, H, T, D), k, v (B, H, S, D); bias, span_mask broadcastable to (B, H, T, S); visible (T, S) or
    broadcastable bool. Returns (B, H, T, D)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (B, H, T, S)
    if bias is not None:
        scores = scores + bias.to(acc)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (B, H, T, S)
    if span_mask is not None:
        probs = probs * span_mask.to(acc)
        probs = probs / probs.sum(-1, keepdim=True)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows without a visible key
    probs = dropout(probs, dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, v.to(acc)).to(v.dtype)  # (B, H, T, D)
