"""scripts/bench_adaptive_span.py (Sukhbaatar et al. 2019, arXiv 1905.07799: small spans cost less): the quick
run prints both tables with a row per configuration, and the small-span configuration computes a 64-position window
and reports fewer attention GFLOP than the large-span and fixed-span ones."""
import os
from types import ModuleType

import pytest

from tests.harness import REPO_ROOT
from tests.scripts.tables import number, parse_tables, script_module

SCRIPT = os.path.join(REPO_ROOT, "scripts", "bench_adaptive_span.py")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The script imported as a module."""
    return script_module("bench_adaptive_span")


def test_config_names(bench):
    assert bench.parse_config_name("small") == 0.0 and bench.parse_config_name("large") == 1.0
    assert bench.parse_config_name("fixed") is None and bench.parse_config_name("z=0.25") == 0.25
    for bad in ("z=2", "z=x", "medium"):
        with pytest.raises(Exception, match="unknown config"):
            bench.parse_config_name(bad)


def test_quick_bench_prints_tables_and_small_spans_cost_less(bench, capsys):
    assert bench.main(["--quick", "--in-process", "--impl-configs", "large", "--steps", "1"]) == 0
    stdout = capsys.readouterr().out
    assert "python scripts/bench_adaptive_span.py --quick" in stdout and "threads" in stdout
    main, impls = parse_tables(stdout)
    rows = {row["config"]: row for row in main}
    assert set(rows) == {"adaptive, z = 0 (small)", "adaptive, z = 1 (large)", "fixed span"}
    small, large, fixed = rows["adaptive, z = 0 (small)"], rows["adaptive, z = 1 (large)"], rows["fixed span"]
    for row in main:
        assert row["B × M"] == "1 × 16" and row["L"] == "256", row
        assert number(row["tokens/s (fastest)"]) > 0 and number(row["peak tensor memory (MB)"]) > 0, row
        assert row["peak RSS (MB)"] == "n/a (in-process)"
    # L = 256, R = 32 (tiny preset: R = 8): z = 0 trims to the 64 nearest distances, cache L_pos + 64
    assert small["L_pos per layer"] == "64 ×1" and small["cache C per layer"] == "128 ×1"
    assert large["L_pos per layer"] == fixed["L_pos per layer"] == "256 ×1"
    gflop = {name: number(row["attn GFLOP / step (fwd)"]) for name, row in rows.items()}
    assert 0 < gflop["adaptive, z = 0 (small)"] < gflop["adaptive, z = 1 (large)"] == gflop["fixed span"]
    assert fixed["vs fixed"] == "1.00×"
    assert {(row["config"], row["impl"]) for row in impls} == {("adaptive, z = 1 (large)", "skew"),
                                                                ("adaptive, z = 1 (large)", "blocked"),
                                                                ("adaptive, z = 1 (large)", "fused"),
                                                                ("adaptive, z = 1 (large)", "naive")}
    assert {row["impl"] for row in main} == {"fused"}  # the main table's default on CPU
    for row in impls:
        assert row["B × M"] == "1 × 8" and row["L"] == "128" and number(row["vs skew"]) > 0, row


def test_gflop_matches_the_cost_formula(bench):
    """One worker result directly: attn_gflop = sum over layers of 2·B·K·M·d·(2(L_pos + M) + L_pos) / 1e9."""
    opts = bench.parse_bench_args(["--quick", "--in-process", "--steps", "1"])
    for config in ("small", "z=0.5"):
        r = bench.run_config(opts, "main", config, "skew")
        assert r["status"] == "ok", r
        b, m, heads, d = r["batch"], r["tgt"], r["heads"], r["dim"] // r["heads"]
        expected = sum(2 * b * heads * m * d * (2 * (w + m) + w) for w in r["l_pos"]) / 1e9
        assert r["attn_gflop"] == pytest.approx(expected)
        assert r["cache_held"] == r["cache"]  # the carried caches were filled to their full length
    assert r["l_pos"] == [192]  # z = 0.5: ceil(128) + 8 = 136 -> trim 64 -> 192
