"""Count lines, tokens and types of a tokenised text file the way ``fairseq-preprocess`` counts them.

fairseq reads the file in text mode, splits each line on whitespace and appends one end-of-sentence
token (``</s>``) per line, so ``tokens = sum(len(line.split()) + 1)``; ``types`` are the distinct
whitespace-separated words (without ``</s>``).

CLI: ``python -m preprocess.stats FILE [FILE ...]`` prints one tab-separated row per file.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import List, Optional

_SPACE = re.compile(r"\s+")  # fairseq.tokenizer.SPACE_NORMALIZER


@dataclass(frozen=True)
class TextStats:
    lines: int
    tokens: int  # words + one </s> per line
    types: int  # distinct words, </s> not included


def tokenize_line(line: str) -> List[str]:
    """fairseq's ``tokenize_line``: collapse whitespace, strip, split on spaces."""
    return _SPACE.sub(" ", line).strip().split()


def file_stats(path: str) -> TextStats:
    """Lines, tokens (with one ``</s>`` per line) and types of ``path``."""
    lines = words = 0
    vocab: set = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            toks = tokenize_line(line)
            lines += 1
            words += len(toks)
            vocab.update(toks)
    return TextStats(lines=lines, tokens=words + lines, types=len(vocab))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    print("file\tlines\ttokens(+eos)\ttypes")
    for path in args.files:
        s = file_stats(path)
        print(f"{path}\t{s.lines}\t{s.tokens}\t{s.types}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
