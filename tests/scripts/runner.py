"""Run scripts/prepare-*.sh offline in a temporary directory and inspect what they wrote.

Every download URL points at ``file:///nonexistent/...`` so a test can never reach the network.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from tests.preprocess.helpers import fairseq_preprocess

REPO_ROOT = Path(__file__).resolve().parents[2]
_OWN_PREFIXES = ("WIKITEXT103_", "ENWIK8_", "TEXT8_", "EMBEDDED_")
_OWN_NAMES = ("DATA_DIR", "DATA_BIN", "FORCE", "WORKERS", "PYTHON", "FAIRSEQ_PREPROCESS")
UNREACHABLE = {"WIKITEXT103_URL": "file:///nonexistent/wikitext-103-v1.zip",
               "ENWIK8_URL": "file:///nonexistent/enwik8.zip", "TEXT8_URL": "file:///nonexistent/text8.zip"}


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def script_env(tmp: Path, **overrides: str) -> Dict[str, str]:
    """The caller's environment without any prepare-script settings, pointed at ``tmp``, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES) and k not in _OWN_NAMES}
    env.update(UNREACHABLE)
    env.update(DATA_DIR=str(tmp / "data"), DATA_BIN=str(tmp / "data-bin"), WORKERS="1", PYTHON=sys.executable,
               FAIRSEQ_PREPROCESS=fairseq_preprocess())
    env.update(overrides)
    return env


def run_script(name: str, env: Dict[str, str], *args: str) -> Run:
    start = time.monotonic()
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / name), *args], env=env, capture_output=True,
                          text=True, timeout=300, cwd=str(REPO_ROOT))
    return Run(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


def snapshot(*dirs: Path) -> Dict[str, Tuple[int, int]]:
    """(size, mtime) of every file below ``dirs``: a second, idle run must leave it unchanged."""
    out = {}
    for d in dirs:
        for path in sorted(d.rglob("*")):
            if path.is_file():
                st = path.stat()
                out[str(path)] = (st.st_size, st.st_mtime_ns)
    return out


def bin_splits(destdir: Path) -> Dict[str, List[List[str]]]:
    """Decode train/valid/test of a fairseq-preprocess output dir back to token strings, sentence by sentence."""
    from fairseq.data import Dictionary
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    dictionary = Dictionary.load(str(destdir / "dict.txt"))
    out = {}
    for split in ("train", "valid", "test"):
        ds = MMapIndexedDataset(str(destdir / split))
        out[split] = [[dictionary[i] for i in ds[k].tolist()] for k in range(len(ds))]
    return out


def dict_words(destdir: Path) -> List[str]:
    return [line.split(" ")[0] for line in (destdir / "dict.txt").read_text(encoding="utf-8").splitlines()]


def assert_bin_complete(destdir: Path) -> None:
    for name in ("dict.txt", "train.bin", "train.idx", "valid.bin", "valid.idx", "test.bin", "test.idx"):
        assert (destdir / name).stat().st_size > 0, f"{destdir / name} missing or empty"
