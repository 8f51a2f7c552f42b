"""scripts/bench_sha_rnn.py (Merity 2019, arXiv 1911.11423; spec sha_rnn.md §2): the quick run prints the presets
and memory tables, every row trains (tokens/s and peak memory > 0) with its attention memories carried and filled to
their full length W, and a larger W keeps a longer memory (the original's reproduction, timed by scripts/bench.py
--original, is tested in tests/scripts/test_originals.py)."""
import os
from types import ModuleType

import pytest

from tests.harness import REPO_ROOT
from tests.scripts.tables import number, parse_tables, script_module

SCRIPT = os.path.join(REPO_ROOT, "scripts", "bench_sha_rnn.py")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The script imported as a module."""
    return script_module("bench_sha_rnn")


def test_quick_bench_prints_every_table(bench, capsys):
    assert bench.main(["--quick", "--in-process", "--steps", "1", "--memories", "48"]) == 0
    stdout = capsys.readouterr().out
    assert "python scripts/bench_sha_rnn.py --quick" in stdout and "threads" in stdout and "min-trust 0.25" in stdout
    presets, memory = parse_tables(stdout)
    assert [row["preset"] for row in presets] == ["sha_rnn_tiny"]
    assert [row["W (max_memory)"] for row in memory] == ["48"]
    for row in presets + memory:
        assert row["B × T"] == "1 × 16" and row["attention blocks"] == "0,1", row
        assert number(row["tokens/s (fastest)"]) > 0 and number(row["peak tensor memory (MB)"]) > 0, row
        assert row["peak RSS (MB)"] == "n/a (in-process)"
        w = row["W (max_memory)"]
        assert row["memory held"] == f"{w}, {w}", row  # filled to the full length W in both attention blocks
    assert presets[0]["W (max_memory)"] == "40" and memory[0]["vs first row"] == "1.00×"


def test_worker_result_carries_full_memories(bench):
    """One row directly: fills = ceil(W / T), the carried memories hold W positions after the timed steps."""
    opts = bench.parse_bench_args(["--quick", "--in-process", "--steps", "1"])
    r = bench.run_config(opts, "memory", "sha_rnn_tiny", 24)
    assert r["status"] == "ok", r
    assert r["fills"] == 2 and r["memory_held"] == [24, 24] and r["max_memory"] == 24
    assert r["tokens_per_s"] > 0 and r["peak_mb"] > 0


def test_bad_arguments_are_rejected(bench):
    with pytest.raises(SystemExit):
        bench.parse_bench_args(["--presets", "nope"])
    with pytest.raises(SystemExit):
        bench.parse_bench_args(["--quick", "--memories", "0"])


def test_a_preset_window_shorter_than_the_segment_is_raised_to_it(bench):
    """The default run's sha_rnn_tiny row (W = 40) at T = 256: the model refuses W < T, so the row uses W = T."""
    from argparse import Namespace

    opts = Namespace(tgt_len=256, batch_size=1, seed=1)
    flags = bench.row_flags(opts, "sha_rnn_tiny", None)
    assert flags[-2:] == ["--max-memory", "256"]
    assert "--max-memory" not in bench.row_flags(opts, "sha_rnn_enwik8", None)  # W 5000 >= T
