"""``sdpa``: the SHA-RNN attention through ``ops/sdpa`` (``scaled_dot_product_attention`` with a boolean mask and
its own probability dropout: on CUDA its fused kernels keep no (B, T, M + T) scores). The gated keys and the
dropped-out values are formed over [memory ; segment] as in ``naive``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..sdpa import sdpa
from .naive import values


def sha_attention_sdpa(q: Tensor, k_gate: Tensor, v_gate: Tensor, memory: Optional[Tensor], segment: Tensor,
                       scale: Optional[float], dropout_p: float) -> Tensor:
    """q (B, T, d), memory (B, M, d) or None, segment (B, T, d) -> (B, T, d)."""
    keys = segment if memory is None else torch.cat([memory, segment], dim=1)  # (B, S, d)
    t, s = q.size(1), keys.size(1)
    v = values(v_gate, memory, segment, dropout_p)  # (B, S, d)
    rows = torch.arange(t, device=q.device).unsqueeze(1)  # (T, 1)
    cols = torch.arange(s, device=q.device).unsqueeze(0) - (s - t)  # (1, S): memory < 0
    out = sdpa(q.unsqueeze(1), (k_gate * keys).unsqueeze(1), v.unsqueeze(1), attn_mask=cols <= rows,
               dropout_p=dropout_p, scale=scale)  # one head: (B, 1, T, d)
    return out.squeeze(1)  # (B, T, d)
