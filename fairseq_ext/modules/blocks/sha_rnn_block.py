"""The SHA-RNN block (Merity 2019, arXiv 1911.11423; spec sha_rnn.md §1.2), written from the spec.

    h = lnstart(x)
    h = dropouth(LSTM(h; (h0, c0)))                       no residual around the LSTM
    [attention blocks]  m = lnmem(h); h = lnmid(h)
                        h = dropouth(attn(h, [memory ; m])) + h
    Boom                h = dropouth(chunksum(dropouth(GELU(linear1(lnxff(h)))))) + lnff(h)

GELU is the approximation x·σ(1.702x); chunksum splits the d_ff vector into d_ff/d chunks of d and sums them (no
second linear). Every LayerNorm has eps 1e-12. Every block holds all five LayerNorms, as the original (``lnmid`` and
``lnmem`` are unused without attention).

State (``fairseq_ext.state.SHARNNBlockState``): the LSTM's (h, c) and, for attention blocks, the memory of ``lnmem``
outputs. At the start of a segment of T tokens the memory is trimmed to its last ``max_memory - T`` positions, so
every query sees at most ``max_memory`` keys; the new memory is the last ``max_memory`` positions of [memory ; m].
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fairseq_ext.modules.attention.single_head_attention import SingleHeadAttention
from fairseq_ext.ops.boom import boom_activation
from fairseq_ext.ops.dropout import dropout
from fairseq_ext.state import SHARNNBlockState


class Boom(nn.Module):
    """Linear(d, d_ff) with bias -> GELU_1.702 -> dropout -> sum of the d_ff/d chunks of width d (``ops/boom``)."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        if ffn_dim % dim:
            raise ValueError(f"Boom: decoder_ffn_embed_dim {ffn_dim} must be a multiple of decoder_embed_dim {dim}")
        self.dim = dim
        self.dropout = dropout
        self.linear1 = nn.Linear(dim, ffn_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, d) -> (B, T, d)."""
        return boom_activation(self.linear1(x), self.dim, self.dropout, self.training)  # (B, T, d_ff) -> (B, T, d)


class SHARNNBlock(nn.Module):
    """One SHA-RNN block; pure: ``forward(x, state) -> (y, new_state)``."""

    def __init__(self, dim: int, ffn_dim: int, dropouth: float, use_attn: bool, max_memory: int,
                 collapsed: bool = False, eps: float = 1e-12, attn_impl: str = "auto") -> None:
        super().__init__()
        self.dim = dim
        self.dropouth = dropouth
        self.max_memory = max_memory
        self.lnstart = nn.LayerNorm(dim, eps=eps)
        self.lnmid = nn.LayerNorm(dim, eps=eps)
        self.lnmem = nn.LayerNorm(dim, eps=eps)
        self.lnff = nn.LayerNorm(dim, eps=eps)
        self.lnxff = nn.LayerNorm(dim, eps=eps)
        self.rnn = nn.LSTM(dim, dim, batch_first=True)
        self.attn: Optional[SingleHeadAttention] = SingleHeadAttention(dim, dropouth, collapsed, eps, attn_impl) \
            if use_attn else None
        self.ff = Boom(dim, ffn_dim, dropouth)

    def trim(self, memory: Optional[Tensor], length: int) -> Optional[Tensor]:
        """Memory (B, M, d) at the start of a segment of ``length`` tokens: its last max_memory - length positions."""
        if memory is None:
            return None
        keep = max(self.max_memory - length, 0)
        return memory[:, memory.size(1) - min(keep, memory.size(1)):]

    @property
    def carries_state(self) -> bool:
        return True

    def close(self, state: Optional[SHARNNBlockState]) -> Optional[SHARNNBlockState]:
        """Everything is carried into the next segment (its memory is trimmed when that segment starts)."""
        return state

    def forward(self, x: Tensor, state: Optional[SHARNNBlockState],
                trim_to: Optional[int] = None) -> Tuple[Tensor, SHARNNBlockState]:
        """x (B, T, d), state (None: zeros, no memory) -> (y (B, T, d), new state). The memory is first trimmed for a
        segment of ``trim_to`` tokens (None: T, this call is a whole segment; 0: no trim, the call continues an
        unfinished segment in incremental decoding); the decoder passes it as the blocks' per-call context."""
        hidden = None if state is None else (state.h.unsqueeze(0).contiguous(), state.c.unsqueeze(0).contiguous())
        h = self.lnstart(x)
        h, (h_n, c_n) = self.rnn(h, hidden)  # (B, T, d), (1, B, d) x 2
        h = dropout(h, self.dropouth, self.training)
        new_memory: Optional[Tensor] = None
        if self.attn is not None:
            m = self.lnmem(h)  # (B, T, d): memory / key / value stream
            h = self.lnmid(h)  # query stream
            memory = None if state is None else state.memory
            if trim_to is None:
                memory = self.trim(memory, x.size(1))
            elif trim_to > 0:
                memory = self.trim(memory, trim_to)
            h = dropout(self.attn(h, memory, m), self.dropouth, self.training) + h
            big = m if memory is None else torch.cat([memory, m], dim=1)  # (B, M + T, d)
            new_memory = big[:, max(big.size(1) - self.max_memory, 0):]  # (B, <= max_memory, d)
        base = self.lnff(h)
        h = dropout(self.ff(self.lnxff(h)), self.dropouth, self.training) + base
        return h, SHARNNBlockState(h_n.squeeze(0), c_n.squeeze(0), new_memory)
