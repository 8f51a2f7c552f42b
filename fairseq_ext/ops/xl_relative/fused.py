"""Fast Transformer-XL relative attention (Dai et al. 2019, Sec. 3.3 and Appendix B).

Both forms compute ``BD = (q + v) R^T`` once as a (B, H, T, S) matrix and realign it with the zero-copy
``rel_shift``; they differ in what follows:

* ``xl_relative_attention_shift``: the original algorithm, explicit scores ``(AC + BD) / sqrt(D)``, masked with
  -inf, softmax in fp32 (safe in fp16/bf16), attention dropout, ``P V``.
* ``xl_relative_attention_sdpa``: ``BD / sqrt(D)`` plus the mask becomes the additive ``attn_mask`` of
  ``scaled_dot_product_attention((q + u), k, v)``, so the content scores, softmax, dropout and ``P V`` run in
  torch's fused kernels (the memory-efficient kernel on GPU accepts the bias and returns its gradient).

Every query sees at least itself, so no row is fully masked. SDPA is called through ``ops/sdpa.py`` (in CPU
training with dropout: the same formula with a packed-bits mask).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..dropout import dropout
from ..sdpa import sdpa
from .mask import xl_attention_mask
from .shift import rel_shift


def _position_scores(q: Tensor, r: Tensor, position_bias: Tensor) -> Tensor:
    """(q + v) R^T realigned by distance: q (B, H, T, D), r (H, S, D) -> (B, H, T, S) strided view."""
    qv = q + position_bias[:, None]  # (B, H, T, D)
    return rel_shift(torch.matmul(qv, r.transpose(-1, -2)))  # (B, H, T, S)


def xl_relative_attention_shift(q: Tensor, k: Tensor, v: Tensor, r: Tensor, content_bias: Tensor,
                                position_bias: Tensor, *, window: Optional[int] = None,
                                dropout_p: float = 0.0) -> Tensor:
    """Same arguments as ``xl_relative_attention_naive``; returns (B, H, T, D)."""
    t, s, d = q.size(2), k.size(2), q.size(3)
    qu = q + content_bias[:, None]  # (B, H, T, D)
    ac = torch.matmul(qu, k.transpose(-1, -2))  # (B, H, T, S)
    scores = (ac + _position_scores(q, r, position_bias)) * (1.0 / math.sqrt(d))  # (B, H, T, S) new tensor
    scores = scores.masked_fill(xl_attention_mask(t, s, window, q.device), float("-inf"))
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 at least (fp64 stays fp64)
    probs = torch.softmax(scores, dim=-1, dtype=acc).to(q.dtype)  # (B, H, T, S)
    probs = dropout(probs, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, v)  # (B, H, T, D)


def xl_relative_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, r: Tensor, content_bias: Tensor,
                               position_bias: Tensor, *, window: Optional[int] = None,
                               dropout_p: float = 0.0) -> Tensor:
    """Same arguments as ``xl_relative_attention_naive``; returns (B, H, T, D)."""
    t, s, d = q.size(2), k.size(2), q.size(3)
    scale = 1.0 / math.sqrt(d)
    bias = _position_scores(q, r, position_bias) * scale  # (B, H, T, S) new tensor
    bias = bias.masked_fill(xl_attention_mask(t, s, window, q.device), float("-inf"))
    qu = q + content_bias[:, None]  # (B, H, T, D)
    return sdpa(qu, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
