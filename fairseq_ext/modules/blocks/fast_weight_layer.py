"""One decoder layer of lmtool-fwms (Schlag et al. 2021; Transformer-XL's code base, post-LN; spec fast_weights.md
§1.2, §6):

    h' = LN_1(h + Drop(W_o Attn(h)))
    out = LN_2(h' + Drop(W_2 Drop(ReLU(W_1 h'))))

Attn is ``SoftmaxSelfAttention`` (attn_type ``softmax``; its state is a ``KVCache`` used only inside incremental
decoding) or ``FastWeightSelfAttention`` (``linear`` / ``performer`` / ``dpfp`` feature maps, sum or delta rule; its
state is a ``FastWeightState``). ``forward(x, state) -> (y, state')`` is pure.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

from torch import Tensor

from fairseq_ext.modules.attention.fast_weight_self_attention import FastWeightSelfAttention
from fairseq_ext.modules.attention.softmax_self_attention import SoftmaxSelfAttention
from fairseq_ext.modules.blocks.feed_forward import FeedForwardBlock
from fairseq_ext.state import FastWeightState, KVCache

LayerState = Union[FastWeightState, KVCache]


class FastWeightLayer(FeedForwardBlock):
    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, ffn_dim: int, dropout: float,
                 attention_dropout: float, attn_type: str, update_rule: str = "delta", normalize: str = "none",
                 performer_proj_dim: int = 16, performer_orthogonal_compat: bool = False, dpfp_n_roll: int = 2,
                 attn_impl: str = "auto", chunk_size: int = 64, lmtool_quadratic: bool = False) -> None:
        super().__init__()
        self.dropout = dropout
        self.attn_type = attn_type
        if attn_type == "softmax":
            self.self_attn: Union[SoftmaxSelfAttention, FastWeightSelfAttention] = SoftmaxSelfAttention(
                embed_dim, num_heads, head_dim, attention_dropout)
        else:
            self.self_attn = FastWeightSelfAttention(embed_dim, num_heads, head_dim, attn_type, update_rule, normalize,
                                                     performer_proj_dim, performer_orthogonal_compat, dpfp_n_roll,
                                                     attn_impl, chunk_size, lmtool_quadratic)
        self._build_feed_forward(embed_dim, ffn_dim)

    def forward(self, x: Tensor, state: Optional[LayerState] = None) -> Tuple[Tensor, LayerState]:
        """x (B, T, C); the attention's state after earlier tokens or None -> (y (B, T, C), new attention state)."""
        attn, new_state = self.self_attn(x, state)  # (B, T, C)
        x = self.self_attn_layer_norm(x + self._drop(attn))  # (B, T, C)
        x = self.final_layer_norm(x + self._feed_forward(x))  # (B, T, C)
        return x, new_state
