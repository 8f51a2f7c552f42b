"""ALiBi slopes and bias matrices (Press et al. 2021, arXiv 2108.12409, Sec. 3).

The logit of head h for query position i and key position j <= i is q_i.k_j / sqrt(d) - m_h * (i - j); the bias
is added *after* the 1/sqrt(d) scaling and is itself unscaled (paper footnote 10). The slopes m_h are a geometric
sequence starting at 2^(-8/n) with the same ratio; for a head count n that is not a power of two the first
c = 2^floor(log2 n) slopes are those of c heads and the rest are the even-indexed slopes of 2c heads (the original
code's order; never sorted).
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor

BIAS_FORMS = ("relative", "key_index")


def _power_of_two_slopes(n: int) -> List[float]:
    start = 2.0 ** (-8.0 / n)  # first term == ratio == 2^(-8/n)
    return [start ** (h + 1) for h in range(n)]


def alibi_slopes(num_heads: int) -> Tensor:
    """Slopes m_h, h = 0..num_heads-1, as a float32 tensor (H,) in the original head order."""
    if num_heads < 1:
        raise ValueError(f"ALiBi needs at least one attention head, got {num_heads}")
    closest = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = _power_of_two_slopes(closest)
    if closest != num_heads:
        slopes += _power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)  # (H,)


def alibi_bias(slopes: Tensor, q_len: int, k_len: int, q_offset: int = 0, form: str = "relative",
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive bias (H, T, S), computed in ``dtype`` (fp32 unless the attention runs in fp64), for T queries at
    positions q_offset..q_offset+T-1 against S keys at 0..S-1.

    ``relative``: -m_h * (i - j) (the paper's form; exact in any precision up to rounding of the product).
    ``key_index``: m_h * j (the original fork's form; equal to ``relative`` up to the per-row constant m_h * i,
    which softmax ignores once future keys are masked). Future keys are *not* masked here.
    """
    if form not in BIAS_FORMS:
        raise ValueError(f"unknown ALiBi bias form {form!r}; choose one of {BIAS_FORMS}")
    device = slopes.device
    m = slopes.to(dtype)[:, None, None]  # (H, 1, 1)
    k_pos = torch.arange(k_len, device=device, dtype=dtype)  # (S,)
    if form == "key_index":
        return (m * k_pos[None, None, :]).expand(-1, q_len, -1)  # (H, T, S)
    q_pos = torch.arange(q_offset, q_offset + q_len, device=device, dtype=dtype)  # (T,)
    distance = q_pos[:, None] - k_pos[None, :]  # (T, S), i - j
    return -m * distance[None]  # (H, T, S)


def causal_mask(q_len: int, k_len: int, q_offset: int, device: torch.device) -> Tensor:
    """Bool (T, S): True where key j lies in the future of query i (j > q_offset + i)."""
    q_pos = torch.arange(q_offset, q_offset + q_len, device=device)  # (T,)
    k_pos = torch.arange(k_len, device=device)  # (S,)
    return k_pos[None, :] > q_pos[:, None]  # (T, S)
