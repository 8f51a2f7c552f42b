"""scripts/demo.py (`make demo`) on a tiny generated corpus: progress while training, the table with its CSV and PNG,
and a re-run that reuses the finished runs and their evaluations and prints the same table (it never silently
resumes; a retrained model is evaluated again)."""
import csv
import os
import subprocess
import sys

import pytest

from tests.harness import REPO_ROOT, fairseq_preprocess, random_corpus

pytestmark = pytest.mark.slow
TINY = ["--seq-len", "8", "--updates", "4", "--batch-tokens", "64", "--layers", "1", "--dim", "16", "--heads", "2",
        "--cutoffs", "", "--log-interval", "1"]


def demo(data: str, out: str) -> str:
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "demo.py"), "--data", data, "--out",
                           out, *TINY], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def table(stdout: str) -> list:
    return [line for line in stdout.splitlines() if line.startswith("| ")]


def test_demo_reports_progress_writes_the_curve_and_reruns_identically(tmp_path):
    raw = str(tmp_path / "raw.txt")
    data = fairseq_preprocess(str(tmp_path / "bin"), trainpref=random_corpus(raw, 60, seed=0),
                              validpref=random_corpus(str(tmp_path / "valid.txt"), 20, seed=1))
    out = str(tmp_path / "out")
    first = demo(data, out)
    assert "alibi: update 4, training loss" in first and "sinusoidal: update 1, training loss" in first
    assert [row.split(" | ")[0] for row in table(first)[1:]] == ["| alibi", "| sinusoidal"]  # after the header
    rows = list(csv.DictReader(open(os.path.join(out, "extrapolation.csv"))))
    assert [(r["model"], r["eval_length"]) for r in rows] == [(m, n) for m in ("alibi", "sinusoidal")
                                                              for n in ("8", "16", "32")]
    assert [f"{float(r['perplexity']):.2f}" for r in rows[:3]] == [c.strip() for c in table(first)[1].split("|")[2:5]]
    assert os.path.getsize(os.path.join(out, "extrapolation.png")) > 1000
    second = demo(data, out)
    assert "reusing alibi's finished run" in second and "training alibi" not in second
    assert all(f"reusing {m}'s evaluation at L_valid={n}" in second
               for m in ("alibi", "sinusoidal") for n in (8, 16, 32))
    assert table(second) == table(first)
    os.remove(os.path.join(out, "alibi", "demo-run.json"))  # an unfinished run is removed, then trained from scratch
    third = demo(data, out)
    assert "training alibi" in third and "reusing sinusoidal's finished run" in third and table(third) == table(first)
    assert "reusing alibi's evaluation" not in third and "reusing sinusoidal's evaluation at L_valid=32" in third
