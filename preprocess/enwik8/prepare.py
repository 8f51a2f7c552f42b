"""Split enwik8 90M/5M/5M bytes and tokenise each split one token per byte (``prep_enwik8.py``).

Writes ``train.txt``, ``valid.txt``, ``test.txt`` (tokenised, see ``preprocess.enwik8.tokenize``) and,
like the original script, the untokenised ``<split>.txt.raw`` byte copies.

CLI: ``python -m preprocess.enwik8.prepare --input enwik8 --outdir data/enwik8
[--heldout 5000000] [--newline eos|drop] [--no-raw]``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

from preprocess.enwik8.tokenize import CONVENTIONS, fairseq_token_count, write_encoded
from preprocess.split import HELDOUT, write_heldout_splits


def prepare(data: bytes, outdir: str, heldout: int = HELDOUT, newline: str = "eos",
            raw: bool = True) -> Dict[str, int]:
    """Write the three tokenised splits of ``data`` to ``outdir``; return the fairseq token count per split."""
    return write_heldout_splits(data, outdir, heldout, lambda part, out: write_encoded(part, out, newline),
                                lambda part: fairseq_token_count(part, newline), raw,
                                f"bytes -> {{tokens}} tokens (newline={newline})")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="the unzipped enwik8 file")
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--heldout", type=int, default=HELDOUT, help="bytes in valid and in test (default %(default)s)")
    parser.add_argument("--newline", choices=CONVENTIONS, default="eos",
                        help="eos: newline byte -> </s> (SHA-RNN, adaptive span; default); "
                             "drop: newlines removed (Transformer-XL)")
    parser.add_argument("--no-raw", action="store_true", help="do not write the <split>.txt.raw byte copies")
    args = parser.parse_args(argv)
    with open(args.input, "rb") as f:
        data = f.read()
    try:
        prepare(data, args.outdir, args.heldout, args.newline, raw=not args.no_raw)
    except ValueError as e:
        print(f"error: {args.input}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
