"""ALiBi attention through FlashAttention-2's ``flash_attn_func(..., alibi_slopes=...)`` (Dao 2023, arXiv
2307.08691; package ``flash-attn``), used only when that package imports: it is never a requirement (CUDA only,
fp16 / bf16 only).

flash-attn's documented bias: "(-alibi_slope * |i + seqlen_k - seqlen_q - j|) is added to the attention score of
query i and key j", after the 1/sqrt(D) scaling, with the causal mask aligned to the bottom right (query i sees keys
j <= i + S - T). That is this package's relative form -m_h (i + q_offset - j) when the T queries are the last T of
the S key positions (``q_offset == S - T``: training, evaluation windows and incremental decoding over a KV cache
all are), and the same softmax as the fork's ``key_index`` form m_h j (a per-row constant apart). Key padding
(flash-attn's varlen API) and non-causal attention (where its |i - j| is not ALiBi's causal bias) are refused.
Layout: flash-attn takes (B, T, H, D), this package (B, H, T, D). The slopes go in as float32 (H,).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

FlashKernel = Callable[..., Tensor]
HALF = (torch.float16, torch.bfloat16)


def load_flash_attn_func() -> FlashKernel:
    """``flash_attn.flash_attn_func``, or a clear error naming what is missing and what to use instead."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise RuntimeError(f"attn_impl 'flash' runs FlashAttention-2 with alibi_slopes, which does not import here "
                           f"({err}); it needs CUDA and `pip install flash-attn`. Use --attn-impl sdpa or flex") \
            from err
    return flash_attn_func


def alibi_attention_flash(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, *, q_offset: int = 0,
                          key_padding_mask: Optional[Tensor] = None, causal: bool = True, form: str = "relative",
                          dropout_p: float = 0.0, kernel: Optional[FlashKernel] = None) -> Tensor:
    """Same signature and result as ``alibi_attention_naive`` where flash-attn applies (see the module docstring);
    q: (B, H, T, D), k/v: (B, H, S, D) -> (B, H, T, D). ``kernel`` has ``flash_attn_func``'s signature (default:
    flash-attn's, imported now). ``form`` needs no handling: both forms give the same causal softmax."""
    t, s = q.size(2), k.size(2)
    if key_padding_mask is not None:
        raise ValueError("attn_impl 'flash' has no key padding mask (flash-attn's fixed-length API); use "
                         "--attn-impl sdpa")
    if not causal:
        raise ValueError("attn_impl 'flash' is causal only (flash-attn's non-causal ALiBi bias is -m |i - j|); use "
                         "--attn-impl sdpa")
    if q_offset != s - t:
        raise ValueError(f"attn_impl 'flash' needs the {t} queries to be the last of the {s} keys (q_offset "
                         f"{s - t}, got {q_offset}); use --attn-impl sdpa")
    if kernel is None:
        if q.device.type != "cuda" or q.dtype not in HALF:
            raise RuntimeError(f"attn_impl 'flash' runs on CUDA in fp16 / bf16 (got {q.device.type}, {q.dtype}); "
                               f"use --attn-impl sdpa")
        kernel = load_flash_attn_func()
    out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, T|S, H, D)
                 dropout_p=dropout_p, causal=True, alibi_slopes=slopes.to(device=q.device, dtype=torch.float32))
    return out.transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)
