"""ALiBi positional bias (Press et al. 2021, arXiv 2108.12409, Sec. 3): logit += -m_h * (i - j).

No positional embedding is added to the input; the only position signal is this fixed, per-head linear penalty
on the query-key distance. The slopes are a non-persistent buffer (not in checkpoints, like the original fork).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fairseq_ext.ops.alibi import BIAS_FORMS, alibi_bias, alibi_slopes


class AlibiPositionalBias(nn.Module):
    """Holds the slopes (H,) and builds the bias for T queries (starting at ``q_offset``) against S keys."""

    def __init__(self, num_heads: int, form: str = "relative") -> None:
        super().__init__()
        if form not in BIAS_FORMS:
            raise ValueError(f"unknown ALiBi bias form {form!r}; choose one of {BIAS_FORMS}")
        self.num_heads = num_heads
        self.form = form
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)  # (H,) fp32

    def forward(self, q_len: int, k_len: int, q_offset: int = 0) -> Tensor:
        """(H, T, S) fp32 bias; future keys are not masked here."""
        return alibi_bias(self.slopes, q_len, k_len, q_offset, self.form)

    def _apply(self, fn, recurse: bool = True):
        # .half() / .to(bf16) must not round the slopes: the bias is always built from fp32 slopes.
        slopes = self.slopes
        module = super()._apply(fn, recurse)
        self.slopes = slopes.to(device=self.slopes.device, dtype=torch.float32)
        return module

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, form={self.form}"
