"""Plain causal multi-head softmax self-attention ("standard Transformer" baseline of Schlag et al. 2021, lmtool
``attn_type 2``; Vaswani et al. 2017, Eq. 1), batch-first and pure:

    head_h = Drop(softmax(Q_h K_h^T / sqrt(d) + causal)) V_h,      y = W_o [head_1; ...; head_H]

Bias-free projections q/k/v (H d, C) and out (C, H d). ``forward(x, cache) -> (y, cache')``: ``cache`` is the
``KVCache`` of earlier tokens of the same segment (incremental decoding) or None; query i of the call sits at
absolute position S + i (S = cache length) and sees keys 0 .. S + i. The kernel is torch's
``scaled_dot_product_attention`` (dropout on the probabilities while training).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairseq_ext.state import KVCache


class SoftmaxSelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, attention_dropout: float = 0.0) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attention_dropout = attention_dropout
        self.scale = 1.0 / math.sqrt(head_dim)
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=False)
        self.k_proj = nn.Linear(embed_dim, inner, bias=False)
        self.v_proj = nn.Linear(embed_dim, inner, bias=False)
        self.out_proj = nn.Linear(inner, embed_dim, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, T, H d) -> (B, H, T, d)

    def forward(self, x: Tensor, cache: Optional[KVCache] = None) -> Tuple[Tensor, KVCache]:
        """x (B, T, C); cache with (B, H, S, d) keys/values or None -> (y (B, T, C), cache with S + T entries)."""
        b, t, _ = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        new_cache = KVCache(k, v) if cache is None else cache.append(k, v, None)
        keys, values = new_cache.key, new_cache.value  # (B, H, S + T, d)
        past = keys.size(2) - t
        dropout = self.attention_dropout if self.training else 0.0
        if past == 0:
            out = F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout, is_causal=True,
                                                 scale=self.scale)  # (B, H, T, d)
        else:
            query_pos = torch.arange(past, past + t, device=x.device)[:, None]  # (T, 1)
            visible = torch.arange(past + t, device=x.device)[None, :] <= query_pos  # (T, S + T) bool
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, dropout_p=dropout,
                                                 scale=self.scale)  # (B, H, T, d)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # (B, T, H d)
        return self.out_proj(out), new_cache
