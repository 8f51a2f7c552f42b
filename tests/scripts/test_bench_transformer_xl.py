"""scripts/bench_transformer_xl.py: its rows are fairseq-train flags trained by scripts/benchrow.py (the original's
reproduction, tests/scripts/test_originals.py, computes what our model computes), and the benchmark prints a complete
table for every implementation."""
import os
import subprocess
import sys
from types import ModuleType

import pytest
import torch

from tests.harness import REPO_ROOT
from tests.scripts.tables import number, parse_tables, script_module

SCRIPT = os.path.join(REPO_ROOT, "scripts", "bench_transformer_xl.py")
IMPL_PREFIX = {"sdpa": "ours (sdpa)", "shift": "ours (shift)", "original": "original"}


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The script imported as a module."""
    return script_module("bench_transformer_xl")


def test_rows_are_fairseq_train_flags(bench):
    shape = bench.Shape(batch=2, tgt=8, mem=4, vocab=40)
    flags = bench.row_flags("transformer_xl_tiny", "original", shape)
    assert flags[:4] == ["--task", "streaming_lm", "--criterion", "lm_loss"]
    assert flags[flags.index("--attn-impl") + 1] == "shift"  # the original replaces our layers after the build
    assert flags[flags.index("--mem-len") + 1] == "4" and flags[flags.index("--clip-norm") + 1] == "0.25"
    row = bench.build_row(bench.parse_bench_args(["--quick"]), "transformer_xl_tiny", "original", shape)
    assert type(row.model).__name__ == "OriginalLM" and (row.batch, row.length, row.tokens) == (2, 8, 16)


def run_bench(*args: str) -> str:
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def impl_of(label: str) -> str:
    return next(impl for impl, prefix in IMPL_PREFIX.items() if label.startswith(prefix))


@pytest.mark.slow
def test_quick_bench_prints_both_tables_for_every_implementation():
    stdout = run_bench("--in-process")
    assert "torch " + torch.__version__ in stdout and "python scripts/bench_transformer_xl.py --quick" in stdout
    assert "threads" in stdout
    train, evaluation = parse_tables(stdout)
    assert {impl_of(r["implementation"]) for r in train} == set(IMPL_PREFIX)
    params = set()
    for row in train:
        assert row["B × T / M"] == "2 × 8 / 8", row
        fastest, median = (number(v) for v in row["step ms (min / median)"].split("/"))
        assert 0 < fastest <= median, row
        assert number(row["tokens/s (fastest)"]) >= number(row["tokens/s (median)"]) > 0, row
        assert number(row["peak memory (MB)"]) > 0, row
        params.add(row["params"])
        if impl_of(row["implementation"]) == "original":
            assert row["vs original"] == "1.00×"
    assert len(params) == 1  # same parameter count for every implementation
    assert {impl_of(r["implementation"]) for r in evaluation} == set(IMPL_PREFIX)
    for row in evaluation:
        assert row["B × T_eval / M"] == "1 × 4 / 8", row
        for column in ("stream tokens/s (fastest)", "sliding tokens/s (fastest)", "stream speed-up"):
            assert number(row[column]) > 0, row


@pytest.mark.slow
def test_bench_isolates_each_configuration_in_a_subprocess():
    stdout = run_bench("--impls", "original", "--tables", "train")
    tables = parse_tables(stdout)
    assert len(tables) == 1 and len(tables[0]) == 1
    row = tables[0][0]
    assert impl_of(row["implementation"]) == "original" and number(row["tokens/s (fastest)"]) > 0
    assert "one fresh subprocess per row" in stdout
