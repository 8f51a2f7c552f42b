"""Multi-head attention over [cache ; segment] with relative position embeddings, an adaptive span and optional
persistent memory (Sukhbaatar et al. 2019, arXiv 1905.07799, Sec. 2-3; All-attention, arXiv 1907.01470, Sec. 4,
Eq. 7-8; spec adaptive_span.md §1.1-§1.6).

Query i of the segment attends to the L_pos keys before it (distances L_pos .. 1, never itself), where
L_pos = L - trim is the trimmed window of the layer's current spans (exact: trimmed distances have mask 0):

    s_ij = (q_i . k_(i-delta) + q_i . p_delta) / sqrt(d)      p = the shared key_pe, last column = distance 1
    a    = softmax([s_i ; s^p_i]) ; a_ctx *= m_z(delta) ; a /= sum(a) + 1e-8      (renormalisation, joint)

Keys/values come from bias-free projections of the layer inputs ``fit_keys([cache ; x], L_pos + M)``: the cache is
cut on the left, or left-padded with zeros when it is shorter than the window (a stream start, or spans that grew),
which is exactly the original's zero-initialised cache. The cache rows are projected apart from the segment's rows,
as detached inputs: the cache carries no gradient (truncated BPTT), so their keys and values need no input gradient,
which the original computes over [cache ; segment] and discards (the same values; at a full span of 1024 on CPU,
training went from 919 and 943 to 1,006 and 1,037 tokens/s in two interleaved pairs). Persistent vectors
(``pers_key`` (K, d, N) and ``pers_value`` (K, N, d), stored at 1/sqrt(d) and 1/sqrt(N) scale as the original)
share the softmax and are never masked by the span. Without an adaptive span (fixed-span mode) every query sees all
L previous positions, unmasked.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from fairseq_ext.modules.attention.adaptive_span_mask import AdaptiveSpanMask
from fairseq_ext.ops.adaptive_span import SpanTrim, adaptive_span_attention, fit_keys


class AdaptiveSpanSelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, max_span: int, dropout: float,
                 span: Optional[AdaptiveSpanMask], pers_mem_size: int = 0, renorm: bool = True,
                 impl: str = "auto") -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"--decoder-attention-heads {num_heads} does not divide --decoder-embed-dim "
                             f"{embed_dim}; choose a divisor of {embed_dim}")
        if pers_mem_size < 0:
            raise ValueError(f"--pers-mem-size must be >= 0 (0: no persistent memory), got {pers_mem_size}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.max_span = max_span
        self.dropout = dropout
        self.renorm = renorm
        self.renorm_eps = 1e-8  # the original's epsilon; trimmed == untrimmed exactly only with 0 (tests)
        self.impl = impl
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.span = span
        if pers_mem_size > 0:  # the original's init: N(0, 1/d) keys, N(0, 1/N) values, rescaled in use
            self.pers_key = nn.Parameter(torch.randn(num_heads, self.head_dim, pers_mem_size)
                                         / math.sqrt(self.head_dim))
            self.pers_value = nn.Parameter(torch.randn(num_heads, pers_mem_size, self.head_dim)
                                           / math.sqrt(pers_mem_size))
        else:
            self.register_parameter("pers_key", None)
            self.register_parameter("pers_value", None)

    def window(self) -> SpanTrim:
        """The layer's (S_max, trim, L_pos, cache length); the full span without an adaptive span."""
        if self.span is None:
            return SpanTrim(self.max_span, 0, self.max_span, self.max_span)
        return self.span.trim()

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, K, T, d)

    def forward(self, x: Tensor, keys_in: Tensor, key_pe: Tensor, window: SpanTrim) -> Tensor:
        """x: (B, M, C) the segment; keys_in: (B, S, C) = [cache ; x] layer inputs (any S >= M); key_pe: (d, L)
        shared embeddings (column j = distance L - j); window: from ``window()``. Returns (B, M, C)."""
        b, m, c = x.shape
        mem = fit_keys(keys_in[:, :keys_in.size(1) - m], window.span).detach()  # (B, L_pos, C) cache rows or zeros
        q = self._heads(self.q_proj(x))  # (B, K, M, d)
        k = self._heads(torch.cat([self.k_proj(mem), self.k_proj(x)], 1))  # (B, K, L_pos + M, d)
        v = self._heads(torch.cat([self.v_proj(mem), self.v_proj(x)], 1))  # (B, K, L_pos + M, d)
        pe = key_pe[:, key_pe.size(-1) - window.span:]  # (d, L_pos) nearest distances
        mask = self.span.mask(window.span) if self.span is not None else None  # (K or 1, L_pos)
        out = adaptive_span_attention(q, k, v, pe, mask, self.pers_key, self.pers_value,
                                      dropout_p=self.dropout if self.training else 0.0, renorm=self.renorm,
                                      eps=self.renorm_eps, impl=self.impl)  # (B, K, M, d)
        return self.out_proj(out.transpose(1, 2).reshape(b, m, c))  # (B, M, C)
