"""Fast-weight attention op (Schlag, Irie, Schmidhuber 2021, arXiv 2102.11174; spec fast_weights.md §1.4, §1.5):
``fast_weight_attention(q, k, v, beta, state, rule=..., normalize=..., scale=..., impl=...)``.

q, k are feature-mapped queries/keys (phi(q), phi(k); for the delta rule sum-normalised by the caller), v values,
beta (delta rule) write strengths in (0, 1). Rules and normalisations (z_t = z_0 + sum_{s<=t} k_s, the running key
sum carried in the state):

* ``sum``,   ``none``:   o_t = scale · S_t^T q_t                                  (S_t = S_{t-1} + k_t v_t^T)
* ``sum``,   ``output``: o_t = scale · S_t^T q_t / (z_t · q_t + eps)             (linear transformer / Performer)
* ``delta``, ``none``:   o_t = scale · S_t^T q_t      (S_t = S_{t-1} + k_t (beta_t (v_t - S_{t-1}^T k_t))^T)
* ``delta``, ``output``: the delta output divided by (z_t · q_t + eps)           (lmtool 24/25/26 without the flag)
* ``delta``, ``full``:   also the retrieval: k'_t = k_t / (kd_t + eps), beta'_t = beta_t kd_t with
  kd_t = z_{t-1} · k_t (kd = 1 for the first token of a fresh stream), output as ``output``   (lmtool 44/45/46)

The state (``FastWeightState``: S (B, H, D_k, D_v), z (B, H, D_k) for the normalised variants) is accumulated in fp32
at least whatever the input dtype, also inside an autocast region (the op turns autocast off); pass
``state.detach()`` for truncated BPTT or the state itself to let gradients reach it. ``impl``: ``recurrent`` (token
loop, the reference), ``chunked`` (chunkwise-parallel, chunk_size C), ``fla`` (the delta rule on CUDA by
flash-linear-attention's Triton kernel when fla-core imports, bfloat16 inputs, float32 state: ``fla.py``), ``auto``
(``chunked``, logged once; a single token always takes the recurrence, which is the same maths).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fairseq_ext.state import FastWeightState

from ..dispatch import ImplResolver
from ..eager import eager_under_compile
from .chunked import DEFAULT_CHUNK, check_keys, delta_rule_chunked, sum_rule_chunked
from .fla import check_fla_inputs, delta_rule_fla
from .recurrent import acc_dtype, autocast_off, delta_rule_recurrent, sum_rule_recurrent

RULES = ("sum", "delta")
NORMALIZATIONS = ("none", "output", "full")
IMPLS = ("auto", "recurrent", "chunked", "fla")
EPS = 1e-5  # the original's denominator epsilon

resolve_impl = ImplResolver("fast-weight attention", IMPLS, "chunked", "chunkwise-parallel form, any chunk size")


def validate_rule(rule: str, normalize: str) -> None:
    """Clear errors for an unknown update rule or normalisation and for the sum rule with ``full``."""
    if rule not in RULES:
        raise ValueError(f"unknown fast-weight update rule {rule!r}; choose one of {RULES}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown fast-weight normalisation {normalize!r}; choose one of {NORMALIZATIONS}")
    if rule == "sum" and normalize == "full":
        raise ValueError("normalisation 'full' normalises the delta rule's retrieval key; the sum rule has none "
                         "(use 'output' or 'none')")


def _validate(q: Tensor, k: Tensor, v: Tensor, beta: Optional[Tensor], rule: str, normalize: str) -> None:
    validate_rule(rule, normalize)
    if q.dim() != 4 or k.shape != q.shape[:3] + k.shape[3:] or k.size(-1) != q.size(-1):
        raise ValueError(f"q and k must be (B, H, T, D_k) alike, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, H, T, D_v) with q's (B, H, T) = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if rule == "delta" and (beta is None or beta.shape != q.shape[:3]):
        raise ValueError(f"the delta rule needs beta of shape (B, H, T) = {tuple(q.shape[:3])}, got "
                         f"{None if beta is None else tuple(beta.shape)}")


# Runs eagerly inside --compile-blocks: torch 2.13's AOT-compiled backward of the chunked delta rule fails ("view size
# is not compatible with input tensor's size and stride"; tests/models/test_compile.py).
@eager_under_compile
def fast_weight_attention(q: Tensor, k: Tensor, v: Tensor, beta: Optional[Tensor] = None,
                          state: Optional[FastWeightState] = None, *, rule: str, normalize: str,
                          scale: float, impl: str = "auto", chunk_size: int = DEFAULT_CHUNK,
                          eps: float = EPS, keys_normalized: bool = False) -> Tuple[Tensor, FastWeightState]:
    """q, k: (B, H, T, D_k); v: (B, H, T, D_v); beta: (B, H, T) (delta rule) or None; state: the previous segment's
    ``FastWeightState`` or None (a fresh stream: zero fast weights, zero key sum); keys_normalized: the caller
    guarantees beta ||k||^2 <= 2 (sum-normalised keys, beta in (0, 1)), so the chunked delta rule skips its key check
    (a host read per call). Returns (o (B, H, T, D_v) in q's dtype, the state after the last token). Runs with
    autocast off: the recurrence is fp32 at least whatever the caller's autocast region."""
    _validate(q, k, v, beta, rule, normalize)
    with autocast_off(q.device):
        return _fast_weight_attention(q, k, v, beta, state, rule, normalize, scale, impl, chunk_size, eps,
                                      keys_normalized)


def _fast_weight_attention(q: Tensor, k: Tensor, v: Tensor, beta: Optional[Tensor], state: Optional[FastWeightState],
                           rule: str, normalize: str, scale: float, impl: str, chunk_size: int, eps: float,
                           keys_normalized: bool) -> Tuple[Tensor, FastWeightState]:
    acc = acc_dtype(q.dtype)
    t = q.size(2)
    concrete = "recurrent" if t == 1 and impl == "auto" else resolve_impl(impl)
    if concrete == "fla":
        check_fla_inputs(q, rule)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    weight = state.weight if state is not None else None
    key_sum = state.key_sum if state is not None else None
    if normalize != "none" and state is not None and key_sum is None:
        raise ValueError(f"normalisation {normalize!r} needs the running key sum, but the carried state has none "
                         f"(it was produced with normalisation 'none')")
    if normalize != "none" and key_sum is not None and key_sum.shape != (q.size(0), q.size(1), k.size(-1)):
        # checked here: a wrong batch would broadcast silently against the (B, H, T, D_k) cumsum
        raise ValueError(f"the carried key sum must be (B, H, D_k) = {(q.size(0), q.size(1), k.size(-1))}, got "
                         f"{tuple(key_sum.shape)} (slice the state to the batch, e.g. state.rows(0, B))")
    z0 = key_sum.to(acc)[:, :, None] if key_sum is not None else qa.new_zeros(())  # (B, H, 1, D_k) or scalar
    z = z0 + torch.cumsum(ka, dim=2) if normalize != "none" else None  # (B, H, T, D_k) z_t, inclusive
    if rule == "sum":
        kernel = sum_rule_recurrent if concrete == "recurrent" else sum_rule_chunked
        extra = {} if concrete == "recurrent" else {"chunk_size": chunk_size}
        out, weight = kernel(qa, ka, va, weight, scale, **extra)
    else:
        ba = beta.to(acc)
        check = not keys_normalized  # a host read of max beta||k||^2 per call, skipped when the caller guarantees it
        if normalize == "full":
            kd = ((z - ka) * ka).sum(-1)  # (B, H, T) z_{t-1} . k_t
            if state is None and t > 0:  # a fresh stream's first retrieval is not normalised (kd_1 = 1)
                kd = torch.cat([torch.ones_like(kd[:, :, :1]), kd[:, :, 1:]], dim=2)
            ka, ba = ka / (kd[..., None] + eps), ba * kd  # k'_t, beta'_t
            check = False  # the original's transform; its keys are not bounded (the recurrence is the model)
        if concrete == "recurrent":
            out, weight = delta_rule_recurrent(qa, ka, va, ba, weight, scale)
        elif concrete == "fla":
            out, weight = delta_rule_fla(qa, ka, va, ba, weight, scale)
        else:
            out, weight = delta_rule_chunked(qa, ka, va, ba, weight, scale, chunk_size, check=check)
    new_sum = None
    if z is not None:
        out = out / ((z * qa).sum(-1, keepdim=True) + eps)  # (B, H, T, D_v) / (z_t . q_t + eps)
        new_sum = z[:, :, -1] if t > 0 else (key_sum.to(acc) if key_sum is not None else
                                              qa.new_zeros(q.shape[0], q.shape[1], q.shape[3]))
    return out.to(q.dtype), FastWeightState(weight, new_sum)


__all__ = ["fast_weight_attention", "validate_rule", "sum_rule_recurrent", "delta_rule_recurrent", "sum_rule_chunked",
           "delta_rule_chunked", "check_keys", "autocast_off", "RULES", "NORMALIZATIONS", "IMPLS", "EPS",
           "DEFAULT_CHUNK", "resolve_impl"]
