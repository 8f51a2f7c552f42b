"""Sinusoidal relative encodings of Transformer-XL (Dai et al. 2019, Sec. 3.3; spec transformer_xl.md §1.1, §1.6).

R has one row per key distance, **descending**: row c encodes distance S - 1 - c (so the last row is distance 0),
with every distance above ``clamp_len`` replaced by ``clamp_len`` before the sinusoid. The layout is the two
blocks concatenated, not interleaved:

    R[c] = [ sin(p * f_0) ... sin(p * f_{C/2-1}) | cos(p * f_0) ... cos(p * f_{C/2-1}) ],
    p = min(S - 1 - c, clamp_len),   f_k = 1 / 10000^(2k / C)
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn


class XLRelativePositions(nn.Module):
    """Sinusoid over descending distances; no parameters (``inv_freq`` is a non-persistent buffer)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        if embed_dim % 2:
            raise ValueError(f"sinusoidal relative encodings need an even model dim, got {embed_dim}")
        self.embed_dim = embed_dim
        inv_freq = 1.0 / (10000 ** (torch.arange(0.0, embed_dim, 2.0, dtype=torch.float64) / embed_dim))  # (C/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, klen: int, clamp_len: Optional[int] = None, dtype: torch.dtype = torch.float32,
                device: Union[str, torch.device, None] = None) -> Tensor:
        """Encodings of distances klen-1, ..., 0 -> (S, C); ``clamp_len`` > 0 caps the distances."""
        acc = torch.promote_types(dtype, torch.float32)  # sinusoid in fp32 at least, cast at the end
        inv_freq = self.inv_freq.to(device=device, dtype=acc)
        distance = torch.arange(klen - 1, -1, -1.0, device=inv_freq.device, dtype=acc)  # (S,) descending
        if clamp_len is not None and clamp_len > 0:
            distance = distance.clamp(max=clamp_len)
        angles = distance[:, None] * inv_freq[None, :]  # (S, C/2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)  # (S, C)
