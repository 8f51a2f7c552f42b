"""Query-chunked ALiBi attention: the sdpa kernel run on blocks of query rows, so the fp32 ALiBi bias only ever
exists for one block (Press et al. 2021, arXiv 2108.12409, Sec. 3).

Each query row's softmax is independent of the other rows, so for the rows i in [a, b) of a chunk

    O[a:b] = softmax(Q[a:b] K[:e]^T / sqrt(D) - m_h (i - j) + causal mask + key padding mask) V[:e]

is exactly the full pass restricted to those rows. With the causal mask the keys j >= q_offset + b are hidden
from every row of the chunk, so they are cut away: e is q_offset + b rounded up to a multiple of ``KEY_BLOCK``
(capped at S; e = S without the mask, or when S <= KEY_BLOCK). The chunk's bias is (1, H, b - a, e), built from the
same fp32 formula as the full (1, H, T, S) bias, never the whole T x S: peak memory is O(chunk x S) instead of
O(T x S), and about half of the causal work is skipped. Without a given ``chunk_size`` a chunk holds as many rows as
keep its bias under ``BIAS_BUDGET`` values, rounded down to a multiple of ``ROW_BLOCK`` (``chunk_rows``).

Cutting keys at multiples of ``KEY_BLOCK`` = 512, the key tile of PyTorch's CPU flash-attention kernel for S >= 512
(and a multiple of the CUDA kernels' tiles), keeps every row's online-softmax reduction over the same key tiles as
the full pass; a tile that is entirely masked for a row contributes exactly nothing. Query chunks whose sizes are
multiples of ``ROW_BLOCK`` = 8 rows also kept every row's q.k products bitwise unchanged on the CPU tested (other
sizes differ from ``sdpa`` in the last bit). So on CPU (torch 2.13, MKL) the default chunked output is bitwise equal
to ``sdpa``'s (tested); the contract everywhere else is equality to rounding (fp64 tests against ``naive``).

Under autograd every chunk keeps its own bias for the backward (like the full sdpa pass keeps its one bias), so the
saving is an evaluation saving; gradients are nonetheless exact (tested against naive).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .sdpa import alibi_attention_sdpa

BIAS_BUDGET = 1 << 24  # values of one chunk's (1, H, rows, S) bias: 64 MiB in fp32
KEY_BLOCK = 512  # keys are cut at multiples of this: the sdpa kernels' key tiles stay those of the full pass
ROW_BLOCK = 8  # default chunks are a multiple of this many query rows when the budget allows


def chunk_rows(num_heads: int, k_len: int, budget: int = BIAS_BUDGET) -> int:
    """Query rows per chunk so that the chunk's (1, H, rows, S) bias holds at most ``budget`` values: a multiple of
    ``ROW_BLOCK`` when at least that many fit, else as many as fit (at least 1)."""
    rows = budget // max(1, num_heads * k_len)
    return rows - rows % ROW_BLOCK if rows >= ROW_BLOCK else max(1, rows)


def key_end(q_end: int, k_len: int, causal: bool) -> int:
    """Keys a chunk whose last query sits at position ``q_end - 1`` must see: all S without the causal mask, else
    q_end rounded up to a multiple of ``KEY_BLOCK``, at most S (all S when S <= KEY_BLOCK)."""
    if not causal:
        return k_len
    return min(k_len, -(-q_end // KEY_BLOCK) * KEY_BLOCK)


def alibi_attention_chunked(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, *, q_offset: int = 0,
                            key_padding_mask: Optional[Tensor] = None, causal: bool = True, form: str = "relative",
                            dropout_p: float = 0.0, chunk_size: Optional[int] = None) -> Tensor:
    """Same signature and result as ``alibi_attention_naive``; q: (B, H, T, D), k/v: (B, H, S, D).

    ``chunk_size``: query rows per chunk (>= 1), or None for ``chunk_rows(H, S)``.
    """
    b, h, t, _ = q.shape
    s = k.size(2)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"ALiBi chunk_size must be >= 1 query row, got {chunk_size}")
    rows = chunk_size if chunk_size is not None else chunk_rows(h, s)

    def rows_between(start: int, stop: int) -> Tensor:  # query rows [start, stop): (B, H, stop - start, D)
        end = key_end(q_offset + stop, s, causal)  # keys after the chunk's last query are masked for all its rows
        pad = None if key_padding_mask is None else key_padding_mask[:, :end]  # (B, e)
        return alibi_attention_sdpa(q[:, :, start:stop], k[:, :, :end], v[:, :, :end], slopes,
                                    q_offset=q_offset + start, key_padding_mask=pad, causal=causal, form=form,
                                    dropout_p=dropout_p)  # bias (1, H, stop - start, e) built inside

    if t <= rows:
        return rows_between(0, t)  # (B, H, T, D)
    # One preallocated output: the chunks' results are copied in, not kept in a list for a final cat (a list of small
    # long-lived blocks interleaved with the large per-chunk temporaries fragmented the heap: +0.6 GB RSS at 32k).
    out = q.new_empty(b, h, t, v.size(3))  # (B, H, T, D)
    for start in range(0, t, rows):
        stop = min(t, start + rows)
        out[:, :, start:stop] = rows_between(start, stop)
    return out
