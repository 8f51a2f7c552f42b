"""Summed cross-entropy of language-model logits, ``sum_i -log softmax(x_i)[t_i]`` (the NLL the LM criterion
optimises; Bengio et al. 2003, eq. 1 summed over tokens): ``cross_entropy_sum(logits, target, ignore_index, impl)``.

``chunked`` (``auto``) never forms the (N, V) log-probabilities and computes the gradient block by block, in place
over the logits when the caller hands them over (``consume_logits``); ``naive`` is the textbook log-softmax and pick,
the reference it is tested against (values and gradients)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..dispatch import ImplResolver
from .chunked import cross_entropy_sum_chunked
from .naive import cross_entropy_sum_naive

__all__ = ["cross_entropy_sum", "cross_entropy_sum_chunked", "cross_entropy_sum_naive", "IMPLS"]

IMPLS = ("auto", "naive", "chunked")
_resolve = ImplResolver("cross_entropy_sum", IMPLS, "chunked",
                        "no (N, V) log-probabilities; gradient in blocks, over the logits when consumed",
                        flag="impl")


def cross_entropy_sum(logits: Tensor, target: Tensor, ignore_index: Optional[int] = None, impl: str = "auto",
                      consume_logits: bool = False) -> Tensor:
    """logits (N, V), target (N,) int64 -> scalar ``sum -log p(target)`` over rows whose target is not
    ``ignore_index``, in at least float32; ``consume_logits``: the backward may overwrite ``logits`` (chunked)."""
    if _resolve(impl) == "naive":
        return cross_entropy_sum_naive(logits, target, ignore_index)
    return cross_entropy_sum_chunked(logits, target, ignore_index, consume_logits)
