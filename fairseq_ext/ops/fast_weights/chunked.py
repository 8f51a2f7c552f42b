"""Chunkwise-parallel fast-weight forms (sum rule: causal linear attention in chunks; delta rule: the WY/UT
representation of DeltaNet, Yang et al. 2024, arXiv 2406.06484 App. B; spec fast_weights.md §5.1), pure torch, any
chunk size C, fp32/fp64, differentiable in q, k, v, beta and the initial state.

Per chunk of C tokens with start state S_0 (D_k, D_v) and the chunk's Q, K (C, D_k), V (C, D_v), beta (C,):

    sum:    O = Q S_0 + (Q K^T ⊙ M) V                      S_C = S_0 + K^T V
    delta:  (I + tril(diag(beta) K K^T, -1)) U' = diag(beta) (V - K S_0)        (unit lower-triangular solve)
            O = Q S_0 + (Q K^T ⊙ M) U'                     S_C = S_0 + K^T U'

with M the causal mask including the diagonal. U' holds the values actually written, u'_t = beta_t (v_t - S_{t-1}^T
k_t), so this is the token recurrence (recurrent.py) regrouped: a triangular solve and matmuls per chunk, T / C
sequential steps instead of T.

The delta rule is only stable with normalised keys (beta ||k||^2 <= 2 keeps I - beta k k^T non-expansive; the
model sum-normalises phi(k)). ``check_keys`` refuses keys outside that bound: the triangular solve then amplifies
errors (FLA issues #537, #736) and the recurrence itself diverges.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .recurrent import acc_dtype, initial_state

DEFAULT_CHUNK = 64


def check_keys(k: Tensor, beta: Tensor) -> None:
    """Raise unless beta_t ||k_t||^2 <= 2 everywhere (the delta transition I - beta k k^T is then non-expansive)."""
    gain = (beta.detach().to(acc_dtype(k.dtype)) * k.detach().to(acc_dtype(k.dtype)).pow(2).sum(-1))  # (B, H, T)
    worst = float(gain.max()) if gain.numel() else 0.0
    if not worst <= 2.0 + 1e-6:  # also catches NaN
        raise ValueError(f"delta rule with unnormalised keys: max beta·||k||² = {worst:.4g} > 2 makes the fast-weight "
                         f"recurrence expansive (it diverges); sum-normalise the keys (the model's default for the "
                         f"delta rule) or, to study the divergence, use impl='recurrent'")


def _check_chunk(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk_size}")


def sum_rule_chunked(q: Tensor, k: Tensor, v: Tensor, state: Optional[Tensor] = None, scale: float = 1.0,
                     chunk_size: int = DEFAULT_CHUNK) -> Tuple[Tensor, Tensor]:
    """Same contract as ``sum_rule_recurrent``: (o (B, H, T, D_v) in q's dtype, final state fp32+)."""
    _check_chunk(chunk_size)
    acc = acc_dtype(q.dtype)
    s = initial_state(q, v, state)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    outs = []
    # split, not slicing in a loop: one backward for all chunks instead of a full-size zero gradient per slice
    for qc, kc, vc in zip(qa.split(chunk_size, 2), ka.split(chunk_size, 2), va.split(chunk_size, 2)):  # (B, H, C, D)
        scores = torch.matmul(qc, kc.transpose(-1, -2)).tril()  # (B, H, C, C) causal incl. the diagonal
        outs.append(torch.matmul(qc, s) + torch.matmul(scores, vc))  # (B, H, C, D_v)
        s = s + torch.matmul(kc.transpose(-1, -2), vc)  # (B, H, D_k, D_v)
    out = torch.cat(outs, dim=2) if outs else va.new_zeros(va.shape)  # (B, H, T, D_v)
    return (out * scale).to(q.dtype), s


def delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, state: Optional[Tensor] = None,
                       scale: float = 1.0, chunk_size: int = DEFAULT_CHUNK,
                       check: bool = True) -> Tuple[Tensor, Tensor]:
    """Same contract as ``delta_rule_recurrent``; ``check`` refuses unnormalised keys (``check_keys``)."""
    _check_chunk(chunk_size)
    if check:
        check_keys(k, beta)
    acc = acc_dtype(q.dtype)
    s = initial_state(q, v, state)
    qa, ka, va, ba = q.to(acc), k.to(acc), v.to(acc), beta.to(acc)
    outs = []
    chunks = zip(qa.split(chunk_size, 2), ka.split(chunk_size, 2), va.split(chunk_size, 2), ba.split(chunk_size, 2))
    for qc, kc, vc, bc in chunks:  # (B, H, C, D) x 3, (B, H, C)
        bc = bc[..., None]  # (B, H, C, 1)
        c = kc.size(2)
        gram = torch.matmul(kc, kc.transpose(-1, -2))  # (B, H, C, C) k_r . k_i
        system = torch.eye(c, dtype=acc, device=q.device) + (bc * gram).tril(-1)  # (B, H, C, C) unit lower
        rhs = bc * (vc - torch.matmul(kc, s))  # (B, H, C, D_v) beta (V - K S_0)
        written = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)  # (B, H, C, D_v) U'
        scores = torch.matmul(qc, kc.transpose(-1, -2)).tril()  # (B, H, C, C)
        outs.append(torch.matmul(qc, s) + torch.matmul(scores, written))  # (B, H, C, D_v)
        s = s + torch.matmul(kc.transpose(-1, -2), written)  # (B, H, D_k, D_v)
    out = torch.cat(outs, dim=2) if outs else va.new_zeros(va.shape)  # (B, H, T, D_v)
    return (out * scale).to(q.dtype), s
