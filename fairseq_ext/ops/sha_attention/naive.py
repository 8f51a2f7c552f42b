"""``naive``: the SHA-RNN attention formula of ``__init__`` written out over [memory ; segment]: the reference the
other kernels are tested against (gated keys and dropped-out values over all M + T rows, the (B, T, M + T) scores
scaled, masked, normalised in fp32 at least, dropped out and applied)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..dropout import dropout


def values(v_gate: Tensor, memory: Optional[Tensor], segment: Tensor, dropout_p: float) -> Tensor:
    """dropout(g_v ⊙ [memory ; segment]) (B, M + T, d): the memory's mask drawn first, then the segment's."""
    parts = [segment] if memory is None else [memory, segment]
    return torch.cat([dropout(v_gate * part, dropout_p, dropout_p > 0) for part in parts], dim=1)


def sha_attention_naive(q: Tensor, k_gate: Tensor, v_gate: Tensor, memory: Optional[Tensor], segment: Tensor,
                        scale: Optional[float], dropout_p: float) -> Tensor:
    """q (B, T, d), memory (B, M, d) or None, segment (B, T, d) -> (B, T, d)."""
    keys = segment if memory is None else torch.cat([memory, segment], dim=1)  # (B, S, d), S = M + T
    t, s = q.size(1), keys.size(1)
    v = values(v_gate, memory, segment, dropout_p)  # (B, S, d)
    k = k_gate * keys  # (B, S, d)
    rows = torch.arange(t, device=q.device).unsqueeze(1)  # (T, 1)
    cols = torch.arange(s, device=q.device).unsqueeze(0) - (s - t)  # (1, S): memory < 0
    scores = torch.matmul(q, k.transpose(1, 2))  # (B, T, S)
    scores = scores.div_(math.sqrt(q.size(-1))) if scale is None else scores.mul_(scale)  # in place, as the original
    scores = scores.masked_fill_(cols > rows, float("-inf"))  # in place: the product saves its inputs only
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(v.dtype)
    return torch.matmul(dropout(probs, dropout_p, dropout_p > 0), v)  # (B, T, d)
