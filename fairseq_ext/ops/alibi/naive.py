"""Reference ALiBi attention: the explicit masked softmax of Press et al. 2021, Eq. (Sec. 3).

    P = softmax(Q K^T / sqrt(D) - m_h (i - j) + causal mask + key padding mask),   O = P V

Everything is materialised; used as the specification the fast paths are tested against. Query rows with no
visible key (e.g. left padding) output zeros.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..dropout import dropout
from .bias import alibi_bias, causal_mask


def alibi_attention_naive(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, *, q_offset: int = 0,
                          key_padding_mask: Optional[Tensor] = None, causal: bool = True, form: str = "relative",
                          dropout_p: float = 0.0) -> Tensor:
    """q: (B, H, T, D); k, v: (B, H, S, D); slopes: (H,); key_padding_mask: (B, S) bool (True = pad).

    Query i sits at absolute position q_offset + i, keys at 0..S-1. Returns (B, H, T, D).
    """
    b, h, t, d = q.shape
    s = k.size(2)
    acc = torch.promote_types(q.dtype, torch.float32)  # accumulate in fp32 (fp64 when given fp64)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) / math.sqrt(d)  # (B, H, T, S)
    scores = scores + alibi_bias(slopes, t, s, q_offset, form, acc)[None]  # (B, H, T, S), bias after scaling
    visible = torch.ones(b, 1, t, s, dtype=torch.bool, device=q.device)  # (B, 1, T, S)
    if causal:
        visible = visible & ~causal_mask(t, s, q_offset, q.device)[None, None]
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    any_visible = visible.any(dim=-1, keepdim=True)  # (B, 1, T, 1)
    probs = torch.softmax(scores.masked_fill(~any_visible, 0.0), dim=-1)  # (B, H, T, S)
    probs = probs.masked_fill(~any_visible, 0.0)
    probs = dropout(probs, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, v.to(acc)).to(q.dtype)  # (B, H, T, D)
