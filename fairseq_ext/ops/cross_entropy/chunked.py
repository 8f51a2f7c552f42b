"""Summed cross-entropy without a log-probability tensor: the loss is ``sum_i (lse_i - x_i[t_i])`` with
``lse_i = log sum_v exp(x_i[v])`` computed over blocks of rows (a block of exp values at a time, never an (N, V) one),
and its gradient ``g * (softmax(x_i) - onehot(t_i))`` is computed in backward block by block from the saved logits and
``lse`` -- into the logits' own storage when the caller hands them over (``consume_logits``).

``F.cross_entropy`` instead keeps the (N, V) log-softmax for backward and, in backward, fills an (N, V) zero tensor
for the NLL's gradient and writes another for the log-softmax's: three fresh (N, V) buffers per step. At a 267k-word
adaptive softmax (B 4 x 512 on CPU) these and the passes over them were 3 s of a 25 s step; tensors above glibc's
32 MB mmap threshold are fresh pages each time, so writing them costs page faults on top of the bandwidth.

Ignored rows contribute nothing and get a zero gradient. Computation is in at least float32 (half logits are upcast
block by block; their gradient is written back in their dtype, as ``F.cross_entropy(x.float())`` would return it).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

CPU_BLOCK_ELEMENTS = 1 << 20  # 4 MB of float32 per block: fewer calls than 1 MB blocks, temporaries stay in the heap
CUDA_BLOCK_ELEMENTS = 1 << 26  # few launches; a GPU has memory for the temporaries


def _block_rows(logits: Tensor) -> int:
    elements = CUDA_BLOCK_ELEMENTS if logits.device.type == "cuda" else CPU_BLOCK_ELEMENTS
    return max(1, elements // max(1, logits.size(1)))


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, ignore_index: Optional[int], consume_logits: bool) -> Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)
        n = logits.size(0)
        lse = torch.empty(n, dtype=acc, device=logits.device)  # (N,)
        rows = _block_rows(logits)
        for start in range(0, n, rows):
            lse[start:start + rows] = torch.logsumexp(logits[start:start + rows].to(acc), dim=-1)  # (r,)
        keep = None if ignore_index is None else target.ne(ignore_index)  # (N,) bool
        safe_target = target if keep is None else target.masked_fill(~keep, 0)  # (N,)
        nll = lse - logits.gather(1, safe_target.unsqueeze(1)).squeeze(1).to(acc)  # (N,)
        if keep is not None:
            nll = nll.masked_fill(~keep, 0.0)
        ctx.save_for_backward(logits, lse, safe_target, keep)
        ctx.overwrite = consume_logits and not logits.is_leaf
        ctx.consumed = False
        return nll.sum()

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> Tuple[Optional[Tensor], None, None, None]:
        if ctx.consumed:
            raise RuntimeError("cross_entropy_sum(consume_logits=True) overwrote its logits with their gradient in "
                               "the first backward; it cannot run backward twice (retain_graph)")
        logits, lse, safe_target, keep = ctx.saved_tensors
        acc = lse.dtype
        scale = grad_loss.to(acc).expand(lse.shape)  # (N,) g per row
        if keep is not None:
            scale = scale * keep.to(acc)  # ignored rows get no gradient
        grad = logits if ctx.overwrite else torch.empty_like(logits, memory_format=torch.contiguous_format)
        ctx.consumed = ctx.overwrite
        rows = _block_rows(logits)
        for start in range(0, logits.size(0), rows):
            block = slice(start, start + rows)
            probs = grad[block] if grad.dtype == acc else logits[block].to(acc)  # (r, V); a copy for half logits
            if grad.dtype == acc and not ctx.overwrite:
                probs.copy_(logits[block])
            probs.sub_(lse[block].unsqueeze(1)).exp_().mul_(scale[block].unsqueeze(1))  # g * softmax
            probs.scatter_add_(1, safe_target[block].unsqueeze(1), -scale[block].unsqueeze(1))  # minus g * one-hot
            if grad.dtype != acc:
                grad[block].copy_(probs)
        return grad, None, None, None


def check_shapes(logits: Tensor, target: Tensor) -> None:
    """logits (N, V) and target (N,), or a ValueError naming both shapes."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_sum: logits (N, V) and target (N,) expected, got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")


def cross_entropy_sum_chunked(logits: Tensor, target: Tensor, ignore_index: Optional[int] = None,
                              consume_logits: bool = False) -> Tensor:
    """logits (N, V), target (N,) int64 -> scalar sum of -log p(target) over the rows not ignored; with
    ``consume_logits`` the backward writes the gradient over ``logits`` (the caller must not read them after
    backward; ignored for a leaf tensor, whose values are the caller's)."""
    check_shapes(logits, target)
    return _CrossEntropySum.apply(logits, target, ignore_index, consume_logits)
