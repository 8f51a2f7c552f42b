"""ALiBi attention op: ``alibi_attention(q, k, v, slopes, impl=...)`` dispatching to naive / sdpa / blocked /
chunked / flex / flash.

``impl="auto"`` picks
- ``blocked`` on CPU under the causal mask for T >= 2 * 128 queries that each see their own key (S >= q_offset + T)
  while its (H, r, S) strip fits ``BIAS_BUDGET`` values with r >= 8 rows, in training, and in evaluation unless
  ``chunk_size`` is given: causal query blocks whose biases are views of one strip, about half the attention work of
  the full-bias pass (``blocked.py``; forward + backward 1.3-1.9x faster than ``sdpa`` at T 512-4096, forward alone
  1.3-3.0x, on the 2-core CPU measured: ``scripts/bench_alibi_kernels.py``). On CUDA it is opt-in until measured;
- ``chunked`` when no gradient is being recorded (``torch.no_grad`` / ``inference_mode``: evaluation) and the T
  queries need more than one chunk (``T > chunk_size``, by default the rows whose (1, H, rows, S) bias fits
  ``BIAS_BUDGET`` values): the bias built per query chunk (O(chunk x S) memory instead of O(T x S));
- ``sdpa`` otherwise (fused kernels on CPU and GPU, handles dropout and padding).
Each choice is logged once.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from ..dispatch import ImplResolver
from .bias import BIAS_FORMS, alibi_bias, alibi_slopes, causal_mask
from .blocked import MIN_BLOCK_ROWS, alibi_attention_blocked, alibi_strip, block_rows
from .chunked import BIAS_BUDGET, ROW_BLOCK, alibi_attention_chunked, chunk_rows
from .naive import alibi_attention_naive
from .sdpa import alibi_attention_sdpa, alibi_sdpa_bias

IMPLS = ("auto", "naive", "sdpa", "blocked", "chunked", "flex", "flash")


def _flex(*args, **kwargs) -> Tensor:
    from .flex import alibi_attention_flex  # imported lazily: keeps CPU-only installs importing cleanly

    return alibi_attention_flex(*args, **kwargs)


def _flash(*args, **kwargs) -> Tensor:
    from .flash import alibi_attention_flash

    return alibi_attention_flash(*args, **kwargs)


_KERNELS: Dict[str, Callable[..., Tensor]] = {
    "naive": alibi_attention_naive,
    "sdpa": alibi_attention_sdpa,
    "blocked": alibi_attention_blocked,
    "chunked": alibi_attention_chunked,
    "flex": _flex,
    "flash": _flash,
}

resolve_impl = ImplResolver("ALiBi attention", IMPLS, "sdpa", "scaled_dot_product_attention, (1,H,T,S) bias")
_resolve_long_eval = ImplResolver("ALiBi attention without gradients, queries beyond one chunk", IMPLS, "chunked",
                                  "bias built per query chunk: O(chunk x S) memory instead of O(T x S)")
_resolve_blocked = ImplResolver("ALiBi attention on CPU, causal, T >= 256", IMPLS, "blocked",
                                "causal query blocks, biases viewed from one (1,H,r,S) strip: about half the work")


def select_impl(impl: str, num_heads: int, q_len: int, k_len: int, chunk_size: Optional[int] = None, *,
                q_offset: int = 0, causal: bool = True, device: Optional[torch.device] = None) -> str:
    """The kernel ``alibi_attention`` runs for these sizes (the module docstring's rule): an explicit ``impl`` as given
    (validated); ``auto`` -> ``blocked`` on CPU (``device`` None counts as CPU) under the causal mask with T >= 256
    and S >= q_offset + T while 8 rows of its strip fit the budget, with gradients, or without them when no
    ``chunk_size`` is given; else ``chunked`` without gradients when T exceeds one chunk of ``chunk_size`` rows (None:
    ``chunk_rows(H, S)``); else ``sdpa``."""
    if impl != "auto":
        return resolve_impl(impl)
    training = torch.is_grad_enabled()
    if (causal and q_len >= 2 * MIN_BLOCK_ROWS and q_offset + q_len <= k_len
            and (device is None or torch.device(device).type == "cpu")
            and (training or chunk_size is None) and block_rows(q_len, num_heads, k_len) >= ROW_BLOCK):
        return _resolve_blocked(impl)
    if not training and q_len > (chunk_size if chunk_size is not None else chunk_rows(num_heads, k_len)):
        return _resolve_long_eval(impl)
    return resolve_impl(impl)


def alibi_shared_bias(impl: str, slopes: Tensor, q_len: int, k_len: int, *, form: str = "relative",
                      dtype: torch.dtype = torch.float32) -> Optional[Tensor]:
    """The bias a decoder builds once for a causal pass without a cache (q_offset 0) and passes to every layer, for
    the concrete kernel ``impl`` (``select_impl``'s answer): sdpa's (1, H, T, S) bias, blocked's (1, H, r, T) strip
    (relative form; the key_index form builds per block), None for the kernels that build their own."""
    if impl == "sdpa":
        return alibi_sdpa_bias(slopes, q_len, k_len, form=form, dtype=dtype)
    if impl == "blocked" and form == "relative":
        return alibi_strip(slopes, block_rows(q_len, slopes.numel(), k_len), q_len, dtype=dtype)
    return None


def alibi_attention(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, *, q_offset: int = 0,
                    key_padding_mask: Optional[Tensor] = None, causal: bool = True, form: str = "relative",
                    dropout_p: float = 0.0, impl: str = "auto", shared_bias: Optional[Tensor] = None,
                    chunk_size: Optional[int] = None) -> Tensor:
    """Softmax attention with ALiBi biases. q: (B, H, T, D); k, v: (B, H, S, D); returns (B, H, T, D).

    ``shared_bias``: ``alibi_shared_bias`` of the selected kernel for the same arguments, built once by a decoder
    and shared across layers, or None (each kernel then builds what it needs).
    ``chunk_size``: query rows per chunk of the chunked kernel (None: as many as fit ``BIAS_BUDGET``).
    """
    if form not in BIAS_FORMS:
        raise ValueError(f"unknown ALiBi bias form {form!r}; choose one of {BIAS_FORMS}")
    if form == "key_index" and not causal:
        raise ValueError("the key_index ALiBi form is only correct under a causal mask (it relies on masking j > i)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"ALiBi chunk_size must be >= 1 query row, got {chunk_size}")
    impl = select_impl(impl, q.size(1), q.size(2), k.size(2), chunk_size, q_offset=q_offset, causal=causal,
                       device=q.device)
    extra = ({"bias": shared_bias} if impl == "sdpa" else {"strip": shared_bias} if impl == "blocked"
             else {"chunk_size": chunk_size} if impl == "chunked" else {})
    return _KERNELS[impl](q, k, v, slopes, q_offset=q_offset, key_padding_mask=key_padding_mask, causal=causal,
                          form=form, dropout_p=dropout_p, **extra)


__all__ = ["alibi_attention", "alibi_attention_naive", "alibi_attention_sdpa", "alibi_attention_blocked",
           "alibi_attention_chunked", "alibi_shared_bias", "alibi_sdpa_bias", "alibi_strip", "block_rows",
           "alibi_bias", "alibi_slopes", "causal_mask", "chunk_rows", "select_impl", "resolve_impl", "IMPLS",
           "BIAS_FORMS", "BIAS_BUDGET"]
