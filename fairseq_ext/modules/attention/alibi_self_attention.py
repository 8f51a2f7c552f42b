"""Causal multi-head self-attention with ALiBi biases (Press et al. 2021, Sec. 3), batch-first and pure.

    head_h = softmax(Q_h K_h^T / sqrt(D) - m_h (i - j) + causal) V_h,   y = W_o [head_1; ...; head_H]

``forward(x, state) -> (y, new_state)``: ``state`` is the KVCache of earlier tokens (incremental decoding) or
None; the query offset for the bias is the cache length, so token-by-token decoding equals the full pass. A
decoder may build the kernel's bias once per forward (``shared_bias``: sdpa's (1, H, T, T) bias, or the blocked
kernel's (1, H, r, T) strip on CPU) and pass it to every layer; when the kernel choice (``ops.alibi.select_impl``)
builds the bias per query chunk instead (``chunked``), ``shared_bias`` returns None. ``chunk_size`` (query rows per
chunk, 0 = from the bias budget) sizes the chunked kernel; set, it also keeps ``auto`` evaluation on ``chunked``.
The projections are named ``q_proj/k_proj/v_proj/out_proj`` and initialised like fairseq's MultiheadAttention, so
``transformer_lm`` checkpoints load unchanged.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fairseq_ext.modules.positional.alibi import AlibiPositionalBias
from fairseq_ext.ops.alibi import IMPLS, alibi_attention, alibi_shared_bias, select_impl
from fairseq_ext.state import KVCache


class AlibiSelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias_form: str = "relative",
                 attn_impl: str = "auto", bias: bool = True, chunk_size: int = 0) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by the number of attention heads "
                             f"({num_heads}); change --decoder-embed-dim or --decoder-attention-heads")
        if attn_impl not in IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r}; choose one of {IMPLS}")
        if chunk_size < 0:
            raise ValueError(f"ALiBi chunk_size must be >= 1 query row, or 0 for the default; got {chunk_size}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.attn_impl = attn_impl
        self.chunk_size = chunk_size
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.positional = AlibiPositionalBias(num_heads, bias_form)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # fairseq MultiheadAttention (qkv_same_dim): xavier with gain 1/sqrt(2) on q/k/v, plain xavier on out.
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        if self.out_proj.bias is not None:
            nn.init.constant_(self.out_proj.bias, 0.0)

    def _chunk_rows(self) -> Optional[int]:
        return self.chunk_size or None  # 0: the chunked kernel sizes chunks from its bias budget

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, T, C) -> (B, H, T, D)

    def shared_bias(self, q_len: int, k_len: int, dtype: torch.dtype, device: torch.device) -> Optional[Tensor]:
        """The bias of the kernel ``forward`` will select for a full causal pass of these lengths (same rule, same
        grad mode), to share across layers: ``ops.alibi.alibi_shared_bias`` (None for kernels that build their own)."""
        impl = select_impl(self.attn_impl, self.num_heads, q_len, k_len, self._chunk_rows(), device=device)
        return alibi_shared_bias(impl, self.positional.slopes, q_len, k_len, form=self.positional.form,
                                 dtype=dtype)

    def forward(self, x: Tensor, state: Optional[KVCache] = None, key_padding_mask: Optional[Tensor] = None,
                shared_bias: Optional[Tensor] = None) -> Tuple[Tensor, KVCache]:
        """x: (B, T, C); key_padding_mask: (B, T) bool for the new tokens; shared_bias: ``shared_bias(T, S, ...)``
        or None. Returns y (B, T, C) and the KVCache (B, H, S, D) including the new tokens."""
        b, t, c = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))  # (B,H,T,D)
        if state is None:
            cache = KVCache(k, v, key_padding_mask)
            q_offset = 0
        else:
            if state.batch_size != b:
                raise ValueError(f"KV cache holds {state.batch_size} sequences but the input has {b}")
            q_offset = state.length
            cache = state.append(k, v, key_padding_mask)
        out = alibi_attention(q, cache.key, cache.value, self.positional.slopes, q_offset=q_offset,
                              key_padding_mask=cache.key_padding_mask, causal=True, form=self.positional.form,
                              dropout_p=self.dropout if self.training else 0.0, impl=self.attn_impl,
                              shared_bias=shared_bias, chunk_size=self._chunk_rows())  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(b, t, c)  # (B, T, C)
        return self.out_proj(out), cache
