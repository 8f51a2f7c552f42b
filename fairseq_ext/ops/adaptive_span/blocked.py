"""Banded adaptive-span attention: the skew layout (skew.py) per block of query rows, so the content and value
products cover each block's keys only (Sukhbaatar et al. 2019, arXiv 1905.07799, Sec. 2.2; spec adaptive_span.md
§1.3, "cost per head").

Query i attends to keys i .. i + L - 1 of [cache of L ; segment of M] (skew.py). The queries of a block of R rows
a .. a + R - 1 therefore need only the keys a .. a + R + L - 2: a window of W = R + L keys starting at a. Cutting the
M queries into n = M / R blocks and the keys into the n overlapping windows (``Tensor.unfold``, a view) gives, per
block, the skew form over (R, R + L) instead of (M, M + L):

    X_b = Q[a:a+R] K[a:a+W]^T            (R, W) content scores of block b, a = b R
    S_b = unskew(X_b) + Q[a:a+R] P       (R, L) window logits, as in skew.py (unskew: X_b[i, i + j])
    O_b = skew(A_b, W) V[a:a+W]          (R, D) with A_b the block's rows of the masked, renormalised probabilities

Every other step (softmax, span mask, renormalisation, dropout, persistent slots) runs on the same (B, H, M, L [+ N])
tensors as skew.py, in the same order, so dropout draws the same mask. The content and value products cost
M (R + L) D per head instead of M (M + L) D, and the largest saved tensors shrink from (M, M + L) to (M, R + L):
2.5x less at M = 256, L_pos = 64 (the start of training, when spans are short), 1.18x at L_pos = 1024.

The windows are copied once each way by ``windows``, whose backward adds the n window gradients into the key
rows (``Tensor.unfold``'s generic backward took 2.4 ms per call at B 8, H 4, L + M 384, D 64, R 64, W 192, against
0.4 ms for the n slice additions; the products would copy unfold's overlapping views anyway).

R is the largest divisor of M in [``MIN_ROWS``, ``BLOCK_ROWS``]; an M without one (a prime segment length, M below
``MIN_ROWS``) runs as one block, which is exactly skew.py. Outputs equal skew's to rounding (the value product sums
over W keys instead of M + L, most of them zeros there); tested against naive in float64 with gradients.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .skew import add_persistent_values, skew, unskew, window_weights

BLOCK_ROWS = 64  # query rows per block at most: the products stay large enough for efficient GEMMs
MIN_ROWS = 16  # fewer rows per block than this: one block (skew.py) instead of many small products


def block_rows(m: int, block: int = BLOCK_ROWS, min_rows: int = MIN_ROWS) -> int:
    """Query rows per block for an M-query segment: the largest divisor of M in [min_rows, block], else M."""
    for rows in range(min(block, m), min_rows - 1, -1):
        if m % rows == 0:
            return rows
    return m


class _Windows(torch.autograd.Function):
    """x (..., S, D) -> (..., n, W, D): the n windows of W rows starting every ``step`` rows, copied."""

    @staticmethod
    def forward(ctx, x: Tensor, width: int, step: int) -> Tensor:
        ctx.shape, ctx.width, ctx.step = x.shape, width, step
        return x.unfold(-2, width, step).transpose(-1, -2).contiguous()  # (..., n, W, D)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        out = grad.new_zeros(ctx.shape)  # (..., S, D)
        for i in range(grad.size(-3)):  # window i covers rows i step .. i step + W - 1
            out[..., i * ctx.step:i * ctx.step + ctx.width, :].add_(grad[..., i, :, :])
        return out, None, None


def windows(x: Tensor, width: int, step: int) -> Tensor:
    """x (..., S, D) -> (..., n, W, D) with n = (S - W) / step + 1, window i = rows i step .. i step + W - 1."""
    return _Windows.apply(x, width, step)


def adaptive_span_attention_blocked(q: Tensor, k: Tensor, v: Tensor, key_pe: Tensor,
                                    span_mask: Optional[Tensor] = None, pers_k: Optional[Tensor] = None,
                                    pers_v: Optional[Tensor] = None, *, dropout_p: float = 0.0, renorm: bool = True,
                                    eps: float = 1e-8, rows: Optional[int] = None) -> Tensor:
    """Same arguments as ``adaptive_span_attention_naive``; ``rows``: query rows per block, a divisor of M (None:
    ``block_rows(M)``). Returns (B, H, M, D)."""
    b, h, m, d = q.shape
    span = key_pe.size(-1)  # L; k, v: (B, H, L + M, D)
    rows = block_rows(m) if rows is None else rows
    if rows < 1 or m % rows:
        raise ValueError(f"blocked adaptive-span attention: {rows} rows per block do not divide the {m} queries")
    n, width = m // rows, rows + span  # blocks, keys per block
    qs = q * (1.0 / math.sqrt(d))  # (B, H, M, D) scaled before the matmuls (fp16-safe)
    keys = windows(k, width, rows)  # (B, H, n, W, D): block i's keys i R .. i R + W - 1
    content = unskew(torch.matmul(qs.view(b, h, n, rows, d), keys.transpose(-1, -2)), span)  # (B, H, n, R, L) view
    pos = torch.matmul(qs, key_pe.to(q.dtype))  # (B, H, M, L)
    logits = (content + pos.view(b, h, n, rows, span)).view(b, h, m, span)  # (B, H, M, L) new tensor
    probs = window_weights(qs, logits, span_mask, pers_k, dropout_p=dropout_p, renorm=renorm, eps=eps)
    weights = skew(probs[..., :span].reshape(b, h, n, rows, span), width)  # (B, H, n, R, W)
    values = windows(v, width, rows)  # (B, H, n, W, D)
    out = torch.matmul(weights, values).view(b, h, m, d)  # (B, H, M, D)
    return add_persistent_values(out, probs, span, pers_v)  # (B, H, M, D)
