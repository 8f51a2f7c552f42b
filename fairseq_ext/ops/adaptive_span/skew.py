"""Fast adaptive-span attention: the original's skew layout (Sukhbaatar et al. 2019, arXiv 1905.07799; spec
adaptive_span.md §1.3) without its padded copies.

Content scores are computed for all pairs, X = Q K^T of shape (M, L + M) per head. In the original,

* ``unskew`` (flatten, right-pad by M, view as (M, L + M + 1), keep the first L columns) re-indexes row i so that
  column j is key i + j, i.e. distance L - j from query i (index L + i):  W[i, j] = X[i, i + j];
* ``skew`` (right-pad by M + 1, flatten, drop the last M, view as (M, L + M)) is its adjoint: it places window
  column j of row i at key column i + j, zeros elsewhere, so that skew(P) V sums over the window.

Here both are strided index maps of a contiguous (M, L + M) slice: element (i, j) sits at flat offset
i (L + M + 1) + j. ``unskew`` is a zero-copy ``as_strided`` view (like xl_relative's ``rel_shift``);
``skew`` is ``as_strided_scatter`` into one zero (M, L + M) tensor (differentiable, no (M, L + M + 1) pad copy).
``unskew_pad`` / ``skew_pad`` are the pad-and-view forms, kept for tests. Still materialised, as in the original:
the (M, L + M) content scores and the (M, L + M) skewed probabilities (so the cost stays M (L + M) per head; a
banded/blocked kernel would be the next step). Any number of key columns S >= L + M - 1
works (the window of the last query ends at column M - 1 + L - 1).

Numerics follow the spec's mixed-precision advice (§8.8): q is scaled by 1/sqrt(D) before the matmuls, so no
unscaled q.k product is formed (the persistent logit is (q/sqrt(D)) . (sqrt(D) k^p), equal to the original's
(q . sqrt(D) k^p) / sqrt(D)); softmax, span mask and renormalisation (eps 1e-8, which underflows in fp16) run in
fp32 at least; the probabilities are cast back to the input dtype for the value matmuls.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dropout import dropout


def _check_window(m: int, s: int, span: int) -> None:
    if span < 1 or s < span + m - 1:
        raise ValueError(f"window of {span} keys for {m} queries needs at least {span + m - 1} key columns, got {s}")


def unskew(x: Tensor, span: int) -> Tensor:
    """x (..., M, S) scores against [cache ; segment] -> (..., M, span) strided view, out[..., i, j] = x[..., i, i+j]
    (the key at distance span - j when the cache is ``span`` long). No copy; do not write into the result."""
    *lead, m, s = x.shape
    _check_window(m, s, span)
    x = x.contiguous()
    return x.as_strided((*lead, m, span), (*x.stride()[:-2], s + 1, 1), x.storage_offset())  # (..., M, span)


def skew(x: Tensor, num_keys: int) -> Tensor:
    """x (..., M, L) window weights -> (..., M, num_keys) with out[..., i, i + j] = x[..., i, j], zeros elsewhere
    (the adjoint of ``unskew``). One new zero tensor, no padded copy."""
    *lead, m, span = x.shape
    _check_window(m, num_keys, span)
    x = x.contiguous()
    base = x.new_zeros(*lead, m, num_keys)  # (..., M, S)
    return torch.as_strided_scatter(base, x, (*lead, m, span), (*base.stride()[:-2], num_keys + 1, 1),
                                    base.storage_offset())  # (..., M, S)


def unskew_pad(x: Tensor) -> Tensor:
    """The original pad-and-view ``_unskew``: (..., M, L + M) -> (..., M, L) (copies)."""
    *lead, m, s = x.shape
    span = s - m
    flat = F.pad(x.reshape(*lead, m * s), (0, m))  # (..., M (L + M) + M)
    return flat.view(*lead, m, s + 1)[..., :span]  # (..., M, L)


def skew_pad(x: Tensor) -> Tensor:
    """The original pad-and-view ``_skew``: (..., M, L) -> (..., M, L + M) (copies)."""
    *lead, m, span = x.shape
    flat = F.pad(x, (0, m + 1)).reshape(*lead, m * (span + m + 1))  # (..., M (L + M + 1))
    return flat[..., : m * (span + m)].view(*lead, m, span + m)  # (..., M, L + M)


def adaptive_span_attention_skew(q: Tensor, k: Tensor, v: Tensor, key_pe: Tensor,
                                 span_mask: Optional[Tensor] = None, pers_k: Optional[Tensor] = None,
                                 pers_v: Optional[Tensor] = None, *, dropout_p: float = 0.0, renorm: bool = True,
                                 eps: float = 1e-8) -> Tensor:
    """Same arguments as ``adaptive_span_attention_naive``; returns (B, H, M, D)."""
    d = q.size(3)
    span, s = key_pe.size(-1), k.size(2)  # L, L + M
    qs = q * (1.0 / math.sqrt(d))  # (B, H, M, D) scaled before the matmuls (fp16-safe)
    content = unskew(torch.matmul(qs, k.transpose(-1, -2)), span)  # (B, H, M, L) view of (B, H, M, L + M)
    logits = content + torch.matmul(qs, key_pe.to(q.dtype))  # (B, H, M, L) new tensor
    probs = window_weights(qs, logits, span_mask, pers_k, dropout_p=dropout_p, renorm=renorm, eps=eps)
    out = torch.matmul(skew(probs[..., :span], s), v)  # (B, H, M, D)
    return add_persistent_values(out, probs, span, pers_v)  # (B, H, M, D)


def window_weights(qs: Tensor, logits: Tensor, span_mask: Optional[Tensor], pers_k: Optional[Tensor], *,
                   dropout_p: float, renorm: bool, eps: float) -> Tensor:
    """The attention weights (B, H, M, L [+ N]) in qs's dtype from the scaled queries qs (B, H, M, D) and the window
    logits (B, H, M, L): the persistent logits qs . (sqrt(D) k^p) appended, softmax over the joint row in fp32 at
    least, the span mask on the L window columns (persistent slots unmasked), the joint renormalisation, dropout."""
    acc = torch.promote_types(qs.dtype, torch.float32)
    if pers_k is not None:
        pk = pers_k.to(qs.dtype) * math.sqrt(qs.size(-1))  # (H, D, N) effective keys
        logits = torch.cat([logits, torch.matmul(qs, pk)], dim=-1)  # (B, H, M, L + N)
    probs = torch.softmax(logits, dim=-1, dtype=acc)  # (B, H, M, L [+ N]) fp32 at least
    if span_mask is not None:
        mask = span_mask.to(acc)[..., None, :]  # (H, 1, L)
        if pers_k is not None:
            mask = F.pad(mask, (0, pers_k.size(-1)), value=1.0)  # (H, 1, L + N) persistent slots unmasked
        probs = probs * mask
        if renorm:
            probs = probs / (probs.sum(-1, keepdim=True) + eps)
    return dropout(probs, p=dropout_p, training=dropout_p > 0).to(qs.dtype)


def add_persistent_values(out: Tensor, probs: Tensor, span: int, pers_v: Optional[Tensor]) -> Tensor:
    """out (B, H, M, D) plus the persistent slots' weights probs[..., L:] times the effective values sqrt(N) v^p."""
    if pers_v is None:
        return out
    pv = pers_v.to(out.dtype) * math.sqrt(pers_v.size(-2))  # (H, N, D) effective values
    return out + torch.matmul(probs[..., span:], pv)  # (B, H, M, D)
