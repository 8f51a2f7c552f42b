"""One adaptive-span / All-attention layer (Sukhbaatar et al. 2019, arXiv 1905.07799; arXiv 1907.01470 Sec. 4;
spec adaptive_span.md §1.1, §1.2, §1.6), post-LN as the original, no dropout on the residual branches:

    h = LN_1(x + Attn(x, [cache ; x]))
    y = LN_2(h + W_2 Drop(ReLU(W_1 h + b_1)) + b_2)        (no FF and no LN_2 with persistent memory)

The cache holds this layer's *inputs* from earlier segments (detached). The next cache is the last C entries of
[cache ; x], with C the layer's current cache length (``AdaptiveSpanMask.trim``: L_pos + 64 with the adaptive cache,
else L), decided before the layer runs, as the original. A ``CoreDecoder`` block: its state is a ``HiddenCache``,
its context the shared relative position table ``key_pe`` (d, L); the cache is already cut when the layer returns,
so closing it at a segment end changes nothing (outputs do not depend on where segments start).
ReLU and dropout are ``relu_dropout``, written over the first FF product (one (B, M, FF) tensor fewer per layer).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fairseq_ext.modules.attention.adaptive_span_self_attention import AdaptiveSpanSelfAttention
from fairseq_ext.ops.dropout import relu_dropout
from fairseq_ext.state import HiddenCache


class AdaptiveSpanLayer(nn.Module):
    carries_state = True

    def __init__(self, self_attn: AdaptiveSpanSelfAttention, embed_dim: int, ffn_dim: int, dropout: float) -> None:
        """ffn_dim 0: no feed-forward sublayer (All-attention layers, where persistent memory replaces it)."""
        super().__init__()
        self.self_attn = self_attn
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        self.dropout = dropout
        if ffn_dim > 0:
            self.fc1 = nn.Linear(embed_dim, ffn_dim)
            self.fc2 = nn.Linear(ffn_dim, embed_dim)
            self.final_layer_norm = nn.LayerNorm(embed_dim)
        else:
            self.fc1 = self.fc2 = self.final_layer_norm = None

    def forward(self, x: Tensor, state: Optional[HiddenCache], key_pe: Tensor) -> Tuple[Tensor, HiddenCache]:
        """x: (B, M, C); state: the cache (B, C_prev, C) of earlier inputs of this layer, or None (zeros); key_pe
        (d, L) in x's dtype. Returns (y (B, M, C), the next cache (B, <= C_cache, C), detached)."""
        cache = None if state is None else state.hidden
        window = self.self_attn.window()
        keys_in = x if cache is None or cache.size(1) == 0 else torch.cat([cache, x], dim=1)  # (B, S, C)
        next_cache = keys_in[:, max(0, keys_in.size(1) - window.cache):].detach()  # (B, <= C_cache, C)
        h = self.self_attn_layer_norm(x + self.self_attn(x, keys_in, key_pe, window))  # (B, M, C)
        if self.fc1 is not None:
            hidden = self.fc1(h.reshape(-1, h.size(-1)))  # (B*M, FF): 2-D, its own tensor (not a view)
            ff = self.fc2(relu_dropout(hidden, self.dropout, self.training, inplace=True)).view(h.shape)  # (B, M, C)
            h = self.final_layer_norm(h + ff)
        return h, HiddenCache(next_cache)

    def close(self, state: HiddenCache) -> HiddenCache:
        return state  # cut to the cache length already
