"""scripts/bench_fast_weights.py (spec fast_weights.md §5.4): the quick run prints the training-step table (recurrent,
chunked and softmax rows per B and T, the recurrence extrapolated above --recurrent-max-len and marked) and the
decode table (fast-weight state vs KV cache); a timed-out row reads "skipped (>N s)"."""
import os
from types import ModuleType

import pytest

from tests.harness import REPO_ROOT
from tests.scripts.tables import number, parse_tables, script_module

SCRIPT = os.path.join(REPO_ROOT, "scripts", "bench_fast_weights.py")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The script imported as a module."""
    return script_module("bench_fast_weights")


def test_quick_bench_prints_both_tables(bench, capsys) -> None:
    assert bench.main(["--quick", "--in-process", "--threads", "1", "--batch-sizes", "1"]) == 0
    stdout = capsys.readouterr().out
    assert "python scripts/bench_fast_weights.py --quick" in stdout and "threads" in stdout
    train, decode = parse_tables(stdout)
    assert [(row["T"], row["impl"]) for row in train] == [
        (t, impl) for t in ("16", "64") for impl in ("recurrent", "chunked", "softmax")]
    for row in train:
        assert row["B"] == "1" and number(row["peak memory (MB)"].lstrip("≈ ")) > 0, row
        assert number(row["tokens/s"].lstrip("≈ ")) > 0, row
    rows = {(row["T"], row["impl"]): row for row in train}
    assert rows["64", "recurrent"]["step ms (fastest)"].startswith("≈ ")  # ran at 32, scaled by 2
    assert "extrapolated ×2 from T = 32" in rows["64", "recurrent"]["step ms (fastest)"]
    assert not rows["16", "recurrent"]["step ms (fastest)"].startswith("≈")
    assert rows["64", "chunked"]["vs chunked"] == "1.00×"
    assert [row["impl"] for row in decode] == ["fast-weight", "softmax-kv-cache"]
    state, cache = (number(row["held per layer (KiB)"]) for row in decode)
    assert state == pytest.approx(8 * 16 * 16 * 4 / 2 ** 10, rel=0.01)  # (B, H, D_phi, d) fp32
    assert cache == pytest.approx(2 * 8 * 128 * 16 * 4 / 2 ** 10, rel=0.01)  # K and V of 128 positions


def test_ops_agree_and_timeouts_are_labelled(bench) -> None:
    """The two delta-rule forms compute the same outputs on the bench's inputs; a TIMEOUT row is labelled."""
    import torch

    x = bench.make_inputs(1, 40, torch.device("cpu"), seed=3, grad=False)
    torch.testing.assert_close(bench.forward("chunked", x, 16), bench.forward("recurrent", x, 16), atol=1e-5,
                               rtol=1e-5)
    row = {"table": "train", "impl": "recurrent", "batch": 1, "length": 16384, "status": "TIMEOUT", "timeout": 90.0}
    assert "skipped (>90 s)" in bench.train_rows([row])[0]
