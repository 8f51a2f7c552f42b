"""ALiBi attention through ``torch.nn.functional.scaled_dot_product_attention`` with a broadcast float bias.

The bias -m_h (i - j) and the causal mask are built in fp32 as one (1, H, T, S) tensor (never (B*H, T, S) as the
original fork does), rounded once to the attention dtype and broadcast over the batch. A decoder builds it once per
forward with ``alibi_sdpa_bias`` and passes it to every layer (``bias=``), so all layers share one T x S tensor,
also in autograd's saved tensors. Key padding adds a (B, 1, 1, S) term. Query rows with no visible key output zeros
(same contract as ``naive``).
SDPA is called through ``ops/sdpa.py`` (in CPU training with dropout: the same formula with a packed-bits mask).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..sdpa import sdpa
from .bias import alibi_bias, causal_mask


def _pad_value(dtype: torch.dtype) -> float:
    """Finite logit offset for padded keys: far below any ALiBi logit, yet representable (fp16 max is 65504)."""
    return -3.0e4 if dtype == torch.float16 else -1.0e9


def alibi_sdpa_bias(slopes: Tensor, q_len: int, k_len: int, *, q_offset: int = 0, causal: bool = True,
                    form: str = "relative", dtype: torch.dtype = torch.float32) -> Tensor:
    """The additive SDPA mask (1, H, T, S): ALiBi bias (computed in fp32, fp64 for fp64) plus -inf on future keys,
    rounded once to ``dtype`` (the attention's query dtype)."""
    acc = torch.promote_types(dtype, torch.float32)
    bias = alibi_bias(slopes, q_len, k_len, q_offset, form, acc)  # (H, T, S)
    if causal:
        future = causal_mask(q_len, k_len, q_offset, slopes.device)[None]  # (1, T, S)
        bias = bias.masked_fill_(future, float("-inf")) if form == "relative" else bias.masked_fill(
            future, float("-inf"))  # the key_index bias is an expanded view: no in-place write
    return bias.to(dtype)[None]  # (1, H, T, S)


def alibi_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, *, q_offset: int = 0,
                         key_padding_mask: Optional[Tensor] = None, causal: bool = True, form: str = "relative",
                         dropout_p: float = 0.0, bias: Optional[Tensor] = None) -> Tensor:
    """Same signature and result as ``alibi_attention_naive``; q: (B, H, T, D), k/v: (B, H, S, D).

    ``bias``: a precomputed ``alibi_sdpa_bias`` for exactly these arguments (shared across layers), or None.
    """
    t, s = q.size(2), k.size(2)
    mask = bias if bias is not None else alibi_sdpa_bias(slopes, t, s, q_offset=q_offset, causal=causal, form=form,
                                                         dtype=q.dtype)
    if mask.shape[-2:] != (t, s):
        raise ValueError(f"precomputed ALiBi bias is for {tuple(mask.shape[-2:])} query/key lengths, not {(t, s)}")
    if mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    row_empty: Optional[Tensor] = None
    if key_padding_mask is not None:
        # A large finite value (not -inf) keeps rows whose every key is padding finite; they are zeroed below.
        pad = key_padding_mask[:, None, None, :].to(q.dtype) * _pad_value(q.dtype)  # (B, 1, 1, S)
        mask = mask + pad  # (B, H, T, S)
        visible = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        if causal:
            visible = visible & ~causal_mask(t, s, q_offset, q.device)[None, None]  # (B, 1, T, S)
        row_empty = ~visible.any(dim=-1, keepdim=True)  # (B, 1, T|1, 1)
    out = sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, H, T, D)
    if row_empty is not None:
        out = out.masked_fill(row_empty, 0.0)
    return out
