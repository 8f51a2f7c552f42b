"""FlexAttention as every op's ``flex`` path runs it (ALiBi, Transformer-XL, adaptive span).

On CUDA ``flex_attention`` runs compiled (``torch.compile``, built once per process): called eagerly it falls back
to an unfused implementation that materialises the whole score matrix. On CPU it stays eager and forward-only:
torch 2.13 has no CPU backward for FlexAttention, and inductor's CPU FlexAttention template failed to compile some of
the tested shapes (a C++ error, ``cur_qSplitSize5`` undeclared).
"""
from __future__ import annotations

import functools
from typing import Callable, List, Optional

import torch
from torch import Tensor


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    """torch.compile(flex_attention), built on first use (nothing is compiled at import)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_kernel(device: torch.device) -> Callable[..., Tensor]:
    """``flex_attention`` for tensors on ``device``: compiled on CUDA, eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    return _compiled_flex() if device.type == "cuda" else flex_attention


def cpu_forward_only(tensors: List[Optional[Tensor]], fallback: str) -> List[Optional[Tensor]]:
    """The op's inputs as FlexAttention takes them: on CPU, refuse a call that records gradients for any of them
    (naming ``fallback``, the implementation to train with) and detach them (eager CPU FlexAttention refuses inputs
    that merely require grad); elsewhere unchanged."""
    present = [t for t in tensors if t is not None]
    if not present or present[0].device.type != "cpu":
        return tensors
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        raise ValueError(f"attn_impl='flex' has no backward pass on CPU in this torch version; use "
                         f"attn_impl='{fallback}' for CPU training (flex works for CPU inference and on GPU)")
    return [None if t is None else t.detach() for t in tensors]
