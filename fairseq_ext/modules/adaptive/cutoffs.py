"""Vocabulary cutoffs of adaptive input / adaptive softmax (Baevski & Auli 2019; Grave et al. 2017): one parser and
one check, shared by every model that takes ``--adaptive-softmax-cutoff``."""
from __future__ import annotations

from typing import List, Optional

from fairseq_ext.errors import ConfigError


def parse_cutoffs(cutoff: Optional[str]) -> List[int]:
    """``"20000,40000,200000"`` -> [20000, 40000, 200000]; None or "" -> [] (one cluster: a full softmax)."""
    if cutoff is None or str(cutoff).strip() == "":
        return []
    try:
        return [int(c) for c in str(cutoff).split(",")]
    except ValueError:
        raise ConfigError(f"--adaptive-softmax-cutoff must be comma-separated integers, got {cutoff!r}") from None


def check_cutoffs(cutoff: Optional[str], vocab_size: int) -> List[int]:
    """The parsed cutoffs, which must be strictly increasing, positive and below the vocabulary (dictionary) size."""
    cutoffs = parse_cutoffs(cutoff)
    if cutoffs and (cutoffs != sorted(set(cutoffs)) or cutoffs[0] < 1 or cutoffs[-1] >= vocab_size):
        raise ConfigError(
            f"--adaptive-softmax-cutoff {cutoff} must be strictly increasing, positive and below the vocabulary size "
            f"(dictionary size {vocab_size}); set smaller cutoffs (e.g. --adaptive-softmax-cutoff "
            f"{max(1, vocab_size // 4)},{max(2, vocab_size // 2)}) or none for a full softmax")
    return cutoffs
