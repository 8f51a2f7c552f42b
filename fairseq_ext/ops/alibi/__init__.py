"""ALiBi attention op: ``alibi_attention(q, k, v, slopes, impl=...)`` dispatching to naive / sdpa / flex.

``impl="auto"`` picks ``sdpa`` (fused kernels on CPU and GPU, handles dropout and padding) and logs the choice
once; ``naive`` is the explicit reference; ``flex`` is FlexAttention with a score_mod (opt-in). An explicitly
requested implementation that cannot run is an error, never a silent fallback.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

from torch import Tensor

from ..dispatch import ImplResolver
from .bias import BIAS_FORMS, alibi_bias, alibi_slopes, causal_mask
from .naive import alibi_attention_naive
from .sdpa import alibi_attention_sdpa, alibi_sdpa_bias

IMPLS = ("auto", "naive", "sdpa", "flex")


def _flex(*args, **kwargs) -> Tensor:
    from .flex import alibi_attention_flex  # imported lazily: keeps CPU-only installs importing cleanly

    return alibi_attention_flex(*args, **kwargs)


_KERNELS: Dict[str, Callable[..., Tensor]] = {
    "naive": alibi_attention_naive,
    "sdpa": alibi_attention_sdpa,
    "flex": _flex,
}

resolve_impl = ImplResolver("ALiBi attention", IMPLS, "sdpa", "scaled_dot_product_attention, (1,H,T,S) bias")


def alibi_attention(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, *, q_offset: int = 0,
                    key_padding_mask: Optional[Tensor] = None, causal: bool = True, form: str = "relative",
                    dropout_p: float = 0.0, impl: str = "auto", sdpa_bias: Optional[Tensor] = None) -> Tensor:
    """Softmax attention with ALiBi biases. q: (B, H, T, D); k, v: (B, H, S, D); returns (B, H, T, D).

    ``sdpa_bias``: a precomputed ``alibi_sdpa_bias`` for the same arguments, shared across layers by a decoder;
    only the sdpa kernel uses it (naive builds its own reference bias, flex needs none).
    """
    if form not in BIAS_FORMS:
        raise ValueError(f"unknown ALiBi bias form {form!r}; choose one of {BIAS_FORMS}")
    if form == "key_index" and not causal:
        raise ValueError("the key_index ALiBi form is only correct under a causal mask (it relies on masking j > i)")
    impl = resolve_impl(impl)
    extra = {"bias": sdpa_bias} if impl == "sdpa" else {}
    return _KERNELS[impl](q, k, v, slopes, q_offset=q_offset, key_padding_mask=key_padding_mask, causal=causal,
                          form=form, dropout_p=dropout_p, **extra)


__all__ = ["alibi_attention", "alibi_attention_naive", "alibi_attention_sdpa", "alibi_sdpa_bias", "alibi_bias",
           "alibi_slopes",
           "causal_mask", "resolve_impl", "IMPLS", "BIAS_FORMS"]
