"""Byte-level tokenisation in the ``prep_enwik8.py`` format (Smerity/sha-rnn, salesforce/awd-lstm-lm).

Each byte is written as its decimal value and tokens are separated by one space; a newline byte (10)
is written as a literal newline instead of ``10``, i.e. the output equals
``' '.join(str(c) if c != 10 else '\\n' for c in data)``. fairseq then reads one line per original
line and appends ``</s>`` to each, so every newline byte becomes exactly one ``</s>`` (``<eos>``), plus
one extra ``</s>`` when the data does not end with a newline (convention "eos": SHA-RNN, adaptive span;
vocabulary 205 on enwik8 with ``</s>``).

Convention "drop" (Transformer-XL, ``add_eos=False``): newline bytes are removed and the remaining
bytes are written on one single line; fairseq still appends its one ``</s>`` at the end of that line
(vocabulary 204 bytes + ``</s>``).
"""
from __future__ import annotations

from typing import BinaryIO, List

NEWLINE = 10
CONVENTIONS = ("eos", "drop")
_CHUNK = 1 << 22

# One shared bytes object per byte value; newline maps to a literal line break (prep_enwik8.py).
_TOKEN: List[bytes] = [str(c).encode("ascii") for c in range(256)]
_TOKEN[NEWLINE] = b"\n"


def encode_bytes(data: bytes, newline: str = "eos") -> bytes:
    """Tokenise ``data`` in memory (see the module docstring for the two newline conventions)."""
    if newline not in CONVENTIONS:
        raise ValueError(f"newline must be one of {CONVENTIONS}, got {newline!r}")
    if newline == "drop":
        data = data.replace(b"\n", b"")
    return b" ".join([_TOKEN[c] for c in data])


def write_encoded(data: bytes, out: BinaryIO, newline: str = "eos", chunk: int = _CHUNK) -> None:
    """Stream ``encode_bytes(data, newline)`` to ``out`` chunk by chunk (same bytes, bounded memory)."""
    if newline not in CONVENTIONS:
        raise ValueError(f"newline must be one of {CONVENTIONS}, got {newline!r}")
    first = True
    for start in range(0, len(data), chunk):
        piece = data[start: start + chunk]
        if newline == "drop":
            piece = piece.replace(b"\n", b"")
        if not piece:
            continue
        if not first:
            out.write(b" ")
        out.write(encode_bytes(piece, "eos"))
        first = False


def fairseq_token_count(data: bytes, newline: str = "eos") -> int:
    """Number of tokens fairseq-preprocess counts for the encoded ``data`` (bytes plus ``</s>`` tokens)."""
    if newline not in CONVENTIONS:
        raise ValueError(f"newline must be one of {CONVENTIONS}, got {newline!r}")
    if newline == "drop":
        kept = len(data) - data.count(b"\n")
        return kept + 1 if kept else 0
    return len(data) + (0 if not data or data.endswith(b"\n") else 1)
