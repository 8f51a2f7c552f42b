"""Transformer-XL relative attention through PyTorch FlexAttention, in the gather form (Dai et al. 2019, Sec. 3.3):

    A[i, j] = ( (q_i + u) . k_j  +  BD[i, T - 1 - i + j] ) / sqrt(D),    BD = (q + v) R^T   (B, H, T, S)

Column c of the unshifted BD = (q + v) R^T holds distance S - 1 - c, and query i (the (S - T + i)-th key) sees key
j at distance S - T + i - j, i.e. column T - 1 - i + j. The score_mod reads that column of BD as a captured buffer,
so the relative shift is an index computation: BD is materialised once, never shifted or copied, and the content
scores, softmax and P V are FlexAttention's (the causal / same-length mask is a ``block_mask``). FlexAttention has
no attention dropout (an error). On CUDA it runs compiled; on CPU it stays eager and forward-only (torch 2.13 has no
CPU backward), which is what its CPU tests check against the naive reference.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
from torch import Tensor


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def xl_relative_attention_flex(q: Tensor, k: Tensor, v: Tensor, r: Tensor, content_bias: Tensor,
                               position_bias: Tensor, *, window: Optional[int] = None,
                               dropout_p: float = 0.0) -> Tensor:
    """Same arguments as ``xl_relative_attention_naive``; returns (B, H, T, D)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if dropout_p > 0.0:
        raise ValueError("attn_impl='flex' has no attention dropout; use attn_impl='sdpa' or --attention-dropout 0")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(
            x.requires_grad for x in (q, k, v, r, content_bias, position_bias)):
        raise ValueError("attn_impl='flex' has no backward pass on CPU in this torch version; use attn_impl='sdpa' "
                         "for CPU training (flex works for CPU inference and on GPU)")
    b, h, t, d = q.shape
    s = k.size(2)
    mem = s - t
    bd = torch.matmul((q + position_bias[:, None]) * (1.0 / math.sqrt(d)), r.transpose(-1, -2))  # (B, H, T, S)
    qu = q + content_bias[:, None]  # (B, H, T, D)

    def score_mod(score: Tensor, bi: Tensor, hi: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
        column = (t - 1 - qi + kj).clamp(0, s - 1)  # clamped: hidden (future) keys still index in range
        return score + bd[bi, hi, qi, column]

    def mask_mod(bi: Tensor, hi: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
        visible = kj <= qi + mem
        if window is not None:
            visible = visible & (kj > qi + mem - window)
        return visible

    block_mask = create_block_mask(mask_mod, None, None, t, s, device=q.device)
    kernel = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return kernel(qu, k, v, score_mod=score_mod, block_mask=block_mask)  # (B, H, T, D)
