"""The held-out split shared by enwik8 and text8: train = all but the last 2·N items, valid = the next N,
test = the last N (``prep_enwik8.py`` / ``prep_text8.py`` with N = 5,000,000)."""
from __future__ import annotations

from typing import Sequence, Tuple, TypeVar

S = TypeVar("S", bound=Sequence)

HELDOUT = 5_000_000


def split_heldout(data: S, heldout: int = HELDOUT) -> Tuple[S, S, S]:
    """Return ``(train, valid, test)`` = ``data[:-2N]``, ``data[-2N:-N]``, ``data[-N:]`` for N = ``heldout``.

    Works on ``bytes`` (enwik8) and ``str`` (text8) alike. Raises ``ValueError`` unless the data is longer
    than ``2 * heldout`` (the original scripts would silently produce an empty or wrapped train split).
    """
    if heldout <= 0:
        raise ValueError(f"heldout must be positive, got {heldout}")
    if len(data) <= 2 * heldout:
        raise ValueError(f"input has {len(data):,} items, need more than 2 * heldout = {2 * heldout:,}")
    return data[: -2 * heldout], data[-2 * heldout: -heldout], data[-heldout:]  # type: ignore[return-value]
