"""Split text8 90M/5M/5M characters and tokenise one token per character (transformer-xl ``prep_text8.py``).

Each split is ``strip()``-ped, spaces become ``_`` and the characters are joined by single spaces, so
every split is **one single line** with no trailing newline: ``' '.join('_' if c == ' ' else c for c in
part.strip())``. fairseq appends one ``</s>`` to that line, giving ``len(part.strip()) + 1`` tokens per
split and a vocabulary of 27 characters (a-z, ``_``) + ``</s>`` (28 as in adaptive-span). Like the
original, the untokenised ``<split>.txt.raw`` copies are written too.

CLI: ``python -m preprocess.text8.prepare --input text8 --outdir data/text8 [--heldout 5000000] [--no-raw]``.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Dict, List, Optional

from preprocess.split import HELDOUT, write_heldout_splits
_BAD_CHAR = re.compile(rb"[^a-z ]")
# What str.strip() removes from ASCII text (bytes.strip() would keep \x1c-\x1f).
_WHITESPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


def check_charset(data: bytes) -> None:
    """Raise ``ValueError`` unless ``data`` holds only lower-case a-z and spaces (what text8 contains)."""
    bad = _BAD_CHAR.search(data)
    if bad:
        raise ValueError(f"byte {bad.group()!r} at offset {bad.start():,}: text8 holds only a-z and space")


def encode_chars(part: str) -> str:
    """``prep_text8.py`` tokenisation of one split: strip, space -> ``_``, characters joined by spaces."""
    return " ".join("_" if c == " " else c for c in part.strip())


def encode_ascii(part: bytes) -> bytes:
    """Fast ``encode_chars`` for ASCII bytes (same output, no per-character Python objects)."""
    chars = part.strip(_WHITESPACE).replace(b" ", b"_")
    if not chars:
        return b""
    out = bytearray(b" " * (2 * len(chars) - 1))
    out[0::2] = chars
    return bytes(out)


def fairseq_token_count(part: bytes) -> int:
    """Tokens fairseq-preprocess counts for the encoded split: stripped characters plus one ``</s>``."""
    n = len(part.strip(_WHITESPACE))
    return n + 1 if n else 0


def prepare(data: bytes, outdir: str, heldout: int = HELDOUT, raw: bool = True) -> Dict[str, int]:
    """Check, split and write the three tokenised splits of ``data``; return fairseq token counts."""
    check_charset(data)
    return write_heldout_splits(data, outdir, heldout, lambda part, out: out.write(encode_ascii(part)),
                                fairseq_token_count, raw, "characters -> {tokens} tokens (one line)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="the unzipped text8 file")
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--heldout", type=int, default=HELDOUT,
                        help="characters in valid and in test (default %(default)s)")
    parser.add_argument("--no-raw", action="store_true", help="do not write the <split>.txt.raw copies")
    args = parser.parse_args(argv)
    with open(args.input, "rb") as f:
        data = f.read()
    try:
        prepare(data, args.outdir, args.heldout, raw=not args.no_raw)
    except ValueError as e:
        print(f"error: {args.input}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
