"""``split``: the SHA-RNN attention with its gates on the query side, one autograd function over [memory ; segment]
whose backward forms no key or value gradient for a memory that carries none. The gates scale features, so they
move to the (B, T, d) side exactly, and the values' dropout mask D (drawn over the memory, then the segment, as in
``naive``) commutes with g_v:

    (q_i ⊙ g_k) · m_j = q_i · (g_k ⊙ m_j)            (Σ_j p_ij D_j ⊙ m_j) ⊙ g_v = Σ_j p_ij dropout(g_v ⊙ m_j)

so no gated copy of the M + T keys and values is formed. With Q = q ⊙ g_k·scale, K = [memory ; segment] and
V = D ⊙ K (B, M + T, d):

    forward    S = Q Kᵀ (causal on the last T columns);  P = softmax(S);  P' = P ⊙ D_P;  Y = P' V
    backward   dP' = dY Vᵀ;  dS = P ⊙ (dP' ⊙ D_P - rowsum(P ⊙ dP' ⊙ D_P));  dQ = dS K
               d segment = dS[:, :, M:]ᵀ Q + D_seg ⊙ P'[:, :, M:]ᵀ dY        (the memory's likewise, only if needed)

A memory detached between training segments (truncated BPTT) takes no part in the key and value gradients: at
M = 3T the backward takes 10 instead of 16 products of T × T × d multiply-adds per call, and autograd's slice and
zero-fill passes over the (B, T, M + T) gradients are gone. Forward + backward on CPU at B 4, T 256, M 768, d 256,
dropout 0.1 (medians of 20 calls, several processes): ``naive`` 31-38 ms, the same split written with autograd
23-27 ms, this function 19-23 ms. The dropout masks are packed random bits (``ops/dropout``: the same draws as
``naive``'s ``dropout`` calls on CPU). Float32 / float64 outside autocast only (the packed float masks; an fp32
softmax); the dispatcher runs ``naive`` for other dtypes, under autocast and under ``torch.compile``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..dropout import FLOAT_MASK_DTYPES, draw_float_mask, quantized_drop_count


def split_unsupported(q: Tensor) -> Optional[str]:
    """Why ``split`` cannot run on ``q`` (None: it can)."""
    if q.dtype not in FLOAT_MASK_DTYPES:
        return f"its packed dropout masks are float32 / float64, got {q.dtype}"
    if torch.compiler.is_compiling():
        return "torch.compile cannot trace its packed random bits"
    if torch.is_autocast_enabled(q.device.type):
        return "under autocast its products and softmax would run in half precision inside the function"
    return None


def _mask(shape: Tuple[int, ...], k: int, like: Tensor) -> Tensor:
    """An inverted-dropout mask in {0, scale} of ``shape`` from packed bits (``ops/dropout``'s draws; zeros at
    dropout 1, as ``dropout`` gives)."""
    return draw_float_mask(shape, k, like.device, like.dtype)


class _SplitAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, memory: Optional[Tensor], segment: Tensor, dropout_p: float) -> Tensor:
        """q (B, T, d) scaled and gated, memory (B, M, d) or None, segment (B, T, d) -> P' V (B, T, d)."""
        b, t, d = segment.shape
        m = 0 if memory is None else memory.size(1)
        k = quantized_drop_count(dropout_p)
        keys = segment if memory is None else torch.cat([memory, segment], dim=1)  # (B, S, d), S = M + T
        mask_mem = _mask((b, m, d), k, segment) if k and m else None  # drawn first, as naive
        mask_seg = _mask((b, t, d), k, segment) if k else None
        values = keys
        if k:
            values = torch.empty_like(keys)  # (B, S, d) = D ⊙ K
            if m:
                torch.mul(memory, mask_mem, out=values[:, :m])
            torch.mul(segment, mask_seg, out=values[:, m:])
        scores = torch.bmm(q, keys.transpose(1, 2))  # (B, T, S)
        scores[:, :, m:].masked_fill_(torch.ones(t, t, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # (B, T, S)
        del scores
        mask_p = _mask(tuple(probs.shape), k, probs) if k else None  # (B, T, S)
        out = torch.bmm(probs * mask_p if k else probs, values)  # (B, T, d)
        ctx.save_for_backward(q, keys, values, probs, mask_p, mask_mem, mask_seg)
        ctx.memory_len = m
        ctx.memory_grad = memory is not None and ctx.needs_input_grad[1]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, keys, values, probs, mask_p, mask_mem, mask_seg = ctx.saved_tensors
        m = ctx.memory_len
        grad = grad.contiguous()  # (B, T, d)

        def value_grad(cols: slice, mask: Optional[Tensor]) -> Tensor:  # D ⊙ P'[:, :, cols]ᵀ dY
            kept = probs[:, :, cols] if mask_p is None else probs[:, :, cols] * mask_p[:, :, cols]
            dv = torch.bmm(kept.transpose(1, 2), grad)  # (B, |cols|, d)
            return dv if mask is None else dv.mul_(mask)

        d_seg = value_grad(slice(m, None), mask_seg)  # (B, T, d)
        d_mem = value_grad(slice(0, m), mask_mem) if ctx.memory_grad else None  # (B, M, d)
        d_probs = torch.bmm(grad, values.transpose(1, 2))  # (B, T, S)
        if mask_p is not None:
            d_probs.mul_(mask_p)
        d_scores = torch._softmax_backward_data(d_probs, probs, -1, probs.dtype)  # (B, T, S)
        del d_probs
        d_q = torch.bmm(d_scores, keys)  # (B, T, d)
        d_seg = torch.baddbmm(d_seg, d_scores[:, :, m:].transpose(1, 2), q)  # (B, T, d)
        if d_mem is not None:
            d_mem = torch.baddbmm(d_mem, d_scores[:, :, :m].transpose(1, 2), q)  # (B, M, d)
        return d_q, d_mem, d_seg, None


def sha_attention_split(q: Tensor, k_gate: Tensor, v_gate: Tensor, memory: Optional[Tensor], segment: Tensor,
                        scale: Optional[float], dropout_p: float) -> Tensor:
    """q (B, T, d), memory (B, M, d) or None, segment (B, T, d) (float32 / float64) -> (B, T, d)."""
    reason = split_unsupported(q)
    if reason is not None:
        raise ValueError(f"SHA-RNN attention impl 'split': {reason}; use --attn-impl naive or auto")
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    return _SplitAttention.apply(q * (k_gate * scale), memory, segment, dropout_p) * v_gate  # (B, T, d)
