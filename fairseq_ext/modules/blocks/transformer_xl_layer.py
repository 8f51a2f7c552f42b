"""One Transformer-XL decoder layer (Dai et al. 2019, Sec. 3.3; spec transformer_xl.md §1.5), a block of
``models/base/core_decoder.py``.

Post-LN (the default, as the original):
    h' = LN_1(h + Drop(Attn(h, [SG(m) ; h])))
    out = LN_2(h' + Drop(W_2 Drop(ReLU(W_1 h'))))
Pre-LN (``normalize_before``, the original ``--pre_lnorm``): the attention reads LN_1([m ; h]) and the
feed-forward LN_2(h'); residuals are not normalised (and the original adds no final LayerNorm after the stack).
The memory m of this layer is the layer's own input from earlier segments, detached, un-normalised (pre-LN applies
today's LN_1 to it). What all layers share in a call (``XLContext``: the encodings R, u and v when shared, the
same-length window) comes from the decoder.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import Tensor

from fairseq_ext.modules.attention.xl_relative_self_attention import XLRelativeSelfAttention
from fairseq_ext.modules.blocks.feed_forward import FeedForwardBlock
from fairseq_ext.state import HiddenCache


@dataclasses.dataclass(frozen=True)
class XLContext:
    """positions R (S, C) for the S = M + T keys of the call (dropout applied once for all layers); the shared
    u, v (H, D) or None (untied: each layer's own); the same_length window or None."""

    positions: Tensor
    content_bias: Optional[Tensor]
    position_bias: Optional[Tensor]
    window: Optional[int]


class TransformerXLLayer(FeedForwardBlock):
    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, ffn_dim: int, dropout: float,
                 attention_dropout: float, normalize_before: bool, mem_len: int, attn_impl: str = "auto",
                 own_biases: bool = False) -> None:
        super().__init__()
        self.dropout = dropout
        self.normalize_before = normalize_before
        self.mem_len = mem_len
        self.self_attn = XLRelativeSelfAttention(embed_dim, num_heads, head_dim, attention_dropout, attn_impl,
                                                 own_biases)
        self._build_feed_forward(embed_dim, ffn_dim)

    @property
    def carries_state(self) -> bool:
        return self.mem_len > 0

    def close(self, state: Optional[HiddenCache]) -> Optional[HiddenCache]:
        """The memory of the next segment: the last mem_len inputs (None when mem_len is 0)."""
        return None if state is None or self.mem_len == 0 else HiddenCache(state.hidden[:, -self.mem_len:])

    def forward(self, x: Tensor, state: Optional[HiddenCache], context: XLContext) -> Tuple[Tensor, HiddenCache]:
        """x (B, T, C); state: memory (B, M, C) or None -> (y (B, T, C), [memory ; x] detached (B, M + T, C))."""
        t = x.size(1)
        memory = None if state is None or state.length == 0 else state.hidden
        kv = x if memory is None else torch.cat([memory, x], dim=1)  # (B, S, C)
        cache = HiddenCache(x.detach() if memory is None else torch.cat([memory, x.detach()], dim=1))
        u, v, r, window = context.content_bias, context.position_bias, context.positions, context.window
        if self.normalize_before:
            kv = self.self_attn_layer_norm(kv)  # (B, S, C)
            x = x + self._drop(self.self_attn(kv[:, -t:], kv, r, u, v, window))
            return x + self._feed_forward(self.final_layer_norm(x)), cache
        constant = 0 if memory is None or memory.requires_grad else memory.size(1)  # post-LN: raw, detached memory
        x = self.self_attn_layer_norm(x + self._drop(self.self_attn(x, kv, r, u, v, window, constant)))  # (B, T, C)
        return self.final_layer_norm(x + self._feed_forward(x)), cache
