"""The fast form: every term folded into one additive float mask for ``scaled_dot_product_attention``. The soft
span mask enters as log m (softmax(s + log m) = m·softmax(s) / sum, exactly the reference's renormalisation), and
positions with m = 0 or not visible as -inf; the log is taken where m > 0 only, so no NaN reaches the gradient.
SDPA is called through ``ops/sdpa.py`` (in CPU training with dropout: the same formula with a packed-bits mask)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..sdpa import sdpa


def attention_mask(bias: Optional[Tensor], visible: Tensor, span_mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """bias, span_mask (·, ·, T, S) or None; visible bool -> one additive mask broadcastable to (B, H, T, S)."""
    acc = torch.promote_types(dtype, torch.float32)
    if span_mask is not None:
        span_mask = span_mask.to(acc)
        positive = span_mask > 0
        log_mask = torch.where(positive, torch.log(span_mask.clamp_min(torch.finfo(acc).tiny)), float("-inf"))
        mask = log_mask.masked_fill(~visible, float("-inf"))
    else:
        mask = torch.zeros(visible.shape, dtype=acc, device=visible.device).masked_fill(~visible, float("-inf"))
    if bias is not None:
        mask = mask + bias.to(acc)
    return mask.to(dtype)


def biased_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], visible: Tensor,
                          span_mask: Optional[Tensor], scale: float, dropout_p: float = 0.0) -> Tensor:
    """Same arguments and result as ``biased_attention_naive``; rows with no visible key output zeros. Plain causal
    attention over the segment (no bias, no span mask, ``visible`` the square lower triangle) takes SDPA's causal
    kernel."""
    t, s = visible.shape[-2:]
    if bias is None and span_mask is None and t == s and torch.equal(visible, _causal(t, visible.device)):
        return sdpa(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    mask = attention_mask(bias, visible, span_mask, q.dtype)  # (·, ·, T, S)
    out = sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(torch.isneginf(mask).all(-1, keepdim=True), 0.0)  # (B, H, T, D)


def _causal(length: int, device: torch.device) -> Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()  # (T, T)
