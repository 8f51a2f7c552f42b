"""The activation of SHA-RNN's Boom layer (Merity 2019, arXiv 1911.11423, §3.3; spec sha_rnn.md §1.2):

    z = chunksum(dropout(gelu(a))),  gelu(a) = a · σ(1.702 a),  a = linear1(x) (B, T, d_ff)

where chunksum splits the d_ff features into d_ff / d chunks of width d and sums them (the Boom has no second
linear). ``boom_reference`` writes it as three steps under autograd. ``boom_activation`` is the same maths; in CPU
training with float32 / float64 (where dropout draws packed bits, ``ops/dropout``) it is one autograd function with
a hand-written backward, since the three steps' backward costs 7 passes over the (B, T, d_ff) tensor (the chunk sum's
broadcast gradient is copied before the mask multiplies it, and the GELU's product and sigmoid each allocate):

    dg = mask ⊙ broadcast(dz)                       (one pass: mask (B, T, d_ff/d, d) times dz (B, T, 1, d))
    da = dg ⊙ σ + 1.702 · σ'(1.702 a) ⊙ dg ⊙ a      (dg a, sigmoid_backward, the 1.702 in place, one addcmul)

five passes in all.

The forward draws the same bits as ``dropout`` would at the same point of the random stream, so outputs are
bitwise those of ``boom_reference``; gradients agree to rounding (tests/ops/test_boom.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fairseq_ext.ops.dropout import (FLOAT_MASK_DTYPES, draw_float_mask, dropout, packed_dropout,
                                     quantized_drop_count, uses_packed_bits)

GELU_COEF = 1.702


def gelu_1702(x: Tensor) -> Tensor:
    """The original's GELU approximation x·σ(1.702x)."""
    return x * torch.sigmoid(GELU_COEF * x)


def chunk_sum(z: Tensor, dim: int) -> Tensor:
    """z (..., d_ff) -> (..., d): the sum of its d_ff/d chunks of width d."""
    return z.view(*z.shape[:-1], -1, dim).sum(dim=-2)  # (..., d_ff/d, d) -> (..., d)


def boom_reference(a: Tensor, dim: int, p: float, training: bool,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """a (..., d_ff) -> (..., d), step by step: GELU, dropout, chunk sum. ``generator`` (CPU training only) draws
    the packed-bits mask from that generator instead of the default one."""
    g = gelu_1702(a)  # (..., d_ff)
    if generator is not None and uses_packed_bits(g, p, training):
        g = packed_dropout(g, p, generator)
    else:
        g = dropout(g, p, training)
    return chunk_sum(g, dim)


def boom_activation(a: Tensor, dim: int, p: float, training: bool,
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """a (..., d_ff) -> (..., d): ``boom_reference``'s result, fused in CPU float training (see the module
    docstring); elsewhere (CUDA, evaluation, half precision, inside torch.compile) it is ``boom_reference``."""
    if a.size(-1) % dim:
        raise ValueError(f"Boom: the inner width {a.size(-1)} must be a multiple of the model width {dim}")
    k = quantized_drop_count(p)
    if not (uses_packed_bits(a, p, training) and a.dtype in FLOAT_MASK_DTYPES and 0 < k < 1 << 16):
        return boom_reference(a, dim, p, training, generator)
    mask = draw_float_mask(a.shape, k, a.device, a.dtype, generator)  # (..., d_ff)
    return _GeluDropoutChunkSum.apply(a, mask, dim)


class _GeluDropoutChunkSum(torch.autograd.Function):
    """chunk_sum(gelu_1702(a) * mask) with the backward of the module docstring; saves a, σ(1.702 a) and the mask
    (what autograd saves for the three steps)."""

    @staticmethod
    def forward(ctx, a: Tensor, mask: Tensor, dim: int) -> Tensor:
        sig = torch.sigmoid(GELU_COEF * a)  # (..., d_ff)
        out = chunk_sum((a * sig).mul_(mask), dim)  # (..., d)
        ctx.save_for_backward(a, sig, mask)
        ctx.dim = dim
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None, None]:
        a, sig, mask = ctx.saved_tensors
        chunks = mask.view(*mask.shape[:-1], -1, ctx.dim)  # (..., d_ff/d, d)
        dg = (chunks * grad.unsqueeze(-2)).view(a.shape)  # (..., d_ff): the chunk sum's and dropout's backward
        inner = torch.ops.aten.sigmoid_backward(dg * a, sig).mul_(GELU_COEF)  # dg a σ(1 - σ) · 1.702
        return torch.addcmul(inner, dg, sig), None, None  # + dg σ
