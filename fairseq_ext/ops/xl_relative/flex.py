"""Transformer-XL relative attention through PyTorch FlexAttention, in the gather form (Dai et al. 2019, Sec. 3.3):

    A[i, j] = ( (q_i + u) . k_j  +  BD[i, T - 1 - i + j] ) / sqrt(D),    BD = (q + v) R^T   (B, H, T, S)

Column c of the unshifted BD = (q + v) R^T holds distance S - 1 - c, and query i (the (S - T + i)-th key) sees key
j at distance S - T + i - j, i.e. column T - 1 - i + j. The score_mod reads that column of BD as a captured buffer,
so the relative shift is an index computation: BD is materialised once, never shifted or copied, and the content
scores, softmax and P V are FlexAttention's (the causal / same-length mask is a ``block_mask``). FlexAttention has
no attention dropout (an error). It runs through ``ops/flex_kernel.py`` (compiled on CUDA, eager forward-only on
CPU, which is what its CPU tests check against the naive reference).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..flex_kernel import cpu_forward_only, flex_kernel


def xl_relative_attention_flex(q: Tensor, k: Tensor, v: Tensor, r: Tensor, content_bias: Tensor,
                               position_bias: Tensor, *, window: Optional[int] = None,
                               dropout_p: float = 0.0) -> Tensor:
    """Same arguments as ``xl_relative_attention_naive``; returns (B, H, T, D)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if dropout_p > 0.0:
        raise ValueError("attn_impl='flex' has no attention dropout; use attn_impl='sdpa' or --attention-dropout 0")
    q, k, v, r, content_bias, position_bias = cpu_forward_only([q, k, v, r, content_bias, position_bias],
                                                               fallback="sdpa")
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
    return flex_kernel(q.device)(qu, k, v, score_mod=score_mod, block_mask=block_mask)  # (B, H, T, D)
