"""Visibility mask of Transformer-XL attention (Dai et al. 2019, Sec. 3.3; spec transformer_xl.md §1.4, §1.6).

Keys are ``[memory (M) ; segment (T)]``, so query i sits at key index i + M. It sees key j iff

    j <= i + M                         (causal; hides the junk the relative shift leaves above the diagonal)
    j >  i + M - W   when W is given   (``same_length``: a window of the last W keys, the query included)

``same_length`` in the original code (``mask_len = klen - mem_len``) is W = mem_len; NVIDIA's
(``mask_len = klen - mem_len - 1``) is W = mem_len + 1. Both original formulas reduce to this window rule
(``tril(ones, -mask_shift_len)`` masks exactly j <= i + M - W whenever that excludes anything).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

SAME_LENGTH_CONVENTIONS = ("original", "nvidia")


def same_length_window(mem_len: int, convention: str) -> int:
    """Keys each query sees under ``same_length``: mem_len (original) or mem_len + 1 (NVIDIA)."""
    if convention not in SAME_LENGTH_CONVENTIONS:
        raise ValueError(f"unknown same_length convention {convention!r}; choose one of {SAME_LENGTH_CONVENTIONS}")
    if mem_len < 1:
        raise ValueError(f"same_length needs mem_len >= 1 (every query sees the last mem_len keys); got mem_len "
                         f"{mem_len}: turn same_length off or give the model a memory (mem_len > 0)")
    return mem_len if convention == "original" else mem_len + 1


def xl_attention_mask(qlen: int, klen: int, window: Optional[int] = None,
                      device: Union[str, torch.device, None] = None) -> Tensor:
    """(T, S) bool, True where the key is hidden from the query; T = qlen queries are the last T of S keys."""
    if klen < qlen:
        raise ValueError(f"keys ({klen}) must include the {qlen} queries")
    mem = klen - qlen
    i = torch.arange(qlen, device=device)[:, None]  # (T, 1)
    j = torch.arange(klen, device=device)[None, :]  # (1, S)
    hidden = j > i + mem  # (T, S)
    if window is not None:
        if window < 1:
            raise ValueError(f"attention window must be >= 1, got {window}")
        hidden = hidden | (j <= i + mem - window)
    return hidden
