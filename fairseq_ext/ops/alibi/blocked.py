"""Causal query blocks for ALiBi (CPU training and evaluation): each block of query rows attends only to the keys up
to its own last row, and every block's bias is a view of one (1, H, r, S) strip (Press et al. 2021, arXiv 2108.12409,
Sec. 3).

For the query rows [a, b) of a block, at positions p = q_offset + a, ..., q_offset + b - 1,

    O[a:b] = softmax(Q[a:b] K[:e]^T / sqrt(D) - m_h (i - j) + causal mask + key padding mask) V[:e],   e = q_offset + b

is exactly the full pass restricted to those rows: the keys j >= e lie in the future of every row of the block. The
full-bias sdpa kernel computes the masked half of Q K^T anyway (PyTorch's CPU flash kernel skips no tile under an
explicit mask, and reads the whole (H, T, S) mask); here the work is sum_b r (q_offset + b) instead of T S, about half.

The relative bias depends on i - j only (Toeplitz). So with the strip R = the bias of the last r rows over all
S = q_offset + T keys, causal -inf included ((1, H, r, S), rows at positions P = q_offset + T - r, ...), the bias of
a block of n <= r rows starting at position p is the view

    R[:, :, :n, d : d + e],   d = P - p,   since  R[x, j + d] = -m_h (P + x - j - d) = -m_h (p + x - j),

and R's causal -inf (column > P + x) lands exactly on j > p + x. A block that is shorter than r must start at or
before P, so the first block takes the T mod r left-over rows. One strip is built per forward and shared by every
layer (``alibi_strip``): O(r S) bias values instead of O(T S) (r capped so that they stay within ``BIAS_BUDGET``),
bitwise the same values as the full bias's rows. The
``key_index`` form (m_h j, the fork's) is not Toeplitz: each block builds its own (H, n, e) bias from the formula.

Only the reduction order of each row's softmax differs from the full-bias kernel (the key tiles end at e), so
outputs and gradients equal ``naive``'s to rounding (tested in float64 with gradients, odd sizes, padding, cached
keys). With dropout each block draws its own mask (the same distribution as one full draw).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .chunked import BIAS_BUDGET, ROW_BLOCK
from .sdpa import alibi_attention_sdpa, alibi_sdpa_bias

BLOCK_ROWS = 256  # rows per block from T = 2 * 256: fastest or within noise at T 512..4096 (bench_alibi_kernels.py)
MIN_BLOCK_ROWS = 128  # shorter passes use blocks of 128 rows; below 2 * 128 rows blocking does not pay


def block_rows(q_len: int, num_heads: int = 1, k_len: int = 0, budget: int = BIAS_BUDGET) -> int:
    """Rows per block for T queries over S keys: 256 from T = 512, 128 below (one block when T < 256), and fewer
    when the (H, rows, S) strip would exceed ``budget`` values (a multiple of ``ROW_BLOCK``; 0 when not even
    ``ROW_BLOCK`` rows fit: the caller then needs another kernel)."""
    rows = BLOCK_ROWS if q_len >= 2 * BLOCK_ROWS else MIN_BLOCK_ROWS if q_len >= 2 * MIN_BLOCK_ROWS else q_len
    fit = budget // max(1, num_heads * k_len)
    return rows if rows <= fit else fit - fit % ROW_BLOCK


def alibi_strip(slopes: Tensor, rows: int, q_len: int, *, q_offset: int = 0,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """The strip R (1, H, r, q_offset + T): the full causal relative bias's last r = min(rows, T) rows."""
    r = min(rows, q_len)
    return alibi_sdpa_bias(slopes, r, q_offset + q_len, q_offset=q_offset + q_len - r, causal=True,
                           form="relative", dtype=dtype)  # (1, H, r, S)


def alibi_attention_blocked(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, *, q_offset: int = 0,
                            key_padding_mask: Optional[Tensor] = None, causal: bool = True, form: str = "relative",
                            dropout_p: float = 0.0, rows: Optional[int] = None,
                            strip: Optional[Tensor] = None) -> Tensor:
    """Same signature and result as ``alibi_attention_naive`` under the causal mask; q: (B, H, T, D), k/v: (B, H, S,
    D) with S >= q_offset + T (keys after the last query are masked for every row and are not read).

    ``rows``: query rows per block (>= 1; None: ``block_rows(T, H, S)``). ``strip``: a precomputed ``alibi_strip`` for
    these slopes, rows, T and q_offset (shared across layers), or None to build it here (relative form only).
    """
    if not causal:
        raise ValueError("the blocked ALiBi kernel needs the causal mask (without it every query sees every key); "
                         "use attn_impl sdpa")
    t, s = q.size(2), k.size(2)
    if q_offset + t > s:
        raise ValueError(f"the blocked ALiBi kernel needs every query's own key: q_offset ({q_offset}) + T ({t}) "
                         f"> S ({s}); use attn_impl sdpa")
    if rows is not None and rows < 1:
        raise ValueError(f"ALiBi block rows must be >= 1 query row, got {rows}")
    r = min(rows if rows is not None else max(1, block_rows(t, q.size(1), s)), t)
    full = q_offset + t  # keys the last query sees
    if form == "relative":
        if strip is None:
            strip = alibi_strip(slopes, r, t, q_offset=q_offset, dtype=q.dtype)
        if strip.shape[-2:] != (r, full):
            raise ValueError(f"precomputed ALiBi strip is {tuple(strip.shape[-2:])} (rows, keys), not {(r, full)}")
    elif strip is not None:
        raise ValueError(f"an ALiBi strip is only defined for the relative bias form, not {form!r}")
    last = q_offset + t - r  # position of the strip's first row
    blocks = []
    start = 0
    for stop in [t % r] * (t % r > 0) + list(range(t % r + r, t + 1, r)):  # the left-over rows first
        end = q_offset + stop  # keys [0, end) are visible to some row of [start, stop)
        view = None if strip is None else strip[:, :, :stop - start, last - q_offset - start:][..., :end]
        pad = None if key_padding_mask is None else key_padding_mask[:, :end]  # (B, e)
        blocks.append(alibi_attention_sdpa(q[:, :, start:stop], k[:, :, :end], v[:, :, :end], slopes,
                                           q_offset=q_offset + start, key_padding_mask=pad, causal=True, form=form,
                                           dropout_p=dropout_p, bias=view))  # (B, H, n, D)
        start = stop
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)  # (B, H, T, D)
