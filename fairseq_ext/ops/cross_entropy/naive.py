"""Reference summed cross-entropy: ``-sum_i log softmax(x_i)[t_i]`` over the rows whose target is not
``ignore_index``, written as the textbook log-softmax followed by picking the target's log-probability, in at
least float32 (the spec ``chunked.py`` is tested against)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def cross_entropy_sum_naive(logits: Tensor, target: Tensor, ignore_index: Optional[int] = None) -> Tensor:
    """logits (N, V), target (N,) int64 -> scalar sum of -log p(target) over the rows not ignored."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    logp = torch.log_softmax(logits.to(acc), dim=-1)  # (N, V)
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target.ne(ignore_index)  # (N,)
    picked = logp.gather(1, target.masked_fill(~keep, 0).unsqueeze(1)).squeeze(1)  # (N,)
    return -(picked * keep.to(acc)).sum()
