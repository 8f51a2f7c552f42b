"""SHA-RNN's single-headed attention over [memory ; segment] (Merity 2019, arXiv 1911.11423, §3.2; spec sha_rnn.md
§1.3), given the query-side vectors:

    out_i = Σ_j dropout(softmax_j((q_i · (g_k ⊙ m_j)) · scale + mask_ij)) · dropout(g_v ⊙ m_j)

q (B, T, d): the gated queries (their dropout already applied); g_k = σ(ks) and g_v (d,): the key and value gates;
m = [memory ; segment]: memory (B, M, d) is visible to every query (None: no memory), segment (B, T, d) causally
(key j <= query i). The values' dropout draws the memory's mask, then the segment's; then the probabilities'.

``naive`` writes the formula out over the concatenation (the reference; ``auto`` on CPU without a gradient, so
evaluated log-probabilities stay bit for bit those of the converted checkpoints); ``split`` (``auto`` in CPU
training) moves both gates to the (B, T, d) side and splits the products at the memory / segment boundary, so a
memory that carries no gradient (detached between training segments) gets no key or value gradient products;
``sdpa`` (``auto`` on CUDA) hands the gated keys and dropped-out values to ``scaled_dot_product_attention`` (fused
kernels keep no (B, T, S) scores).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from ..dispatch import ImplResolver
from .naive import sha_attention_naive
from .sdpa import sha_attention_sdpa
from .split import sha_attention_split, split_unsupported

IMPLS = ("auto", "naive", "sdpa", "split")
_KERNELS: Dict[str, Callable[..., Tensor]] = {"naive": sha_attention_naive, "sdpa": sha_attention_sdpa,
                                              "split": sha_attention_split}
_resolve_cpu_grad = ImplResolver("SHA-RNN attention on CPU, with a gradient", IMPLS, "split",
                                 "gates on the query side, no key / value gradient products for a detached memory")
_resolve_cpu = ImplResolver("SHA-RNN attention on CPU, no gradient", IMPLS, "naive",
                            "the written-out formula: the converted checkpoints' log-probabilities bit for bit")
_resolve_cuda = ImplResolver("SHA-RNN attention on CUDA", IMPLS, "sdpa", "fused kernels, no (B, T, S) scores kept")


def select_impl(impl: str, device: torch.device, grad: bool = False) -> str:
    """The kernel ``impl`` runs on ``device``: an explicit name as given (validated); ``auto`` -> sdpa on CUDA, on
    CPU split while a gradient is computed in float32 / float64 outside autocast and ``torch.compile`` (``grad``)
    and naive otherwise (logged once each)."""
    if device.type == "cuda":
        return _resolve_cuda(impl)
    return _resolve_cpu_grad(impl) if grad else _resolve_cpu(impl)


def sha_attention(q: Tensor, k_gate: Tensor, v_gate: Tensor, memory: Optional[Tensor], segment: Tensor, *,
                  scale: Optional[float] = None, dropout_p: float = 0.0, impl: str = "auto") -> Tensor:
    """q (B, T, d), k_gate / v_gate (d,), memory (B, M, d) or None, segment (B, T, d) -> (B, T, d). ``scale``
    None: 1/sqrt(d), which ``naive`` applies as the original, dividing the scores by sqrt(d). ``dropout_p`` applies
    whenever it is > 0 (callers pass 0 in evaluation)."""
    if q.dim() != 3 or segment.shape != q.shape or (memory is not None and (
            memory.dim() != 3 or memory.shape[0] != q.shape[0] or memory.shape[2] != q.shape[2])):
        raise ValueError(f"SHA-RNN attention: q and segment must be (B, T, d) and memory (B, M, d), got q "
                         f"{tuple(q.shape)}, segment {tuple(segment.shape)}, memory "
                         f"{None if memory is None else tuple(memory.shape)}")
    if memory is not None and memory.size(1) == 0:
        memory = None
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, memory, segment)) \
        and split_unsupported(q) is None
    return _KERNELS[select_impl(impl, q.device, grad)](q, k_gate, v_gate, memory, segment, scale, dropout_p)


__all__ = ["IMPLS", "select_impl", "sha_attention", "sha_attention_naive", "sha_attention_sdpa",
           "sha_attention_split"]
