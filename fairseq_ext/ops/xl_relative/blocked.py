"""Causal query blocks for Transformer-XL relative attention (CPU; Dai et al. 2019, Sec. 3.3, Eq. in Appendix B).

With the T queries the last T of S = M + T keys, query i (position M + i) scores key j as

    A_ij = ((q_i + u) k_j + (q_i + v) W_R R_{M+i-j}) / sqrt(D),   visible iff  M + i - W < j <= M + i

(W the same-length window, or none). Every term depends on j only through k_j and the distance M + i - j. So the
rows [a, b) of the result equal the same op called on the queries q[a:b], the keys and values [lo, e) with
e = M + b (the keys after e lie in the future of every row of the block) and lo = max(0, M + a - W + 1) (the keys
before lo lie beyond the window of every row), and the encodings of the distances those keys can have: in that
call the n = b - a queries are again the last n of S' = e - lo keys, and its encoding row c' must hold distance
S' - 1 - c' = S - 1 - c, i.e. r[:, S - S':]. Each block is the ``sdpa`` form (``fused.py``) on those slices.

Why on CPU: with a bias that needs a gradient (the position scores), PyTorch's CPU SDPA takes its math path,
which forms the (B, H, T, S) scores, softmax and bias gradient for every key, the future half included; blocks
form (B, H, n, e - lo) and skip keys no row of the block sees: at M = T, about 3/4 of the work with no window.
Forward + backward of the op at B 4, H 8, D 32 on the 2-core CPU: T = M = 512 282-377 ms (sdpa) against
141-204 ms (blocks of 128 rows); T = M = 1,024 1,121-1,596 against 575-942 ms (``/tmp`` timing script, 3 runs).
With dropout each block draws its own mask (the distribution of one full draw).

Memory: the math path keeps each block's (B, H, n, e - lo) probabilities for the backward, about B H T (M + T/2)
values at M = T (16.9 GB of peak training memory at T = M = 8,192, ``bench.py`` with the sweep's flags, before this
rule; 1.1 GB with it). Once that estimate (``saved_bytes``) passes ``SAVED_BUDGET``, each block runs under
``torch.utils.checkpoint`` (non-reentrant, the RNG state restored, so the recomputed dropout draws are the same):
only the block's inputs are kept, and its forward runs again in the backward.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
import torch.utils.checkpoint
from torch import Tensor

from .fused import xl_relative_attention_sdpa

BLOCK_ROWS = 128  # query rows per block: fastest or within noise at T = M = 512 and 1,024 (128 / 256 / 64 / 32)
SAVED_BUDGET = 1 << 30  # bytes of probabilities kept for the backward past which blocks are recomputed


def block_ranges(q_len: int, k_len: int, rows: int,
                 window: Optional[int] = None) -> Iterator[Tuple[int, int, int, int]]:
    """For T = ``q_len`` queries over S = ``k_len`` keys: (a, b, lo, e) per block of at most ``rows`` queries: rows
    [a, b) see keys [lo, e) only."""
    mem = k_len - q_len
    for a in range(0, q_len, rows):
        b = min(q_len, a + rows)
        lo = 0 if window is None else max(0, mem + a - window + 1)
        yield a, b, lo, mem + b


def saved_bytes(q: Tensor, k_len: int, rows: int, window: Optional[int] = None) -> int:
    """Bytes of the blocks' probabilities that a backward keeps: sum of B H n (e - lo) elements of q's size."""
    b, h, t = q.shape[:3]
    per_row = b * h * q.element_size()
    return sum(per_row * (stop - start) * (e - lo) for start, stop, lo, e in block_ranges(t, k_len, rows, window))


def xl_relative_attention_blocked(q: Tensor, k: Tensor, v: Tensor, r: Tensor, content_bias: Tensor,
                                  position_bias: Tensor, *, window: Optional[int] = None, dropout_p: float = 0.0,
                                  rows: int = BLOCK_ROWS, recompute: Optional[bool] = None) -> Tensor:
    """Same arguments as ``xl_relative_attention_naive``, plus ``rows`` (query rows per block, >= 1) and
    ``recompute`` (run each block under activation checkpointing; None: when a gradient is recorded and
    ``saved_bytes`` exceeds ``SAVED_BUDGET``); returns (B, H, T, D)."""
    if rows < 1:
        raise ValueError(f"Transformer-XL block rows must be >= 1 query row, got {rows}")
    t, s = q.size(2), k.size(2)
    if recompute is None:
        grads = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, r, content_bias, position_bias))
        recompute = grads and saved_bytes(q, s, rows, window) > SAVED_BUDGET

    def block(qb: Tensor, kb: Tensor, vb: Tensor, rb: Tensor, u: Tensor, pb: Tensor) -> Tensor:
        return xl_relative_attention_sdpa(qb, kb, vb, rb, u, pb, window=window, dropout_p=dropout_p)

    blocks = []
    for a, b, lo, e in block_ranges(t, s, rows, window):
        args = (q[:, :, a:b], k[:, :, lo:e], v[:, :, lo:e], r[:, s - (e - lo):], content_bias, position_bias)
        blocks.append(torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False) if recompute
                      else block(*args))  # (B, H, b - a, D)
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)  # (B, H, T, D)
