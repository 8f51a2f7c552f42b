"""Adaptive-span attention op (Sukhbaatar et al. 2019, arXiv 1905.07799) with optional persistent memory
(All-attention, arXiv 1907.01470): ``adaptive_span_attention(q, k, v, key_pe, span_mask, pers_k, pers_v, impl=...)``.

Query i of the M-query segment attends to the L positions before it (keys [cache of L ; segment of M], key
indices i .. i + L - 1, distances L .. 1, never itself); ``key_pe`` column L - 1 is distance 1; the span mask
multiplies the softmax (context part only) and the row is renormalised jointly with the persistent slots.

The renormalisation a / (sum a + eps), eps = 1e-8 as the original, makes the result depend on the unmasked softmax
mass: trimmed and untrimmed windows (or the log-mask bias form) agree to ~eps / mass relative, exactly with eps = 0.

``impl="auto"`` picks ``fused`` on CPU in float32 / float64 when the scores are large
(``select_impl``); elsewhere ``blocked`` when the window is shorter than the segment (L < M: short spans, e.g. the
start of training, where the skew layout's (M, M + L) products are mostly wasted) and ``skew`` otherwise, each choice
logged once; ``skew`` is the original skew layout as zero-copy strided index maps; ``blocked`` is that layout per
block of query rows over each block's own keys (blocked.py); ``fused`` is blocked's layout run head group by head
group on cache-sized tiles with a hand-written backward (fused.py); ``naive`` gathers each query's L-key window (the
reference); ``flex`` is FlexAttention with the window and each head's span as a block mask (opt-in: no dropout, no
CPU backward; flex.py). An unknown implementation is an error.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from ..dispatch import ImplResolver
from .mask import (
    CACHE_SLACK,
    TRIM_GRANULARITY,
    SpanTrim,
    adaptive_span_mask,
    current_max_span,
    fit_keys,
    needed_keys,
    span_distances,
    span_mask_at,
    span_trim,
    trim_length,
)
from .blocked import BLOCK_ROWS, adaptive_span_attention_blocked, block_rows
from .fused import DTYPES as FUSED_DTYPES
from .fused import adaptive_span_attention_fused
from .naive import adaptive_span_attention_naive
from .skew import adaptive_span_attention_skew, skew, skew_pad, unskew, unskew_pad

IMPLS = ("auto", "naive", "skew", "blocked", "fused", "flex")


def _flex(*args, **kwargs) -> Tensor:
    from .flex import adaptive_span_attention_flex  # imported lazily, as ALiBi's: CPU-only installs import cleanly

    return adaptive_span_attention_flex(*args, **kwargs)


_KERNELS: Dict[str, Callable[..., Tensor]] = {
    "naive": adaptive_span_attention_naive,
    "skew": adaptive_span_attention_skew,
    "blocked": adaptive_span_attention_blocked,
    "fused": adaptive_span_attention_fused,
    "flex": _flex,
}

resolve_impl = ImplResolver("adaptive-span attention", IMPLS, "skew", "strided skew layout, no padded copies")
_resolve_short_window = ImplResolver("adaptive-span attention, window L shorter than the segment M", IMPLS, "blocked",
                                     f"skew layout per block of at most {BLOCK_ROWS} query rows over its own keys")
_resolve_cpu = ImplResolver("adaptive-span attention on CPU", IMPLS, "fused",
                            "banded skew layout on cache-sized tiles of heads, hand-written backward")


FUSED_MIN_BYTES = 8 << 20  # skew's (B H, M, L + M) scores from this size on: fused (measured on CPU, below)


def select_impl(impl: str, window: int, segment: int, *, device_type: str = "cpu",
                dtype: torch.dtype = torch.float32, batch_heads: int = 1) -> str:
    """The kernel ``adaptive_span_attention`` runs: an explicit ``impl`` as given (validated); ``auto`` -> ``fused``
    on CPU in float32 / float64 once the skew layout's (B H, M, L + M) scores reach ``FUSED_MIN_BYTES`` (fused.py
    keeps each head group's steps in cache: the op 1.3-2.3x faster than ``skew`` at B 8, H 4, M 256, L 320-1024;
    with N = 1,024 persistent slots 1.7x ``skew`` at B 2, H 4, M 256, L 1,024 and 2.0x ``blocked`` at B 2, H 8,
    M 512, L 64; below that size everything fits the cache and fused's loop costs more: 0.87x skew in training at
    B 1, H 4, M 256, L 1024, 0.88x blocked at B 1, H 4, M 256, L 64, N 1,024); otherwise ``blocked`` when the window
    L is shorter than the segment M (there it does M (R + L) instead of M (M + L) work: the op, forward and
    backward, 1.6-2.3x faster on CPU at L 64, M 256-512), else ``skew`` (at L >= M the blocks' overlapping key
    windows cost about as much as the work they save)."""
    if (impl == "auto" and device_type == "cpu" and dtype in FUSED_DTYPES
            and batch_heads * segment * (window + segment) * torch.finfo(dtype).bits // 8 >= FUSED_MIN_BYTES):
        return _resolve_cpu(impl)
    if impl == "auto" and window < segment:
        return _resolve_short_window(impl)
    return resolve_impl(impl)


def adaptive_span_attention(q: Tensor, k: Tensor, v: Tensor, key_pe: Tensor, span_mask: Optional[Tensor] = None,
                            pers_k: Optional[Tensor] = None, pers_v: Optional[Tensor] = None, *,
                            dropout_p: float = 0.0, renorm: bool = True, eps: float = 1e-8,
                            impl: str = "auto") -> Tensor:
    """q: (B, H, M, D); k, v: (B, H, L + M, D) = [cache of L ; segment of M] (use ``fit_keys`` to cut or zero-pad a
    cache to L); key_pe: (D, L) shared or (H, D, L), column j = distance L - j; span_mask: (H, L) or (L,) from
    ``adaptive_span_mask(z, max_span, ramp, length=L)`` or None (no mask, no renormalisation); pers_k: (H, D, N)
    and pers_v: (H, N, D) persistent vectors as stored (multiplied by sqrt(D) and sqrt(N) here); renorm=False
    skips the renormalisation after masking (fairseq example compatibility only). Returns (B, H, M, D)."""
    m, s, span = q.size(2), k.size(2), key_pe.size(-1)
    if s != span + m:
        raise ValueError(f"keys must be [cache of L={span} ; segment of M={m}] = {span + m} positions, got {s}: "
                         f"cut or zero-pad the cache with fit_keys")
    if v.size(2) != s:
        raise ValueError(f"values ({v.size(2)}) and keys ({s}) differ in length")
    if span_mask is not None and span_mask.size(-1) != span:
        raise ValueError(f"span mask has {span_mask.size(-1)} columns, key_pe {span}: slice the mask to the window")
    if (pers_k is None) != (pers_v is None):
        raise ValueError("persistent memory needs both pers_k and pers_v")
    if pers_k is not None and pers_k.size(-1) != pers_v.size(-2):
        raise ValueError(f"pers_k has {pers_k.size(-1)} slots, pers_v {pers_v.size(-2)}")
    kernel = select_impl(impl, span, m, device_type=q.device.type, dtype=q.dtype, batch_heads=q.size(0) * q.size(1))
    return _KERNELS[kernel](q, k, v, key_pe, span_mask, pers_k, pers_v, dropout_p=dropout_p, renorm=renorm, eps=eps)


__all__ = ["adaptive_span_attention", "adaptive_span_attention_naive", "adaptive_span_attention_skew",
           "adaptive_span_attention_blocked", "adaptive_span_attention_fused", "block_rows", "select_impl",
           "adaptive_span_mask", "span_mask_at", "span_distances", "current_max_span", "trim_length",
           "needed_keys", "span_trim", "SpanTrim", "fit_keys", "skew", "unskew", "skew_pad", "unskew_pad",
           "resolve_impl", "IMPLS", "TRIM_GRANULARITY", "CACHE_SLACK", "FUSED_MIN_BYTES"]
