"""Token-by-token fast-weight recurrences (Schlag, Irie, Schmidhuber 2021, arXiv 2102.11174, Eq. 6-7 sum rule,
Eq. 15-17 delta rule; spec fast_weights.md §1.4): the specification the chunked forms are tested against, and the
decoding path (one token = one step).

State orientation (as FLA): S is (D_k, D_v) per head, the transpose of lmtool's value-rows W.

    sum rule:    S_t = S_{t-1} + k_t v_t^T                                   o_t = scale · S_t^T q_t
    delta rule:  vbar_t = S_{t-1}^T k_t ;  S_t = S_{t-1} + k_t (beta_t (v_t - vbar_t))^T ;  o_t = scale · S_t^T q_t

q, k are the (already feature-mapped, and for the delta rule sum-normalised) queries and keys. Everything is
computed in fp32 at least; the output is cast back to the input dtype, the state stays fp32 (or fp64). Under autocast
the public op (``fast_weight_attention``) runs them with autocast off (``autocast_off``).
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Tuple

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


def autocast_off(device: torch.device) -> ContextManager[None]:
    """Autocast (``--amp``, ``torch.autocast``) disabled on ``device`` if it is on: inside, matmuls of fp32 tensors
    run in fp32, so the state and key sums accumulate in fp32 under autocast exactly as under a half model."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def initial_state(q: Tensor, v: Tensor, state: Optional[Tensor]) -> Tensor:
    """The (B, H, D_k, D_v) start state in the accumulation dtype (zeros when None)."""
    b, h, _, dk = q.shape
    acc = acc_dtype(q.dtype)
    if state is None:
        return q.new_zeros(b, h, dk, v.size(-1), dtype=acc)
    if state.shape != (b, h, dk, v.size(-1)):
        raise ValueError(f"fast-weight state must be (B, H, D_k, D_v) = {(b, h, dk, v.size(-1))}, got "
                         f"{tuple(state.shape)}")
    return state.to(acc)


def sum_rule_recurrent(q: Tensor, k: Tensor, v: Tensor, state: Optional[Tensor] = None,
                       scale: float = 1.0) -> Tuple[Tensor, Tensor]:
    """q, k: (B, H, T, D_k); v: (B, H, T, D_v); state: (B, H, D_k, D_v) or None.
    Returns (o (B, H, T, D_v) in q's dtype, final state (B, H, D_k, D_v) fp32+)."""
    acc = acc_dtype(q.dtype)
    s = initial_state(q, v, state)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    outs = []
    for qt, kt, vt in zip(qa.unbind(2), ka.unbind(2), va.unbind(2)):  # (B, H, D) per token; unbind: one backward
        s = s + kt[..., :, None] * vt[..., None, :]  # (B, H, D_k, D_v)
        outs.append(torch.einsum("bhkv,bhk->bhv", s, qt))  # (B, H, D_v)
    out = torch.stack(outs, dim=2) if outs else va.new_zeros(va.shape)  # (B, H, T, D_v)
    return (out * scale).to(q.dtype), s


def delta_rule_recurrent(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, state: Optional[Tensor] = None,
                         scale: float = 1.0) -> Tuple[Tensor, Tensor]:
    """q, k: (B, H, T, D_k); v: (B, H, T, D_v); beta: (B, H, T) write strengths; state: (B, H, D_k, D_v) or None.
    Returns (o (B, H, T, D_v) in q's dtype, final state fp32+)."""
    acc = acc_dtype(q.dtype)
    s = initial_state(q, v, state)
    qa, ka, va, ba = q.to(acc), k.to(acc), v.to(acc), beta.to(acc)
    outs = []
    for qt, kt, vt, bt in zip(qa.unbind(2), ka.unbind(2), va.unbind(2), ba.unbind(2)):  # (B, H, D) / (B, H)
        retrieved = torch.einsum("bhkv,bhk->bhv", s, kt)  # (B, H, D_v) vbar_t = S^T k_t
        update = bt[..., None] * (vt - retrieved)  # (B, H, D_v)
        s = s + kt[..., :, None] * update[..., None, :]  # (B, H, D_k, D_v)
        outs.append(torch.einsum("bhkv,bhk->bhv", s, qt))  # (B, H, D_v)
    out = torch.stack(outs, dim=2) if outs else va.new_zeros(va.shape)  # (B, H, T, D_v)
    return (out * scale).to(q.dtype), s
