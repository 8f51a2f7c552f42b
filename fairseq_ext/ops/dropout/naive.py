"""Reference for the packed-bits dropout (``packed.py``): the same 16-bit draws turned into uniforms in [0, 1) one
element at a time, dropped below the quantised probability, kept ones scaled by the inverse keep probability --
the textbook inverted dropout, written out."""
from __future__ import annotations

import torch
from torch import Tensor

from .packed import PROB_BITS, quantized_drop_count


def dropout_from_bits(x: Tensor, bits: Tensor, p: float) -> Tensor:
    """x (any shape), bits: int16 of x's numel (``random_bits16``) -> inverted dropout of x with those draws."""
    levels = float(1 << PROB_BITS)
    uniform = (bits.reshape(x.shape).to(torch.float64) + levels / 2) / levels  # (..) in [0, 1)
    drop_p = quantized_drop_count(p) / levels
    if drop_p >= 1.0:
        return x * 0.0
    keep = (uniform >= drop_p).to(x.dtype)  # (..) 0/1
    return x * keep / (1.0 - drop_p)
