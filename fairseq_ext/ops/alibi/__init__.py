"""ALiBi attention op: ``alibi_attention(q, k, v, slopes, impl=...)`` dispatching to naive / sdpa / chunked / flex /
flash.

``impl="auto"`` picks ``sdpa`` (fused kernels on CPU and GPU, handles dropout and padding), except when no gradient
is being recorded (``torch.no_grad`` / ``inference_mode``: evaluation) and the T queries need more than one chunk
(``T > chunk_size``, by default the rows whose (1, H, rows, S) bias fits ``BIAS_BUDGET`` values): then ``chunked``,
which builds the bias per query chunk (O(chunk x S) memory instead of O(T x S)). Each choice is logged once.
``naive`` is the explicit reference; ``flex`` is FlexAttention with a score_mod (opt-in); ``flash`` is
FlashAttention-2's ``alibi_slopes`` when the ``flash-attn`` package imports (opt-in, CUDA fp16/bf16, ``flash.py``).
An explicitly requested implementation that cannot run is an error, never a silent fallback.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from ..dispatch import ImplResolver
from .bias import BIAS_FORMS, alibi_bias, alibi_slopes, causal_mask
from .chunked import BIAS_BUDGET, alibi_attention_chunked, chunk_rows
from .naive import alibi_attention_naive
from .sdpa import alibi_attention_sdpa, alibi_sdpa_bias

IMPLS = ("auto", "naive", "sdpa", "chunked", "flex", "flash")


def _flex(*args, **kwargs) -> Tensor:
    from .flex import alibi_attention_flex  # imported lazily: keeps CPU-only installs importing cleanly

    return alibi_attention_flex(*args, **kwargs)


def _flash(*args, **kwargs) -> Tensor:
    from .flash import alibi_attention_flash

    return alibi_attention_flash(*args, **kwargs)


_KERNELS: Dict[str, Callable[..., Tensor]] = {
    "naive": alibi_attention_naive,
    "sdpa": alibi_attention_sdpa,
    "chunked": alibi_attention_chunked,
    "flex": _flex,
    "flash": _flash,
}

resolve_impl = ImplResolver("ALiBi attention", IMPLS, "sdpa", "scaled_dot_product_attention, (1,H,T,S) bias")
_resolve_long_eval = ImplResolver("ALiBi attention without gradients, queries beyond one chunk", IMPLS, "chunked",
                                  "bias built per query chunk: O(chunk x S) memory instead of O(T x S)")


def select_impl(impl: str, num_heads: int, q_len: int, k_len: int, chunk_size: Optional[int] = None) -> str:
    """The kernel ``alibi_attention`` runs for these sizes: an explicit ``impl`` as given (validated); ``auto`` ->
    ``chunked`` when no gradient is recorded and the T queries need more than one chunk of ``chunk_size`` rows
    (None: ``chunk_rows(H, S)``), else ``sdpa``."""
    if impl == "auto" and not torch.is_grad_enabled():
        rows = chunk_size if chunk_size is not None else chunk_rows(num_heads, k_len)
        if q_len > rows:
            return _resolve_long_eval(impl)
    return resolve_impl(impl)


def alibi_attention(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, *, q_offset: int = 0,
                    key_padding_mask: Optional[Tensor] = None, causal: bool = True, form: str = "relative",
                    dropout_p: float = 0.0, impl: str = "auto", sdpa_bias: Optional[Tensor] = None,
                    chunk_size: Optional[int] = None) -> Tensor:
    """Softmax attention with ALiBi biases. q: (B, H, T, D); k, v: (B, H, S, D); returns (B, H, T, D).

    ``sdpa_bias``: a precomputed ``alibi_sdpa_bias`` for the same arguments, shared across layers by a decoder;
    only the sdpa kernel uses it (naive builds its own reference bias, chunked one per chunk, flex needs none).
    ``chunk_size``: query rows per chunk of the chunked kernel (None: as many as fit ``BIAS_BUDGET``).
    """
    if form not in BIAS_FORMS:
        raise ValueError(f"unknown ALiBi bias form {form!r}; choose one of {BIAS_FORMS}")
    if form == "key_index" and not causal:
        raise ValueError("the key_index ALiBi form is only correct under a causal mask (it relies on masking j > i)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"ALiBi chunk_size must be >= 1 query row, got {chunk_size}")
    impl = select_impl(impl, q.size(1), q.size(2), k.size(2), chunk_size)
    extra = {"bias": sdpa_bias} if impl == "sdpa" else {"chunk_size": chunk_size} if impl == "chunked" else {}
    return _KERNELS[impl](q, k, v, slopes, q_offset=q_offset, key_padding_mask=key_padding_mask, causal=causal,
                          form=form, dropout_p=dropout_p, **extra)


__all__ = ["alibi_attention", "alibi_attention_naive", "alibi_attention_sdpa", "alibi_attention_chunked",
           "alibi_sdpa_bias", "alibi_bias", "alibi_slopes", "causal_mask", "chunk_rows", "select_impl",
           "resolve_impl", "IMPLS", "BIAS_FORMS", "BIAS_BUDGET"]
