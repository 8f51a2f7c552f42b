"""Summed cross-entropy of language-model logits, ``sum_i -log softmax(x_i)[t_i]`` (the NLL the LM criterion
optimises; Bengio et al. 2003, eq. 1 summed over tokens): ``cross_entropy_sum(logits, target, ignore_index, impl)``.

``chunked`` never forms the (N, V) log-probabilities and computes the gradient block by block, in place over the
logits when the caller hands them over (``consume_logits``); ``naive`` is ``F.cross_entropy`` on the upcast logits
(a log-softmax and the target picked), the reference it is tested against (values and gradients). ``auto`` takes
``chunked`` from ``CHUNKED_MIN_ELEMENTS`` logits on, where the (N, V) buffers ``F.cross_entropy`` writes are past
glibc's largest mmap threshold (32 MB in float32), hence fresh pages every step, and ``naive`` below, where its fused
row kernels are faster (CPU, 2 threads, forward + backward with the output product: 4,096 x 2,002 logits 68 vs
69 ms, 4,096 x 10,000 447 vs 320 ms, 270 x 207,744 435 vs 279 ms)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..dispatch import ImplResolver
from .chunked import check_shapes, cross_entropy_sum_chunked
from .naive import cross_entropy_sum_naive

__all__ = ["cross_entropy_sum", "cross_entropy_sum_chunked", "cross_entropy_sum_naive", "IMPLS", "CHUNKED_MIN_ELEMENTS"]

IMPLS = ("auto", "naive", "chunked")
CHUNKED_MIN_ELEMENTS = 1 << 23  # 8M logits: 32 MB in float32
_resolve = ImplResolver("cross_entropy_sum", IMPLS, "chunked",
                        f"from {CHUNKED_MIN_ELEMENTS} logits on: no (N, V) log-probabilities, the gradient in blocks "
                        "over the consumed logits; F.cross_entropy below", flag="impl")


def cross_entropy_sum(logits: Tensor, target: Tensor, ignore_index: Optional[int] = None, impl: str = "auto",
                      consume_logits: bool = False) -> Tensor:
    """logits (N, V), target (N,) int64 -> scalar ``sum -log p(target)`` over rows whose target is not
    ``ignore_index``, in at least float32; ``consume_logits``: the backward may overwrite ``logits`` (chunked)."""
    check_shapes(logits, target)
    chosen = _resolve(impl)
    if chosen == "naive" or (impl == "auto" and logits.numel() < CHUNKED_MIN_ELEMENTS):
        return cross_entropy_sum_naive(logits, target, ignore_index)
    return cross_entropy_sum_chunked(logits, target, ignore_index, consume_logits)
