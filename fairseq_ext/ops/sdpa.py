"""``sdpa``: scaled dot-product attention (Vaswani et al. 2017, Eq. 1, with dropout on the probabilities in training)

    O = dropout(softmax(Q K^T * scale + M)) V,        scale = 1 / sqrt(D) unless given,

as ``torch.nn.functional.scaled_dot_product_attention``, except in CPU training with dropout. PyTorch has no fused
CPU kernel with dropout: it takes its math path and draws one Bernoulli per probability (B·H·T·S draws), which was
15% of an ALiBi training step at the paper's dropouts (attention dropout 0.1; ``torch.profiler``, CPU, 2 threads).
There this runs the same formula with ``ops/dropout``'s packed-bits mask (four 16-bit draws per 64-bit random
number, the drop probability rounded to a multiple of 2^-16, as every CPU dropout of this project). Everywhere else
(CUDA, p = 0, under ``torch.compile``) it is ``F.scaled_dot_product_attention`` itself.

Masks follow SDPA: a bool ``attn_mask`` marks the keys a query may see, a float one is added to the scores,
``is_causal`` is the top-left causal mask (key j visible to query i iff j <= i). A query with no visible key outputs
zeros and passes no gradient, as SDPA's math path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dropout import packed_dropout, uses_packed_bits


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0, *,
         is_causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """q (..., T, D), k (..., S, D), v (..., S, Dv), attn_mask broadcastable to (..., T, S) -> (..., T, Dv).
    ``dropout_p`` applies whenever it is > 0: callers pass 0 in evaluation, as to SDPA."""
    if not uses_packed_bits(q, dropout_p, True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale)
    return sdpa_packed_dropout(q, k, v, attn_mask, dropout_p, is_causal=is_causal, scale=scale)


def sdpa_packed_dropout(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float, *,
                        is_causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """The formula above written out, with the probabilities' dropout mask from packed bits (one draw of
    B·H·T·S 16-bit uniforms)."""
    if is_causal and attn_mask is not None:
        raise ValueError("sdpa: give either attn_mask or is_causal, not both (as scaled_dot_product_attention)")
    t, s = q.size(-2), k.size(-2)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = torch.matmul(q * scale, k.transpose(-2, -1))  # (..., T, S); scaling q is the cheaper pass when S > D
    if is_causal:
        attn_mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()  # (T, S)
    if attn_mask is not None:
        if torch.broadcast_shapes(scores.shape, attn_mask.shape) != scores.shape:
            scores = scores.expand(torch.broadcast_shapes(scores.shape, attn_mask.shape)).clone()
        if attn_mask.dtype == torch.bool:
            scores.masked_fill_(~attn_mask, float("-inf"))  # in place: the product saved its inputs, not its output
        else:
            scores.add_(attn_mask)
    acc = torch.promote_types(scores.dtype, torch.float32)  # softmax in fp32 at least (fp16 / bf16 inputs)
    empty = torch.isneginf(scores.amax(dim=-1, keepdim=True)) if attn_mask is not None else None  # (..., T, 1)
    if empty is not None and bool(empty.any()):  # rows with no visible key: zeros, no NaN into the gradient
        probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1, dtype=acc).masked_fill(empty, 0.0)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=acc)  # (..., T, S)
    probs = probs.to(v.dtype)
    return torch.matmul(packed_dropout(probs, dropout_p), v)  # (..., T, Dv)
