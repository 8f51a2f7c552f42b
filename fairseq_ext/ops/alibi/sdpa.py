"""ALiBi attention through ``torch.nn.functional.scaled_dot_product_attention`` with a broadcast float bias.

The bias -m_h (i - j) and the causal mask are built once per call in fp32 as a (1, H, T, S) tensor (never
(B*H, T, S) as the original fork does), cast to the query dtype, and broadcast over the batch. Key padding adds a
(B, 1, 1, S) term. Query rows with no visible key output zeros (same contract as ``naive``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .bias import alibi_bias, causal_mask


def _pad_value(dtype: torch.dtype) -> float:
    """Finite logit offset for padded keys: far below any ALiBi logit, yet representable (fp16 max is 65504)."""
    return -3.0e4 if dtype == torch.float16 else -1.0e9


def alibi_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, *, q_offset: int = 0,
                         key_padding_mask: Optional[Tensor] = None, causal: bool = True, form: str = "relative",
                         dropout_p: float = 0.0) -> Tensor:
    """Same signature and result as ``alibi_attention_naive``; q: (B, H, T, D), k/v: (B, H, S, D)."""
    t, s = q.size(2), k.size(2)
    acc = torch.promote_types(q.dtype, torch.float32)
    bias = alibi_bias(slopes, t, s, q_offset, form, acc)  # (H, T, S) in fp32 (fp64 for fp64 inputs)
    if causal:
        bias = bias.masked_fill(causal_mask(t, s, q_offset, q.device)[None], float("-inf"))
    mask = bias[None]  # (1, H, T, S)
    row_empty: Optional[Tensor] = None
    if key_padding_mask is not None:
        # A large finite value (not -inf) keeps rows whose every key is padding finite; they are zeroed below.
        pad = key_padding_mask[:, None, None, :].to(acc) * _pad_value(q.dtype)  # (B, 1, 1, S)
        mask = mask + pad  # (B, H, T, S)
        visible = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        if causal:
            visible = visible & ~causal_mask(t, s, q_offset, q.device)[None, None]  # (B, 1, T, S)
        row_empty = ~visible.any(dim=-1, keepdim=True)  # (B, 1, T|1, 1)
    mask = mask.to(q.dtype)  # fp32 bias rounded once to the attention dtype
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, H, T, D)
    if row_empty is not None:
        out = out.masked_fill(row_empty, 0.0)
    return out
