"""Normalisation and word tokenisation for the embedded corpus.

A text is cut into paragraphs at blank lines; doctest blocks (``>>>``) and ruler lines made only of
punctuation (reST underlines, ``# ----``) are dropped; each paragraph becomes one line with all whitespace
collapsed to single spaces and non-printable characters removed. Paragraphs with fewer than
``MIN_WORDS`` tokens or without a letter are dropped. Words are split from punctuation by ``WORD_RE``
(``don't`` stays one word, ``os.path`` is ``os . path``); case is kept.
"""
from __future__ import annotations

import re
from typing import List

MIN_WORDS = 3
WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
_BLANK_LINE = re.compile(r"\n[ \t\f\v]*\n")
_RULER = re.compile(r"^[\W_]+$")
_SPACE = re.compile(r"\s+")
_LETTER = re.compile(r"[^\W\d_]")


def tokenize_words(paragraph: str) -> List[str]:
    """Words and single punctuation characters of ``paragraph``, in order."""
    return WORD_RE.findall(paragraph)


def normalise_paragraph(block: str) -> str:
    """One paragraph as a single line: ruler lines removed, whitespace collapsed, non-printables removed."""
    lines = [line.strip() for line in block.split("\n")]
    text = " ".join(line for line in lines if line and not _RULER.match(line))
    text = _SPACE.sub(" ", text).strip()
    return "".join(ch for ch in text if ch.isprintable())


def paragraphs(text: str) -> List[str]:
    """The kept, normalised paragraphs of ``text`` in order (see the module docstring)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out: List[str] = []
    for block in _BLANK_LINE.split(text):
        if any(line.lstrip().startswith(">>>") for line in block.split("\n")):
            continue
        para = normalise_paragraph(block)
        if _LETTER.search(para) and len(tokenize_words(para)) >= MIN_WORDS:
            out.append(para)
    return out
