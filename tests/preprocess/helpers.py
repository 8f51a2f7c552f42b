"""Small builders shared by the preprocess and script tests: zip archives and the fairseq-preprocess path."""
from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from typing import Dict


def make_zip(path: str, members: Dict[str, bytes]) -> str:
    """Write a zip archive holding ``members`` (name -> content); return ``path``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def digest(data: bytes, algo: str) -> str:
    return hashlib.new(algo, data).hexdigest()


def file_digest(path: str, algo: str) -> str:
    with open(path, "rb") as f:
        return digest(f.read(), algo)


def fairseq_preprocess() -> str:
    """``fairseq-preprocess`` of the venv running the tests (must exist: the tests need it, they do not skip)."""
    path = os.path.join(os.path.dirname(sys.executable), "fairseq-preprocess")
    assert os.access(path, os.X_OK), f"{path} missing: run 'bash scripts/install.sh'"
    return path


def fake_enwik8(n: int = 400) -> bytes:
    """Deterministic XML-like bytes with newlines, blank lines and multi-byte UTF-8."""
    lines = [f"<page id={i}> caf\u00e9 content {'x' * (i % 7)} </page>" for i in range(n)]
    lines[3] = ""
    return ("\n".join(lines) + "\nend").encode("utf-8")


def fake_text8(n_words: int = 400) -> bytes:
    """Deterministic lower-case words separated by spaces, starting with a space like text8."""
    words = ["anarchism", "originated", "as", "a", "term", "of", "abuse", "zebra", "quixotic"]
    return (" " + " ".join(words[(i * 7) % len(words)] for i in range(n_words))).encode("ascii")
