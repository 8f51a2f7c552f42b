"""Run ``fairseq-preprocess --only-source`` from Python (the sentencepiece pipeline uses it).

The executable is looked up next to the running interpreter first (``.venv/bin/fairseq-preprocess``),
then on ``PATH``; ``$FAIRSEQ_PREPROCESS`` overrides both.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import List, Optional, Sequence

BIN_FILES = ("dict.txt", "train.bin", "train.idx", "valid.bin", "valid.idx", "test.bin", "test.idx")


def fairseq_preprocess_path() -> str:
    """Path of the ``fairseq-preprocess`` executable (``FileNotFoundError`` if there is none)."""
    override = os.environ.get("FAIRSEQ_PREPROCESS")
    if override:
        return override
    beside = os.path.join(os.path.dirname(sys.executable), "fairseq-preprocess")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("fairseq-preprocess")
    if found is None:
        raise FileNotFoundError("fairseq-preprocess not found: run 'bash scripts/install.sh' or set FAIRSEQ_PREPROCESS")
    return found


def binarise(train: str, valid: str, test: str, destdir: str, workers: int = 1,
             extra: Sequence[str] = (), executable: Optional[str] = None) -> List[str]:
    """Binarise the three files into ``destdir`` (dictionary from ``train`` only); return the written files.

    An existing ``destdir`` is replaced, because fairseq-preprocess refuses to overwrite ``dict.txt``.
    """
    if os.path.isdir(destdir):
        shutil.rmtree(destdir)
    os.makedirs(destdir)
    cmd = [executable or fairseq_preprocess_path(), "--only-source", "--trainpref", train, "--validpref", valid,
           "--testpref", test, "--destdir", destdir, "--workers", str(workers), *extra]
    subprocess.run(cmd, check=True)
    paths = [os.path.join(destdir, name) for name in BIN_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise RuntimeError(f"fairseq-preprocess did not write {', '.join(missing)}")
    return paths
