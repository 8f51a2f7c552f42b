"""Softmax attention mixer of the composed core: one position term, one key/value source, optional persistent
slots and an optional adaptive-span soft mask, all reduced to one ``ops.biased_attention`` call -- or, when the
scores are plain causal attention over [context ; segment] with ``--attn-impl auto``, the position term's own
kernel (ALiBi: ``alibi_lm``'s ``ops.alibi``; Transformer-XL: ``transformer_xl_lm``'s ``ops.xl_relative``), which on
CPU run causal query blocks instead of (T, S) tensors of the whole segment.

    q = W_q x,  [k ; v] = source(x)                         (bias-free projections, one qkv tensor)
    q_c, b_ij = position.score_terms(q, i - j)              (ALiBi / Transformer-XL terms, or q, 0)
    a_ij = softmax_j(q_c,i · k_j / sqrt(D) + b_ij)  over 0 <= i - j <= max_distance (and <= L with a span)
    a'_ij = m_z(i - j) a_ij / sum_j' m_z(i - j') a_ij'      (span: Sukhbaatar et al. 2019, Eq. 3-4, per head)
    y = W_o a' v

Persistent slots (All-attention, Sukhbaatar et al. 2019b, Sec. 4): P learned keys and values per head, prepended
to every query's keys, never masked, with no position term. The span mask is over distance max(i - j, 1), so a
query's own key counts as distance 1; keys the mask zeroes are not projected (``keep``).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from fairseq_ext.modules.attention.adaptive_span_mask import AdaptiveSpanMask
from fairseq_ext.modules.composed.positions import PositionTerm
from fairseq_ext.modules.fused_qkv import fuse_qkv
from fairseq_ext.ops.adaptive_span.mask import current_max_span, span_mask_at
from fairseq_ext.ops.biased_attention import biased_attention


class SoftmaxMixer(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, attention_dropout: float,
                 position: PositionTerm, source: nn.Module, persistent_slots: int = 0,
                 span: Optional[AdaptiveSpanMask] = None, attn_impl: str = "auto") -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attention_dropout = attention_dropout
        self.attn_impl = attn_impl
        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(embed_dim, 3 * inner, bias=False)  # rows [W_q ; W_k ; W_v]
        self.qkv_proj.fused_parts = 3
        self.out_proj = nn.Linear(inner, embed_dim, bias=False)
        self.position = position
        self.source = source
        self.span = span
        if persistent_slots > 0:  # the original's 1/sqrt(D) init scale
            self.persistent_key = nn.Parameter(torch.randn(num_heads, persistent_slots, head_dim) / math.sqrt(head_dim))
            self.persistent_value = nn.Parameter(torch.randn(num_heads, persistent_slots, head_dim)
                                                 / math.sqrt(head_dim))
        else:
            self.persistent_key = self.persistent_value = None

    def _heads(self, x: Tensor) -> Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, L, H D) -> (B, H, L, D)

    def _project_kv(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        w_k, w_v = self.qkv_proj.weight.chunk(3)[1:]  # (H D, C) each
        return self._heads(nn.functional.linear(h, w_k)), self._heads(nn.functional.linear(h, w_v))  # (B, H, S, D)

    def forward(self, x: Tensor, state: Optional[object]) -> Tuple[Tensor, Optional[object]]:
        """x (B, T, C), the source's state -> (y (B, T, C), the source's open state)."""
        b, t, _ = x.shape
        q = self._heads(nn.functional.linear(x, self.qkv_proj.weight.chunk(3)[0]))  # (B, H, T, D)
        keep = None if self.span is None else current_max_span(self.span.z, self.span.max_span, self.span.ramp)
        k, v, before, new_state = self.source.read(x, state, self._project_kv, keep)  # (B, H, S, D)
        dropout_p = self.attention_dropout if self.training else 0.0
        plain = (self.attn_impl == "auto" and self.span is None and self.persistent_key is None
                 and self.source.max_distance is None)  # causal over [context ; segment], nothing else
        out = self.position.attend(q, k, v, before, dropout_p) if plain else None  # (B, H, T, D)
        if out is None:
            out = self._biased(q, k, v, before, dropout_p)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1)), new_state  # (B, T, C)

    def _biased(self, q: Tensor, k: Tensor, v: Tensor, before: int, dropout_p: float) -> Tensor:
        """Every term as (T, S) tensors for ``ops.biased_attention``: q (B, H, T, D), k, v (B, H, S, D)."""
        b, t, s = q.size(0), q.size(2), k.size(2)
        distance = (before + torch.arange(t, device=q.device))[:, None] - torch.arange(s, device=q.device)  # (T, S)
        visible = distance >= 0
        farthest = self.source.max_distance if self.span is None else self.span.max_span
        if farthest is not None:
            visible = visible & (distance <= farthest)
        q, bias = self.position.score_terms(q, distance)  # bias (1|B, H, T, S) or None
        span_mask = None
        if self.span is not None:
            z = self.span.z[:, None, None]  # (H, 1, 1) fp32
            span_mask = span_mask_at(z, distance.clamp(min=1), self.span.max_span, self.span.ramp)[None]  # (1,H,T,S)
        if self.persistent_key is not None:
            k, v, bias, visible, span_mask = self._with_persistent(b, t, k, v, bias, visible, span_mask)
        return biased_attention(q, k, v, bias, visible, span_mask, scale=1.0 / math.sqrt(self.head_dim),
                                dropout_p=dropout_p, impl=self.attn_impl)  # (B, H, T, D)

    def _with_persistent(self, b: int, t: int, k: Tensor, v: Tensor, bias: Optional[Tensor], visible: Tensor,
                         span_mask: Optional[Tensor]):
        """Prepend the P slots: keys/values (B, H, P + S, D), bias 0, always visible, span mask 1."""
        p = self.persistent_key.size(1)
        k = torch.cat([self.persistent_key.to(k.dtype).expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([self.persistent_value.to(v.dtype).expand(b, -1, -1, -1), v], dim=2)
        visible = torch.cat([visible.new_ones(t, p), visible], dim=1)  # (T, P + S)
        if bias is not None:
            bias = torch.cat([bias.new_zeros(*bias.shape[:3], p), bias], dim=3)
        if span_mask is not None:
            span_mask = torch.cat([span_mask.new_ones(*span_mask.shape[:3], p), span_mask], dim=3)
        return k, v, bias, visible, span_mask

    @property
    def carries_state(self) -> bool:
        return self.source.carries

    def close(self, state: Optional[object]) -> Optional[object]:
        return self.source.close(state)

    def upgrade_state_dict_named(self, state_dict: Dict[str, Tensor], name: str) -> Dict[str, Tensor]:
        """fast_weight_lm's softmax layers stored ``{q,k,v}_proj.weight`` before they were this mixer."""
        return fuse_qkv(state_dict, name)

    def log_stats(self) -> Dict[str, Tensor]:
        """The learned spans (tokens, mean over heads) of a span layer, logged by ``lm_loss``."""
        return {} if self.span is None else {"span_avg": self.span.spans().mean()}
