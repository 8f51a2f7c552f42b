"""Extract ``wiki.{train,valid,test}.tokens`` from ``wikitext-103-v1.zip`` unchanged.

The files are already tokenised (space-separated words, ``<unk>`` for rare words, one paragraph or
heading per line, blank lines as ``" \\n"``); fairseq-preprocess appends ``</s>`` to every line, the
same counting as the paper (valid 217,646 and test 245,569 tokens; train 103,227,021). Nothing is
changed, following fairseq's ``examples/language_model/prepare-wikitext-103.sh``.

CLI: ``python -m preprocess.wikitext103.prepare --archive wikitext-103-v1.zip --outdir data/wikitext-103``.
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile
from typing import Dict, List, Optional

from preprocess.unzip import MemberMissing, extract_member

SPLITS = ("train", "valid", "test")
MEMBER_DIR = "wikitext-103"


def member_name(split: str) -> str:
    """Path of ``split`` inside the canonical zip, e.g. ``wikitext-103/wiki.train.tokens``."""
    return f"{MEMBER_DIR}/wiki.{split}.tokens"


def extract_splits(archive: str, outdir: str) -> Dict[str, str]:
    """Extract the three token files to ``outdir/wiki.<split>.tokens``; return split -> path."""
    paths: Dict[str, str] = {}
    for split in SPLITS:
        dest = os.path.join(outdir, f"wiki.{split}.tokens")
        size = extract_member(archive, member_name(split), dest)
        print(f"wiki.{split}.tokens: {size:,} bytes")
        paths[split] = dest
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", required=True, help="wikitext-103-v1.zip")
    parser.add_argument("--outdir", required=True)
    args = parser.parse_args(argv)
    try:
        extract_splits(args.archive, args.outdir)
    except MemberMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except zipfile.BadZipFile as e:
        print(f"error: {args.archive}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
