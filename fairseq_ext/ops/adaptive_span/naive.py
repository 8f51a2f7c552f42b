"""Reference adaptive-span attention (Sukhbaatar et al. 2019, arXiv 1905.07799, Sec. 2.2; with persistent memory,
All-attention, Sukhbaatar et al. 2019b, arXiv 1907.01470, Sec. 4; spec adaptive_span.md §1.3, §1.4, §1.6),
written per (query, distance):

Keys/values are ``[cache of L ; segment of M]``; query i (0 <= i < M) sits at index L + i and attends to exactly
the L previous positions, key indices i .. i + L - 1, i.e. distances delta = L .. 1 (never itself). Window column j
holds distance delta = L - j. With p_delta = key_pe[:, L - delta] (the last column of key_pe is distance 1):

    s_{i,j}   = (q_i . k_{i+j} + q_i . p_{L-j}) / sqrt(D)                     context logits, j < L
    s^p_{i,n} = (q_i . (sqrt(D) k^p_n)) / sqrt(D)                            persistent logits, n < N
    a         = softmax over the joint row [s_i ; s^p_i]                      (L + N entries)
    a_ctx    *= m(delta)              (span mask on the context part only; persistent factor 1)
    a         = a / (sum(a) + eps)    (joint renormalisation, eps = 1e-8, only when a span mask is given)
    a         = dropout(a)
    o_i       = sum_j a_{i,j} v_{i+j} + sum_n a^p_{i,n} (sqrt(N) v^p_n)

The L-key window of every query is gathered explicitly (a (B, H, M, L, D) copy); O(M L D) memory. It is the
specification the fast form (skew.py) is tested against.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..dropout import dropout


def adaptive_span_attention_naive(q: Tensor, k: Tensor, v: Tensor, key_pe: Tensor,
                                  span_mask: Optional[Tensor] = None, pers_k: Optional[Tensor] = None,
                                  pers_v: Optional[Tensor] = None, *, dropout_p: float = 0.0, renorm: bool = True,
                                  eps: float = 1e-8) -> Tensor:
    """q: (B, H, M, D); k, v: (B, H, L + M, D); key_pe: (D, L) or (H, D, L); span_mask: (H, L) (column j =
    distance L - j) or None; pers_k: (H, D, N), pers_v: (H, N, D) as stored (scaled by sqrt(D), sqrt(N) here).
    Returns (B, H, M, D)."""
    _, _, m, d = q.shape
    span = key_pe.size(-1)  # L
    acc = torch.promote_types(q.dtype, torch.float32)
    dev = q.device
    i = torch.arange(m, device=dev)[:, None]  # (M, 1)
    j = torch.arange(span, device=dev)[None, :]  # (1, L)
    key_index = i + j  # (M, L) index into [cache ; segment]
    distance = (span + i) - key_index  # (M, L) = L - j: query index minus key index, in 1..L
    k_win = k.to(acc)[:, :, key_index]  # (B, H, M, L, D)
    v_win = v.to(acc)[:, :, key_index]  # (B, H, M, L, D)
    pe = key_pe.to(acc)[..., span - distance]  # (D, M, L) or (H, D, M, L): p_delta per (i, j)
    pe = pe.movedim(-3, -1)  # (M, L, D) or (H, M, L, D)
    qa = q.to(acc)  # (B, H, M, D)
    content = torch.einsum("bhmd,bhmld->bhml", qa, k_win)  # (B, H, M, L)
    if pe.dim() == 3:
        position = torch.einsum("bhmd,mld->bhml", qa, pe)  # (B, H, M, L)
    else:
        position = torch.einsum("bhmd,hmld->bhml", qa, pe)  # (B, H, M, L)
    logits = content + position  # (B, H, M, L)
    if pers_k is not None:
        n = pers_k.size(-1)
        pers_logits = torch.einsum("bhmd,hdn->bhmn", qa, pers_k.to(acc) * math.sqrt(d))  # (B, H, M, N)
        logits = torch.cat([logits, pers_logits], dim=-1)  # (B, H, M, L + N)
    probs = torch.softmax(logits / math.sqrt(d), dim=-1)  # (B, H, M, L [+ N])
    if span_mask is not None:
        mask = span_mask.to(acc)[..., span - distance]  # (H, M, L): m(delta) per (i, j)
        if pers_k is not None:
            mask = torch.cat([mask, mask.new_ones(*mask.shape[:-1], n)], dim=-1)  # (H, M, L + N)
        probs = probs * mask  # (B, H, M, L [+ N])
        if renorm:
            probs = probs / (probs.sum(-1, keepdim=True) + eps)
    probs = dropout(probs, p=dropout_p, training=dropout_p > 0)
    out = torch.einsum("bhml,bhmld->bhmd", probs[..., :span], v_win)  # (B, H, M, D)
    if pers_v is not None:
        pv = pers_v.to(acc) * math.sqrt(pers_v.size(-2))  # (H, N, D) effective values
        out = out + torch.einsum("bhmn,hnd->bhmd", probs[..., span:], pv)  # (B, H, M, D)
    return out.to(q.dtype)
