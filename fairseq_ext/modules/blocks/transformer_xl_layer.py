"""One Transformer-XL decoder layer (Dai et al. 2019, Sec. 3.3; spec transformer_xl.md §1.5).

Post-LN (the default, as the original):
    h' = LN_1(h + Drop(Attn(h, [SG(m) ; h])))
    out = LN_2(h' + Drop(W_2 Drop(ReLU(W_1 h'))))
Pre-LN (``normalize_before``, the original ``--pre_lnorm``): the attention reads LN_1([m ; h]) and the
feed-forward LN_2(h'); residuals are not normalised (and the original adds no final LayerNorm after the stack).
The memory m of this layer is the layer's own input from earlier segments (detached by the caller).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fairseq_ext.modules.attention.xl_relative_self_attention import XLRelativeSelfAttention
from fairseq_ext.modules.blocks.feed_forward import FeedForwardBlock


class TransformerXLLayer(FeedForwardBlock):
    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, ffn_dim: int, dropout: float,
                 attention_dropout: float, normalize_before: bool, attn_impl: str = "auto",
                 own_biases: bool = False) -> None:
        super().__init__()
        self.dropout = dropout
        self.normalize_before = normalize_before
        self.self_attn = XLRelativeSelfAttention(embed_dim, num_heads, head_dim, attention_dropout, attn_impl,
                                                 own_biases)
        self._build_feed_forward(embed_dim, ffn_dim)

    def forward(self, x: Tensor, memory: Optional[Tensor], positions: Tensor,
                content_bias: Optional[Tensor] = None, position_bias: Optional[Tensor] = None,
                window: Optional[int] = None) -> Tensor:
        """x (B, T, C); memory (B, M, C) or None; positions (M + T, C). Returns (B, T, C)."""
        t = x.size(1)
        kv = x if memory is None else torch.cat([memory, x], dim=1)  # (B, S, C)
        if self.normalize_before:
            kv = self.self_attn_layer_norm(kv)  # (B, S, C)
            x = x + self._drop(self.self_attn(kv[:, -t:], kv, positions, content_bias, position_bias, window))
            return x + self._feed_forward(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self._drop(self.self_attn(x, kv, positions, content_bias,
                                                                    position_bias, window)))  # (B, T, C)
        return self.final_layer_norm(x + self._feed_forward(x))
