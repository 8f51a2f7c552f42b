"""The held-out split shared by enwik8 and text8: train = all but the last 2·N items, valid = the next N,
test = the last N (``prep_enwik8.py`` / ``prep_text8.py`` with N = 5,000,000)."""
from __future__ import annotations

import os
from typing import BinaryIO, Callable, Dict, Sequence, Tuple, TypeVar

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


SPLITS = ("train", "valid", "test")


def write_heldout_splits(data: bytes, outdir: str, heldout: int, encode: Callable[[bytes, BinaryIO], None],
                         count: Callable[[bytes], int], raw: bool, describe: str) -> Dict[str, int]:
    """Split ``data`` with ``split_heldout`` and write ``<outdir>/<split>.txt`` (tokenised by ``encode``, written
    atomically) plus, like the original scripts, the untokenised ``<split>.txt.raw``. Returns ``count`` per split;
    ``describe`` names the unit and convention in the progress line (e.g. "bytes", "(newline=eos)")."""
    os.makedirs(outdir, exist_ok=True)
    counts: Dict[str, int] = {}
    for name, part in zip(SPLITS, split_heldout(data, heldout)):
        path = os.path.join(outdir, f"{name}.txt")
        with open(path + ".part", "wb") as out:
            encode(part, out)
        os.replace(path + ".part", path)
        if raw:
            with open(path + ".raw", "wb") as out:
                out.write(part)
        counts[name] = count(part)
        print(f"{name}.txt: {len(part):,} {describe.format(tokens=f'{counts[name]:,}')}")
    return counts
