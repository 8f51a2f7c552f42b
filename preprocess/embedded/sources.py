"""Read the embedded corpus's source text from the standard library of the running Python.

Documents, identified by a path relative to the stdlib directory:

* every ``.py`` file outside test suites, ``site-packages`` and build-specific files: its docstrings (every
  string-literal statement, i.e. module/class/function docstrings and attribute docstrings, via ``ast``)
  and its comments (via ``tokenize``; consecutive full-line comments form one block), in source order;
* ``pydoc_data/topics.py``: one document per help topic (``pydoc_data/topics.py#<topic>``), the text of
  the Python language reference that ``help()`` shows.

Files are listed in sorted order, so the same Python installation always yields the same documents.
The test suites (``test/``, ``*/tests/``, ``idle_test/``) are left out by default because some
distributions do not install them; ``include_tests=True`` adds them where present (not portable).
"""
from __future__ import annotations

import ast
import inspect
import io
import os
import sysconfig
import tokenize
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from preprocess.embedded.text import paragraphs

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
TOPICS_FILE = "pydoc_data/topics.py"
# Comment pragmas that are not prose.
_PRAGMAS = ("!", "-*-", "noqa", "type:", "pragma", "fmt:", "pylint:", "vim:", "coding")


@dataclass(frozen=True)
class Document:
    doc_id: str
    paragraphs: Tuple[str, ...]


def stdlib_dir() -> str:
    """The standard-library directory of the running interpreter."""
    return sysconfig.get_paths()["stdlib"]


def list_python_files(root: str, include_tests: bool = False) -> List[str]:
    """Sorted ``/``-separated paths (relative to ``root``) of the stdlib ``.py`` files used."""
    excluded = EXCLUDED_DIRS if include_tests else EXCLUDED_DIRS | TEST_DIRS
    found: List[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in excluded and not d.startswith(("config-", "lib-dynload"))]
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for name in filenames:
            # _sysconfigdata*.py records the build machine's paths and flags: not prose, not portable.
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                found.append(prefix + name)
    return sorted(found)


def _docstrings(tree: ast.AST) -> Iterator[Tuple[int, str]]:
    for node in ast.walk(tree):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            yield node.lineno, inspect.cleandoc(node.value.value)


def _comment_blocks(source: bytes) -> Iterator[Tuple[int, str]]:
    """(first line, text) of each block of consecutive full-line comments, and of each trailing comment."""
    block: List[str] = []
    start = last = -1
    for tok in tokenize.tokenize(io.BytesIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        text = tok.string.lstrip("#")
        text = text[1:] if text.startswith(" ") else text
        if text.strip().startswith(_PRAGMAS):
            continue
        row = tok.start[0]
        full_line = tok.line.lstrip().startswith("#")
        if block and full_line and row == last + 1:
            block.append(text)
        else:
            if block:
                yield start, "\n".join(block)
            block, start = [text], row
        last = row if full_line else -1
    if block:
        yield start, "\n".join(block)


def python_file_text(source: bytes) -> List[str]:
    """Paragraphs of the docstrings and comments of one Python source file, in source order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences etc. in old modules
        tree = ast.parse(source)
    pieces = sorted(list(_docstrings(tree)) + list(_comment_blocks(source)), key=lambda p: p[0])
    return [para for _, text in pieces for para in paragraphs(text)]


def topics_documents(source: bytes) -> List[Document]:
    """One document per entry of the ``topics`` dict literal in ``pydoc_data/topics.py``."""
    docs: List[Document] = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant) and isinstance(value.value, str):
                    docs.append(Document(f"{TOPICS_FILE}#{key.value}", tuple(paragraphs(value.value))))
    return docs


def read_documents(root: str, include_tests: bool = False, max_docs: Optional[int] = None) -> List[Document]:
    """The documents of the stdlib at ``root``, sorted by ``doc_id``; files that do not parse are skipped.

    With ``max_docs``, only the first ``max_docs`` documents (files are read in sorted order, then cut).
    """
    docs: List[Document] = []
    for rel in list_python_files(root, include_tests):
        if max_docs is not None and len(docs) >= max_docs:
            break
        with open(os.path.join(root, rel), "rb") as f:
            source = f.read()
        try:
            if rel == TOPICS_FILE:
                docs.extend(topics_documents(source))
            else:
                docs.append(Document(rel, tuple(python_file_text(source))))
        except (SyntaxError, ValueError, tokenize.TokenError):
            continue
    return sorted(docs, key=lambda d: d.doc_id)[:max_docs]
