"""Inverted dropout (Srivastava et al. 2014, eq. 1 with the 1/(1-p) rescaling at training time):
``dropout(x, p, training)``.

On CPU in training the mask comes from packed random bits (``packed.py``: four 16-bit draws per 64-bit random
number), about 4x cheaper than ``F.dropout``'s per-element Bernoulli draws, which cost a fifth of an SHA-RNN
training step on CPU; the drop probability is ``p`` rounded to a multiple of 2^-16 and the scale matches it, so the
output stays unbiased. Elsewhere (CUDA, where ``F.dropout`` is one fused kernel; evaluation; p = 0 or 1; inside
``torch.compile``, which fuses ``F.dropout``'s draws into its own kernels and cannot trace the int64 -> int16 view of
the packed bits) this is ``F.dropout``. ``naive.py`` is the reference the packed path is tested against (same bits,
same mask). ``relu_dropout(x, p, training)`` is ``dropout(relu(x))`` with the ReLU folded into the mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .naive import dropout_from_bits
from .packed import (
    FLOAT_MASK_DTYPES,
    PROB_BITS,
    draw_float_mask,
    float_mask,
    packed_dropout,
    packed_relu_dropout,
    quantized_drop_count,
    random_bits16,
)

__all__ = ["dropout", "relu_dropout", "dropout_from_bits", "draw_float_mask", "packed_dropout", "packed_relu_dropout",
           "quantized_drop_count", "random_bits16", "float_mask", "uses_packed_bits", "FLOAT_MASK_DTYPES", "PROB_BITS"]


def uses_packed_bits(x: Tensor, p: float, training: bool) -> bool:
    """Whether ``dropout(x, p, training)`` draws its mask from packed bits (CPU training outside torch.compile)."""
    return training and 0.0 < p < 1.0 and x.device.type == "cpu" and not torch.compiler.is_compiling()


def _check(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(x, p, training)`` with the CPU training mask drawn from packed bits (see the module docstring)."""
    _check(p)
    if uses_packed_bits(x, p, training):
        return packed_dropout(x, p)
    return F.dropout(x, p, training)


def relu_dropout(x: Tensor, p: float, training: bool, inplace: bool = False) -> Tensor:
    """``dropout(relu(x), p, training)`` (the FFN's activation and its dropout; the same draws): in CPU training
    one masked product (``packed_relu_dropout``); ``inplace``: written over ``x`` (the caller's temporary) unless x
    is a view (autograd would copy the gradient of its whole base)."""
    _check(p)
    if uses_packed_bits(x, p, training):
        return packed_relu_dropout(x, p, inplace=inplace)
    return F.dropout(F.relu(x, inplace=inplace and x._base is None), p, training)
