"""Softmax attention with an additive logit bias, a visibility mask and an optional soft span mask:
``biased_attention(q, k, v, bias, visible, span_mask, scale=..., impl=...)``, the one kernel of the composed core's
softmax mixer (``fairseq_ext.modules.composed``). Any position term that is a function of (query, key) distance
(ALiBi, Transformer-XL's relative term) arrives as ``bias``; memory, windows and causality arrive as ``visible``;
Adaptive Attention Span's soft mask m_z (Sukhbaatar et al. 2019, Eq. 3-4) as ``span_mask``.

``naive`` applies the span mask to the probabilities and renormalises (the paper's form); ``sdpa`` folds everything
into one additive mask (log m) for ``scaled_dot_product_attention``. ``auto`` = ``sdpa``, except while a gradient
flows into the span mask: then ``naive``. A key whose mask is exactly 0 (the end of the ramp, e.g. every distance
R + 1 at z = 0) is dropped by ``sdpa`` (-inf) but still passes the one-sided derivative of m to z in ``naive``, as
in the paper; the two agree everywhere else (outputs always).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from ..dispatch import ImplResolver
from .naive import biased_attention_naive
from .sdpa import attention_mask, biased_attention_sdpa

IMPLS = ("auto", "naive", "sdpa")
_KERNELS: Dict[str, Callable[..., Tensor]] = {"naive": biased_attention_naive, "sdpa": biased_attention_sdpa}
resolve_impl = ImplResolver("biased softmax attention", IMPLS, "sdpa", "scaled_dot_product_attention, one additive "
                            "mask")
_resolve_span_grad = ImplResolver("biased softmax attention, gradient into a span mask", IMPLS, "naive",
                                  "the span ramp's one-sided derivative where the mask is exactly 0")


def biased_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], visible: Tensor,
                     span_mask: Optional[Tensor] = None, *, scale: float, dropout_p: float = 0.0,
                     impl: str = "auto") -> Tensor:
    """q (B, H, T, D), k, v (B, H, S, D) -> (B, H, T, D); see the module docstring."""
    if q.dim() != 4 or k.shape != v.shape[:-1] + k.shape[-1:] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q must be (B, H, T, D) and k, v (B, H, S, D*), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    span_grad = span_mask is not None and span_mask.requires_grad and torch.is_grad_enabled()
    concrete = _resolve_span_grad(impl) if span_grad else resolve_impl(impl)
    return _KERNELS[concrete](q, k, v, bias, visible, span_mask, scale, dropout_p)


__all__ = ["IMPLS", "attention_mask", "biased_attention", "biased_attention_naive", "biased_attention_sdpa"]
