"""Adaptive-span attention through PyTorch FlexAttention (Sukhbaatar et al. 2019, arXiv 1905.07799, Sec. 2.2): the
L-key window of every query and each head's span become a per-head ``block_mask``, so key blocks beyond a head's
span are skipped and the attention cost falls with the learned span; the soft ramp enters the scores.

With the keys laid out as ``[cache of L ; segment of M ; persistent N]`` and window index w = j - i (distance L - w)
for query i and context key j:

    score(i, j) = q_i.k_j / sqrt(D) + pos[i, w] + log m_h(L - w)     i <= j < i + L, m_h(L - w) > 0
    score(i, p) = q_i.(sqrt(D) k^p_p) / sqrt(D)                       every persistent slot p
    pos = (q / sqrt(D)) key_pe                                        (B, H, M, L): one matmul, a captured buffer

softmax(s + log m) = (softmax(s) m) / sum(softmax(s) m), which is the reference's renormalisation with eps = 0: the
reference's eps = 1e-8 changes the result by about eps / (the unmasked probability mass), far below fp32 resolution
for any span that keeps its nearest positions. Without renormalisation (``renorm=False``) the masked weights are not
a softmax, and FlexAttention has no attention dropout: both are errors. It runs through ``ops/flex_kernel.py``
(compiled on CUDA, eager forward-only on CPU).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..flex_kernel import cpu_forward_only, flex_kernel


def _window(qi: Tensor, kj: Tensor, span: int) -> Tensor:
    """Window index w = j - i, clamped to [0, L) so that entries outside the window still index in range."""
    return (kj - qi).clamp(0, span - 1)


def span_block_mask(log_m: Tensor, m: int, s: int, total: int):
    """The FlexAttention ``BlockMask`` (one per head) of M queries over ``total`` keys = [cache of L ; segment of M
    (= s) ; persistent slots]: query i sees context keys i .. i + L - 1 whose span weight is non-zero
    (``log_m`` (H, L) > -inf) and every persistent slot. Key blocks beyond a head's span are empty: not computed."""
    from torch.nn.attention.flex_attention import create_block_mask

    h, span = log_m.shape

    def mask_mod(bi: Tensor, hi: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
        in_window = (kj >= qi) & (kj < qi + span) & (log_m[hi, _window(qi, kj, span)] > float("-inf"))
        return in_window | (kj >= s)  # persistent slots: every query

    return create_block_mask(mask_mod, None, h, m, total, device=log_m.device)


def adaptive_span_attention_flex(q: Tensor, k: Tensor, v: Tensor, key_pe: Tensor,
                                 span_mask: Optional[Tensor] = None, pers_k: Optional[Tensor] = None,
                                 pers_v: Optional[Tensor] = None, *, dropout_p: float = 0.0, renorm: bool = True,
                                 eps: float = 1e-8) -> Tensor:
    """Same arguments as ``adaptive_span_attention_naive`` (``eps`` is not applied: see the module docstring);
    returns (B, H, M, D)."""
    if dropout_p > 0.0:
        raise ValueError("attn_impl='flex' has no attention dropout (the span attention's is --dropout); use "
                         "attn_impl='skew' to train with dropout")
    if span_mask is not None and not renorm:
        raise ValueError("attn_impl='flex' computes the renormalised span mask (softmax of s + log m); "
                         "--no-span-renorm needs attn_impl='skew' or 'naive'")
    q, k, v, key_pe, span_mask, pers_k, pers_v = cpu_forward_only([q, k, v, key_pe, span_mask, pers_k, pers_v],
                                                                   fallback="skew")
    b, h, m, d = q.shape
    span, s = key_pe.size(-1), k.size(2)  # L, L + M
    acc = torch.promote_types(q.dtype, torch.float32)
    pos = torch.matmul(q * (1.0 / math.sqrt(d)), key_pe.to(q.dtype)).to(acc)  # (B, H, M, L), column w: distance L - w
    if span_mask is None:
        log_m = torch.zeros(h, span, dtype=acc, device=q.device)  # (H, L)
    else:
        log_m = span_mask.to(device=q.device, dtype=acc).expand(h, span).log()  # (H, L), -inf where m = 0
    if pers_k is not None:
        pk = (pers_k.to(q.dtype) * math.sqrt(d)).transpose(-1, -2).expand(b, -1, -1, -1)  # (B, H, N, D)
        pv = (pers_v.to(q.dtype) * math.sqrt(pers_v.size(-2))).expand(b, -1, -1, -1)  # (B, H, N, D)
        k, v = torch.cat([k, pk], dim=2), torch.cat([v, pv], dim=2)  # (B, H, L + M + N, D)
    def score_mod(score: Tensor, bi: Tensor, hi: Tensor, qi: Tensor, kj: Tensor) -> Tensor:
        w = _window(qi, kj, span)
        return torch.where(kj < s, score + pos[bi, hi, qi, w] + log_m[hi, w], score)

    block_mask = span_block_mask(log_m, m, s, k.size(2))
    return flex_kernel(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask)  # (B, H, M, D)
