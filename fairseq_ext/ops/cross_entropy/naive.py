"""Reference summed cross-entropy: ``-sum_i log softmax(x_i)[t_i]`` over the rows whose target is not
``ignore_index``, as PyTorch computes it (``F.cross_entropy``: a log-softmax over each row, the target's entry
picked), on the logits upcast to at least float32; the spec ``chunked.py`` is tested against."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_NO_IGNORE = -100  # F.cross_entropy's default: no target id is negative


def cross_entropy_sum_naive(logits: Tensor, target: Tensor, ignore_index: Optional[int] = None) -> Tensor:
    """logits (N, V), target (N,) int64 -> scalar sum of -log p(target) over the rows not ignored."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(acc), target, ignore_index=_NO_IGNORE if ignore_index is None else ignore_index,
                           reduction="sum")
