"""Transformer-XL relative attention op: ``xl_relative_attention(q, k, v, r, u, v_bias, impl=...)``.

``impl="auto"`` picks ``blocked`` on CPU from T = 2 x 128 queries (causal query blocks, each the ``sdpa`` form
over the keys its rows can see: about 3/4 of the work at M = T; ``blocked.py``) and ``sdpa`` otherwise, and logs the
choice once; ``sdpa`` adds the shifted position scores as SDPA's bias; ``shift`` is the original explicit-score
algorithm with the relative shift; ``naive`` gathers r_{i-j} per (i, j) (the reference); ``flex`` is FlexAttention
reading the unshifted position scores by index (opt-in: no dropout, no CPU backward; flex.py). An unknown
implementation is an error.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from ..dispatch import ImplResolver
from .blocked import BLOCK_ROWS, xl_relative_attention_blocked
from .fused import xl_relative_attention_sdpa, xl_relative_attention_shift
from .mask import SAME_LENGTH_CONVENTIONS, same_length_window, xl_attention_mask
from .naive import xl_relative_attention_naive
from .shift import rel_shift, rel_shift_pad

IMPLS = ("auto", "naive", "shift", "sdpa", "blocked", "flex")


def _flex(*args, **kwargs) -> Tensor:
    from .flex import xl_relative_attention_flex  # imported lazily, as ALiBi's: CPU-only installs import cleanly

    return xl_relative_attention_flex(*args, **kwargs)


_KERNELS: Dict[str, Callable[..., Tensor]] = {
    "naive": xl_relative_attention_naive,
    "shift": xl_relative_attention_shift,
    "sdpa": xl_relative_attention_sdpa,
    "blocked": xl_relative_attention_blocked,
    "flex": _flex,
}

resolve_impl = ImplResolver("Transformer-XL attention", IMPLS, "sdpa", "relative scores as the additive bias")
_resolve_blocked = ImplResolver("Transformer-XL attention on CPU, T >= 256", IMPLS, "blocked",
                                "causal query blocks over the keys their rows see")


def select_impl(impl: str, q_len: int, device: Optional[torch.device] = None) -> str:
    """The kernel ``xl_relative_attention`` runs (the module docstring's rule): an explicit ``impl`` as given
    (validated); ``auto`` -> ``blocked`` on CPU (``device`` None counts as CPU) with T >= 2 * ``BLOCK_ROWS``, else
    ``sdpa``."""
    if impl == "auto" and q_len >= 2 * BLOCK_ROWS and (device is None or torch.device(device).type == "cpu"):
        return _resolve_blocked(impl)
    return resolve_impl(impl)


def xl_relative_attention(q: Tensor, k: Tensor, v: Tensor, r: Tensor, content_bias: Tensor,
                          position_bias: Tensor, *, window: Optional[int] = None, dropout_p: float = 0.0,
                          impl: str = "auto") -> Tensor:
    """q: (B, H, T, D); k, v: (B, H, S, D) with the T queries the last T keys; r: (H, S, D), row c = projected
    encoding of distance S-1-c; content_bias (u), position_bias (v): (H, D); window: same_length window or None.
    Returns (B, H, T, D)."""
    if q.size(2) > k.size(2):
        raise ValueError(f"{q.size(2)} queries but only {k.size(2)} keys: keys must be [memory; segment]")
    if r.size(1) != k.size(2):
        raise ValueError(f"need one relative encoding per key distance: r has {r.size(1)} rows, keys {k.size(2)}")
    return _KERNELS[select_impl(impl, q.size(2), q.device)](q, k, v, r, content_bias, position_bias, window=window,
                                                            dropout_p=dropout_p)


__all__ = ["xl_relative_attention", "xl_relative_attention_naive", "xl_relative_attention_shift",
           "xl_relative_attention_sdpa", "xl_relative_attention_blocked", "select_impl", "rel_shift", "rel_shift_pad",
           "xl_attention_mask", "same_length_window", "resolve_impl", "IMPLS", "SAME_LENGTH_CONVENTIONS"]
