"""Absolute sinusoidal positions over descending indices, as lmtool-fwms (Transformer-XL's code base) adds them to
the embeddings of its absolute-position models (Schlag et al. 2021, Sec. 6.2; spec fast_weights.md §1.6):

    P[p] = [ sin(p f_0) ... sin(p f_{C/2-1}) | cos(p f_0) ... cos(p f_{C/2-1}) ],   f_k = 1 / 10000^(2k / C)

In a forward call over n tokens the first token gets index n - 1 and the last 0 (the distance to the end of the
segment); ``clamp_len`` > 0 caps the indices. The caller chooses the indices (``indices``), so incremental decoding
can give the token at offset j of a segment of T tokens the index T - 1 - j, as the whole-segment pass does.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn


def descending_indices(length: int, start: Optional[int] = None,
                       device: Union[str, torch.device, None] = None) -> Tensor:
    """(length,) int64 indices start, start - 1, ..., start - length + 1 (default start = length - 1: down to 0)."""
    first = length - 1 if start is None else start
    return torch.arange(first, first - length, -1, device=device)


class DescendingSinusoid(nn.Module):
    """No parameters; ``inv_freq`` (C/2,) is a non-persistent fp64 buffer."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        if embed_dim % 2:
            raise ValueError(f"sinusoidal positions need an even model dim, got {embed_dim}")
        self.embed_dim = embed_dim
        inv_freq = 1.0 / (10000 ** (torch.arange(0.0, embed_dim, 2.0, dtype=torch.float64) / embed_dim))  # (C/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, indices: Tensor, clamp_len: Optional[int] = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """indices (T,) or (B, T) -> encodings (T, C) or (B, T, C) in ``dtype`` (computed in fp32 at least)."""
        acc = torch.promote_types(dtype, torch.float32)
        position = indices.to(acc)  # (T,) or (B, T)
        if clamp_len is not None and clamp_len > 0:
            position = position.clamp(max=clamp_len)
        angles = position[..., None] * self.inv_freq.to(device=position.device, dtype=acc)  # (..., T, C/2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)  # (..., T, C)
