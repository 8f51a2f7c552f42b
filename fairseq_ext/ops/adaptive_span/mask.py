"""Soft span mask and trimming arithmetic of Adaptive Attention Span (Sukhbaatar et al. 2019, arXiv 1905.07799,
Sec. 2.2, the masking function m_z(x) = min(max((R + z - x) / R, 0), 1); spec adaptive_span.md §1.4, §1.5).

Parametrisation of the original code (``AdaptiveMask``), which this module reproduces exactly:

* z in [0, 1] is a *fraction* of the maximum span L (the paper's z is z·L tokens); R is the ramp length.
* The template over the L key columns is ``linspace(1 - L, 0, L)``: column j (0 <= j < L) holds the key at
  distance delta = L - j from the query (the last column is distance 1, the query's predecessor; distance 0,
  the query itself, is never attended). So the paper's x is delta - 1 and

      m_z(delta) = clamp((z·L - (delta - 1)) / R + 1, 0, 1) = clamp((z·L + R + 1 - delta) / R, 0, 1)

  m = 1 for delta <= z·L + 1, then falls linearly to 0 over the next R distances. At z = 0 distances 1..R
  still get nonzero weight (minimum effective span R). dm/dz = L / R inside the ramp, 0 outside.
* Trimming (computation saving): all heads of a layer share one length. S_max = min(L, ceil(max_h z_h·L) + R)
  (clamped at 0 too); trim = 64·floor(min(L - 1, L - S_max) / 64); the layer computes only the last
  L_pos = L - trim key columns (the nearest distances). The adaptive cache keeps C = min(L, L_pos + 64).
  Trimmed distances exceed ceil(z·L) + R, where the mask is exactly 0, so trimming is exact.

The mask is computed from distances in fp32 at least (never from a low-precision template buffer): in fp16
z·L near L = 8192 would be quantised to 4-token steps.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

TRIM_GRANULARITY = 64  # the original rounds the trimmed length down to a multiple of 64 ...
CACHE_SLACK = 64  # ... and keeps 64 extra cached positions in case spans grow


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def span_mask_at(z: Tensor, distance: Tensor, max_span: int, ramp: int) -> Tensor:
    """m_z(delta) = clamp((z·L + R + 1 - delta) / R, 0, 1) for key distance delta >= 1 (broadcasting z against
    ``distance``). Computed in fp32 at least; differentiable w.r.t. z."""
    acc = _acc_dtype(z.dtype)
    return ((z.to(acc) * max_span + (ramp + 1) - distance.to(acc)) / ramp).clamp(0, 1)


def span_distances(length: int, device: Union[str, torch.device, None] = None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """(length,) key distances of the window columns: column j is distance ``length - j`` (length, ..., 1)."""
    return torch.arange(length, 0, -1, device=device, dtype=dtype)  # (L,)


def adaptive_span_mask(z: Tensor, max_span: int, ramp: int, length: Optional[int] = None) -> Tensor:
    """Soft span mask over the last ``length`` (default ``max_span``) key columns.

    z: (H,) span fractions (any shape; the mask gets a trailing column dimension), max_span: L, ramp: R.
    Returns (H, length) in fp32 at least; column j masks distance ``length - j`` (the last column is distance 1),
    i.e. the original mask sliced to its last ``length`` columns after trimming."""
    length = max_span if length is None else length
    if not 0 < length <= max_span:
        raise ValueError(f"mask length {length} must be in [1, max_span={max_span}]")
    if ramp < 1:
        raise ValueError(f"span ramp must be >= 1, got {ramp}")
    distance = span_distances(length, z.device, _acc_dtype(z.dtype))  # (length,)
    return span_mask_at(z[..., None], distance, max_span, ramp)  # (H, length)


def _z_max(z: Union[Tensor, float]) -> float:
    return float(z.detach().max().item()) if isinstance(z, Tensor) else float(z)


def current_max_span(z: Union[Tensor, float], max_span: int, ramp: int, include_ramp: bool = True) -> int:
    """S_max = clamp(ceil(max_h z_h · L) (+ R), 0, L): the farthest distance with a nonzero mask in any head.
    (With a tensor z the max is read as a Python float, as the original's ``.item()`` on the fp32 parameter.)"""
    size = math.ceil(_z_max(z) * max_span) + (ramp if include_ramp else 0)
    return max(0, min(max_span, size))


def trim_length(z: Union[Tensor, float], max_span: int, ramp: int, granularity: int = TRIM_GRANULARITY) -> int:
    """Leading key columns that can be skipped: granularity · floor(min(L - 1, L - S_max) / granularity)."""
    trim = min(max_span - 1, max_span - current_max_span(z, max_span, ramp))
    return (trim // granularity) * granularity


class SpanTrim(NamedTuple):
    """Trimming decision of one layer (spec §1.5): S_max, trim, computed span L_pos = L - trim, cache length."""
    max_size: int
    trim: int
    span: int
    cache: int


def span_trim(z: Union[Tensor, float], max_span: int, ramp: int, *, granularity: int = TRIM_GRANULARITY,
              cache_slack: int = CACHE_SLACK, adapt_cache: bool = True) -> SpanTrim:
    """(S_max, trim, L_pos, C): L_pos = L - trim trailing keys (nearest distances) are needed per query;
    the adaptive cache keeps C = min(L, L_pos + cache_slack) positions (C = L without ``adapt_cache``).
    E.g. L = 8192, R = 32: z = 0 -> (32, 8128, 64, 128); z = 0.5 -> (4128, 4032, 4160, 4224)."""
    size = current_max_span(z, max_span, ramp)
    trim = trim_length(z, max_span, ramp, granularity)
    span = max_span - trim
    cache = min(max_span, span + cache_slack) if adapt_cache else max_span
    return SpanTrim(size, trim, span, cache)


def needed_keys(z: Union[Tensor, float], max_span: int, ramp: int, granularity: int = TRIM_GRANULARITY) -> int:
    """How many trailing key positions (distances 1..L_pos) a query needs: L_pos = L - trim."""
    return max_span - trim_length(z, max_span, ramp, granularity)


def fit_keys(x: Tensor, num_keys: int) -> Tensor:
    """x: (..., S, D) keys or values [cache ; segment]; returns (..., num_keys, D), the last ``num_keys``
    positions (pass num_keys = L_pos + M). Cut on the left when S > num_keys; left-padded with zeros when the cache
    is too short (the span grew since the cache was sized), as the original ``trim_memory``: zero keys are attended
    like the original's zero-initialised cache."""
    s = x.size(-2)
    if s >= num_keys:
        return x[..., s - num_keys:, :]  # (..., num_keys, D) view
    pad = x.new_zeros(*x.shape[:-2], num_keys - s, x.size(-1))  # (..., num_keys - S, D)
    return torch.cat([pad, x], dim=-2)  # (..., num_keys, D)
