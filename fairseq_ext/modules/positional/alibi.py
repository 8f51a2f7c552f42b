"""ALiBi positional bias (Press et al. 2021, arXiv 2108.12409, Sec. 3): logit += -m_h * (i - j).

No positional embedding is added to the input; the only position signal is this fixed, per-head linear penalty
on the query-key distance. The slopes are a non-persistent buffer (not in checkpoints, like the original fork).
"""
from __future__ import annotations

import torch
from torch import nn

from fairseq_ext.ops.alibi import BIAS_FORMS, alibi_slopes


class AlibiPositionalBias(nn.Module):
    """Holds the slopes (H,) and the bias form; the attention ops build the bias from them (ops/alibi)."""

    def __init__(self, num_heads: int, form: str = "relative") -> None:
        super().__init__()
        if form not in BIAS_FORMS:
            raise ValueError(f"unknown ALiBi bias form {form!r}; choose one of {BIAS_FORMS}")
        self.num_heads = num_heads
        self.form = form
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)  # (H,) fp32

    def _apply(self, fn, recurse: bool = True):
        # .half() / .to(bf16) must not round the slopes: the bias is always built from fp32 slopes.
        slopes = self.slopes
        module = super()._apply(fn, recurse)
        self.slopes = slopes.to(device=self.slopes.device, dtype=torch.float32)
        return module

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, form={self.form}"
