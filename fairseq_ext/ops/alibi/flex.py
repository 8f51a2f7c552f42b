"""ALiBi attention through PyTorch FlexAttention: the bias is a ``score_mod`` and the causal / padding masks a
``block_mask``, so no (B, H, T, S) tensor is ever materialised.

score_mod(s, b, h, i, j) = s - m_h * (q_offset + i - j)   (relative form), or s + m_h * j (key-index form).

It runs through ``ops/flex_kernel.py`` (compiled on CUDA, eager forward-only on CPU). The query offset enters
``score_mod`` and ``mask_mod`` as a tensor, so a new offset (incremental decoding) does not recompile.
FlexAttention has no attention dropout; asking for it is an error.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..flex_kernel import cpu_forward_only, flex_kernel


def alibi_attention_flex(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, *, q_offset: int = 0,
                         key_padding_mask: Optional[Tensor] = None, causal: bool = True, form: str = "relative",
                         dropout_p: float = 0.0) -> Tensor:
    """Same signature and result as ``alibi_attention_naive``; q: (B, H, T, D), k/v: (B, H, S, D)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if dropout_p > 0.0:
        raise ValueError("attn_impl='flex' does not support attention dropout; use attn_impl='sdpa' or "
                         "--attention-dropout 0")
    q, k, v = cpu_forward_only([q, k, v], fallback="sdpa")
    b, h, t, _ = q.shape
    s = k.size(2)
    acc = torch.promote_types(q.dtype, torch.float32)
    slopes = slopes.to(device=q.device, dtype=acc)  # (H,)
    offset = torch.tensor(q_offset, device=q.device)  # a tensor: a new offset is data, not a recompile

    if form == "relative":
        def score_mod(score, bi, hi, qi, kj):
            return score - slopes[hi] * (qi + offset - kj).to(acc)
    else:
        def score_mod(score, bi, hi, qi, kj):
            return score + slopes[hi] * kj.to(acc)

    pad = key_padding_mask

    def mask_mod(bi, hi, qi, kj):
        keep = kj <= qi + offset if causal else kj >= 0
        if pad is not None:
            keep = keep & ~pad[bi, kj]
        return keep

    block_mask = create_block_mask(mask_mod, b if pad is not None else None, None, t, s, device=q.device)
    out = flex_kernel(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask)  # (B, H, T, D)
    return out
