"""Transformer-XL relative multi-head self-attention over [memory ; segment] (Dai et al. 2019, Sec. 3.3).

    q = W_q h,  k = W_k [SG(m) ; h],  v = W_v [SG(m) ; h],  r = W_{k,R} R
    A = ((q + u) k^T + rel_shift((q + v) r^T)) / sqrt(D),  O = W_o softmax(A) v

Bias-free projections (the original ``qkv_net``, ``r_net``, ``o_net``). W_q, W_k, W_v are the row thirds of one
parameter ``qkv_proj.weight`` (3 H D, C), as the original's ``qkv_net``: a per-tensor optimizer (LAMB's trust ratio,
NVIDIA's recipes) then sees the tensor the original trains; the queries are projected from the segment only.
The global biases u, v are passed in
(shared across layers, the original default), or owned here when untied (``content_bias`` = the original
``r_w_bias``, ``position_bias`` = ``r_r_bias``). The module is pure: the memory comes in as the key/value input.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairseq_ext.modules.fused_qkv import fuse_qkv
from fairseq_ext.ops.xl_relative import xl_relative_attention


class XLRelativeSelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, attention_dropout: float,
                 attn_impl: str = "auto", own_biases: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attention_dropout = attention_dropout
        self.attn_impl = attn_impl
        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(embed_dim, 3 * inner, bias=False)  # rows [W_q ; W_k ; W_v]
        self.qkv_proj.fused_parts = 3  # initialised as three projections (xl_weights_init)
        self.r_proj = nn.Linear(embed_dim, inner, bias=False)
        self.out_proj = nn.Linear(inner, embed_dim, bias=False)
        if own_biases:
            self.content_bias = nn.Parameter(torch.zeros(num_heads, head_dim))
            self.position_bias = nn.Parameter(torch.zeros(num_heads, head_dim))
        else:
            self.content_bias = self.position_bias = None

    def _heads(self, x: Tensor) -> Tensor:
        """(B, L, H*D) -> (B, H, L, D)."""
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query_input: Tensor, kv_input: Tensor, positions: Tensor,
                content_bias: Optional[Tensor] = None, position_bias: Optional[Tensor] = None,
                window: Optional[int] = None, constant_rows: int = 0) -> Tensor:
        """query_input (B, T, C): the segment (the last T rows of kv_input); kv_input (B, S, C) = [memory ;
        segment]; positions (S, C): relative encodings of distances S-1..0; biases (H, D) unless owned;
        constant_rows: 0, or S - T when the memory rows of kv_input carry no gradient (a detached memory): their keys
        and values are then projected from detached inputs and the segment's from query_input, so no input gradient is
        computed for the memory only to be discarded.
        Returns (B, T, C) (before the residual dropout)."""
        if self.content_bias is not None:
            content_bias, position_bias = self.content_bias, self.position_bias
        if content_bias is None or position_bias is None:
            raise ValueError("shared content/position biases (u, v) must be passed when the layer does not own them")
        b, t, _ = query_input.shape
        w_q, w_k, w_v = self.qkv_proj.weight.chunk(3)  # (H*D, C) each
        q = self._heads(F.linear(query_input, w_q))  # (B, H, T, D)
        if constant_rows:
            if constant_rows != kv_input.size(1) - t:
                raise ValueError(f"constant_rows must be 0 or the {kv_input.size(1) - t} memory rows, got "
                                 f"{constant_rows}")
            rows, tail = kv_input[:, :constant_rows].detach(), query_input  # (B, M, C), (B, T, C)
            k = self._heads(torch.cat([F.linear(rows, w_k), F.linear(tail, w_k)], 1))  # (B, H, S, D)
            v = self._heads(torch.cat([F.linear(rows, w_v), F.linear(tail, w_v)], 1))  # (B, H, S, D)
        else:
            k, v = self._heads(F.linear(kv_input, w_k)), self._heads(F.linear(kv_input, w_v))  # (B, H, S, D)
        r = self.r_proj(positions).view(-1, self.num_heads, self.head_dim).transpose(0, 1)  # (H, S, D)
        out = xl_relative_attention(q, k, v, r, content_bias, position_bias, window=window,
                                    dropout_p=self.attention_dropout if self.training else 0.0,
                                    impl=self.attn_impl)  # (B, H, T, D)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, C)

    def upgrade_state_dict_named(self, state_dict: Dict[str, Tensor], name: str) -> Dict[str, Tensor]:
        """Checkpoints written before ``qkv_proj`` stored ``{q,k,v}_proj.weight``."""
        return fuse_qkv(state_dict, name)
