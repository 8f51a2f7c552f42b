"""Learned span of Adaptive Attention Span (Sukhbaatar et al. 2019, arXiv 1905.07799, Sec. 2.2, Eq. 3-4; spec
adaptive_span.md §1.4, §1.5): per-head (or per-layer) span fractions z in [0, 1] of the maximum span L, the soft
mask m_z(delta) = clamp((z·L - (delta - 1)) / R + 1, 0, 1) over key distances, the trimming decision and the L1
span penalty.

* z is kept in fp32 even when the model is cast to fp16/bf16 (``model.half()``): z·L near L = 8192 would otherwise
  be quantised to 4-token steps (spec §8.8). The mask is computed from distances, never from a low-precision buffer.
* z is clamped to [0, 1] after every optimizer step through ``parameter_bounds()`` (``fairseq_ext.optim.bounds``,
  which also clamps fairseq's fp32 master copy), never in ``forward``.
* ``aux_loss()``: coeff · L · mean(z) while training (added to the mean NLL by ``lm_loss``), None in evaluation.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from fairseq_ext.ops.adaptive_span import SpanTrim, adaptive_span_mask, span_trim


class AdaptiveSpanMask(nn.Module):
    def __init__(self, num_spans: int, max_span: int, ramp: int, init: float, loss_coeff: float,
                 adapt_cache: bool = True) -> None:
        """num_spans: heads (per-head spans) or 1 (one span per layer); max_span L; ramp R; init: initial z;
        loss_coeff: span-loss coefficient; adapt_cache: keep only L_pos + 64 cached positions (else L)."""
        super().__init__()
        if max_span < 1:
            raise ValueError(f"--attn-span must be >= 1, got {max_span}")
        if ramp < 1:
            raise ValueError(f"--adapt-span-ramp must be >= 1, got {ramp}")
        if not 0.0 <= init <= 1.0:
            raise ValueError(f"--adapt-span-init is a fraction of --attn-span and must be in [0, 1], got {init}")
        self.max_span = max_span
        self.ramp = ramp
        self.loss_coeff = loss_coeff
        self.adapt_cache = adapt_cache
        self.z = nn.Parameter(torch.full((num_spans,), float(init)))  # (K,) or (1,)

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply; casts to fp16/bf16 leave z in fp32 (spec §8.8)."""
        super()._apply(fn, recurse)
        if self.z.dtype in (torch.float16, torch.bfloat16):
            self.z.data = self.z.data.float()
        return self

    def trim(self) -> SpanTrim:
        """(S_max, trim, L_pos, cache length) for the current z (one host read of max z, as the original)."""
        return span_trim(self.z, self.max_span, self.ramp, adapt_cache=self.adapt_cache)

    def mask(self, length: int) -> Tensor:
        """(K or 1, length) mask of the ``length`` nearest distances (column j = distance length - j), fp32+."""
        return adaptive_span_mask(self.z, self.max_span, self.ramp, length)

    def spans(self) -> Tensor:
        """(K or 1,) current spans in tokens: min(L, ceil(z·L) + R), clamped at 0 (the original's monitoring, which
        reads z as a Python float: the product is taken in fp64, as in the trimming decision)."""
        z = self.z.detach().double()
        return (torch.ceil(z * self.max_span) + self.ramp).clamp(0, self.max_span)

    def parameter_bounds(self) -> List[Tuple[nn.Parameter, float, float]]:
        return [(self.z, 0.0, 1.0)]

    def aux_loss(self) -> Optional[Tensor]:
        """coeff · L · mean(z) (training only; an L1 penalty on the average span in tokens)."""
        if not self.training or self.loss_coeff == 0:
            return None
        return self.loss_coeff * self.max_span * self.z.mean()

    def extra_repr(self) -> str:
        return (f"spans={self.z.numel()}, max_span={self.max_span}, ramp={self.ramp}, "
                f"loss_coeff={self.loss_coeff}, adapt_cache={self.adapt_cache}")
