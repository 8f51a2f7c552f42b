"""Build the embedded demo corpus from the running Python's standard library, deterministically.

Pipeline: ``sources.read_documents`` (docstrings, comments and ``help()`` topics, normalised one paragraph
per line) -> global de-duplication of paragraphs in ``doc_id`` order (first occurrence kept) -> a fixed
document-level split (documents ordered by the md5 of their ``doc_id``; valid takes documents until it
holds ``valid_frac`` of all word tokens, test likewise, train the rest; each split is then written in
``doc_id`` order) -> two variants:

* ``word/<split>.txt``: space-separated words and punctuation (``preprocess.embedded.text``), one
  paragraph per line, so fairseq adds one ``</s>`` per paragraph;
* ``byte/<split>.txt``: each UTF-8 byte of the paragraph text one token in the enwik8 format
  (``preprocess.enwik8.tokenize``; newline = end of paragraph -> ``</s>``), plus ``<split>.txt.raw``.

``manifest.json`` records the Python version and the counts. The same Python version always produces
byte-identical files; other versions give slightly different counts.

CLI: ``python -m preprocess.embedded.build --outdir data/embedded [--stdlib DIR] [--max-docs N]
[--include-tests]``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
from typing import Dict, List, Optional, Sequence

from preprocess.embedded.sources import Document, read_documents, stdlib_dir
from preprocess.embedded.text import tokenize_words
from preprocess.enwik8.tokenize import fairseq_token_count, write_encoded

SPLITS = ("train", "valid", "test")


def deduplicate(docs: Sequence[Document]) -> List[Document]:
    """Drop every paragraph already seen earlier (in the given order) and documents left empty."""
    seen: set = set()
    out: List[Document] = []
    for doc in docs:
        kept = []
        for para in doc.paragraphs:
            if para not in seen:
                seen.add(para)
                kept.append(para)
        if kept:
            out.append(Document(doc.doc_id, tuple(kept)))
    return out


def _n_words(doc: Document) -> int:
    return sum(len(tokenize_words(p)) for p in doc.paragraphs)


def split_documents(docs: Sequence[Document], valid_frac: float = 0.05,
                    test_frac: float = 0.05) -> Dict[str, List[Document]]:
    """Assign whole documents to train/valid/test (see the module docstring); each split stays in doc_id order."""
    if len(docs) < 3:
        raise ValueError(f"need at least 3 non-empty documents to split, got {len(docs)}")
    total = sum(_n_words(d) for d in docs)
    order = sorted(docs, key=lambda d: hashlib.md5(d.doc_id.encode("utf-8")).hexdigest())
    assigned: Dict[str, str] = {}
    filled = {"valid": 0, "test": 0}
    targets = {"valid": valid_frac * total, "test": test_frac * total}
    for i, doc in enumerate(order):
        remaining = len(order) - i
        for split in ("valid", "test"):
            # Keep at least one document for each later split (test, train).
            later = 2 if split == "valid" else 1
            if filled[split] < targets[split] and remaining > later:
                assigned[doc.doc_id] = split
                filled[split] += _n_words(doc)
                break
        else:
            assigned[doc.doc_id] = "train"
    splits: Dict[str, List[Document]] = {s: [] for s in SPLITS}
    for doc in docs:
        splits[assigned[doc.doc_id]].append(doc)
    for split in SPLITS:
        if not splits[split]:
            raise ValueError(f"split {split} is empty; lower the held-out fractions or add documents")
    return dict(splits)


def _write(path: str, data: bytes) -> None:
    with open(path + ".part", "wb") as f:
        f.write(data)
    os.replace(path + ".part", path)


def write_corpus(splits: Dict[str, List[Document]], outdir: str) -> Dict[str, Dict[str, object]]:
    """Write the word and byte variants of ``splits`` under ``outdir``; return their counts."""
    word_dir, byte_dir = os.path.join(outdir, "word"), os.path.join(outdir, "byte")
    os.makedirs(word_dir, exist_ok=True)
    os.makedirs(byte_dir, exist_ok=True)
    documents: Dict[str, object] = {}
    word: Dict[str, object] = {}
    byte: Dict[str, object] = {}
    for split in SPLITS:
        paras = [p for doc in splits[split] for p in doc.paragraphs]
        word_lines = [" ".join(tokenize_words(p)) for p in paras]
        _write(os.path.join(word_dir, f"{split}.txt"), "".join(line + "\n" for line in word_lines).encode("utf-8"))
        raw = "".join(p + "\n" for p in paras).encode("utf-8")
        path = os.path.join(byte_dir, f"{split}.txt")
        with open(path + ".part", "wb") as f:
            write_encoded(raw, f, "eos")
        os.replace(path + ".part", path)
        _write(path + ".raw", raw)
        n_words = sum(len(line.split()) for line in word_lines)
        documents[split] = len(splits[split])
        word[split] = {"lines": len(word_lines), "tokens": n_words + len(word_lines),
                       "types": len({w for line in word_lines for w in line.split()})}
        byte[split] = {"bytes": len(raw), "tokens": fairseq_token_count(raw, "eos"), "types": len(set(raw) - {10})}
    return {"documents": documents, "word": word, "byte": byte}


def build(outdir: str, root: Optional[str] = None, max_docs: Optional[int] = None,
          valid_frac: float = 0.05, test_frac: float = 0.05, include_tests: bool = False) -> Dict[str, object]:
    """Build the corpus into ``outdir`` from the stdlib at ``root`` (default: this interpreter's)."""
    docs = read_documents(root or stdlib_dir(), include_tests, max_docs)
    splits = split_documents(deduplicate(docs), valid_frac, test_frac)
    counts = write_corpus(splits, outdir)
    manifest = {"python": platform.python_version(), "source": "stdlib docstrings, comments, pydoc topics",
                "include_tests": include_tests, "max_docs": max_docs, "valid_frac": valid_frac,
                "test_frac": test_frac, **counts}
    _write(os.path.join(outdir, "manifest.json"), (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", required=True, help="writes OUTDIR/word, OUTDIR/byte, OUTDIR/manifest.json")
    parser.add_argument("--stdlib", default=None, help="standard-library directory (default: this Python's)")
    parser.add_argument("--max-docs", type=int, default=None, help="use only the first N documents (tests)")
    parser.add_argument("--include-tests", action="store_true",
                        help="also read the stdlib test suites where installed (bigger, not portable)")
    parser.add_argument("--valid-frac", type=float, default=0.05)
    parser.add_argument("--test-frac", type=float, default=0.05)
    args = parser.parse_args(argv)
    try:
        manifest = build(args.outdir, args.stdlib, args.max_docs, args.valid_frac, args.test_frac,
                         args.include_tests)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for variant in ("word", "byte"):
        for split in SPLITS:
            c = manifest[variant][split]  # type: ignore[index]  # manifest values are nested dicts
            print(f"{variant}/{split}.txt: " + ", ".join(f"{k} {v:,}" for k, v in c.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
