"""Real text without a training split (shared/data/README.md, "Using these files for real-text runs"): train on
WikiText-103's test articles (``wiki.test.tokens``, 245,569 tokens) and evaluate on its valid articles
(``wiki.valid.tokens``, 217,646 tokens). Relative comparisons only, never paper numbers; say so next to every number.

Writes ``OUTDIR/word/{train,valid}.txt`` (the files unchanged: fairseq-preprocess appends ``</s>`` per line) and
``OUTDIR/byte/{train,valid}.txt`` (the same files as bytes, one token per byte in the enwik8 format of
``preprocess.enwik8.tokenize``: every newline byte becomes one ``</s>``).

CLI: ``python -m preprocess.wikitext103.heldout --src DIR --outdir data/wt103-heldout``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import List, Optional

from preprocess.enwik8.tokenize import write_encoded

ROLES = {"train": "wiki.test.tokens", "valid": "wiki.valid.tokens"}


def write_heldout(src: str, outdir: str) -> None:
    for level in ("word", "byte"):
        os.makedirs(os.path.join(outdir, level), exist_ok=True)
    for split, name in ROLES.items():
        path = os.path.join(src, name)
        shutil.copyfile(path, os.path.join(outdir, "word", f"{split}.txt"))
        with open(path, "rb") as f:
            data = f.read()
        with open(os.path.join(outdir, "byte", f"{split}.txt"), "wb") as out:
            write_encoded(data, out, newline="eos")
        print(f"{split}: {name}, {len(data):,} bytes")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="folder with wiki.valid.tokens and wiki.test.tokens")
    parser.add_argument("--outdir", required=True)
    args = parser.parse_args(argv)
    missing = [name for name in ROLES.values() if not os.path.isfile(os.path.join(args.src, name))]
    if missing:
        print(f"error: {args.src} lacks {', '.join(missing)} (WikiText-103's valid and test token files)",
              file=sys.stderr)
        return 1
    write_heldout(args.src, args.outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
