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

from fairseq_ext.modules.positional.descending_sinusoid import DescendingSinusoid, descending_indices


class XLRelativePositions(nn.Module):
    """Sinusoid over descending distances; no parameters (the sinusoid's ``inv_freq`` is a non-persistent buffer)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.sinusoid = DescendingSinusoid(embed_dim)  # the same [sin | cos] blocks over distances; C must be even
        self.embed_dim = embed_dim

    def forward(self, klen: int, clamp_len: Optional[int] = None, dtype: torch.dtype = torch.float32,
                device: Union[str, torch.device, None] = None) -> Tensor:
        """Encodings of distances klen-1, ..., 0 -> (S, C); ``clamp_len`` > 0 caps the distances."""
        device = self.inv_freq.device if device is None else device
        return self.sinusoid(descending_indices(klen, device=device), clamp_len, dtype)  # (S, C)

    @property
    def inv_freq(self) -> Tensor:
        """(C/2,) fp64 frequencies f_k = 1 / 10000^(2k / C)."""
        return self.sinusoid.inv_freq
