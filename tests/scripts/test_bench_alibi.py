"""scripts/bench_alibi.py: ALiBi, the sinusoidal transformer and the original fork as three rows of scripts/bench.py
(the fork's faithfulness is tests/scripts/test_originals.py): the rows it builds, the targets it checks, and a run
that prints a row for every model and length; plus scripts/bench_alibi_eval_memory.py."""
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from types import ModuleType

import pytest

from tests.harness import REPO_ROOT
from tests.scripts.tables import number, parse_tables, script_module

SCRIPT = os.path.join(REPO_ROOT, "scripts", "bench_alibi.py")
TINY = ["--layers", "2", "--embed-dim", "32", "--heads", "4", "--ffn-dim", "64", "--vocab", "64"]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return script_module("bench_alibi")


def rows_of(argv) -> dict:
    """``--model LABEL=FLAGS`` of a bench.py command line -> {label: flags}."""
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--model")


def test_rows_are_alibi_sinusoidal_and_the_fork_of_the_alibi_row(bench):
    opts = bench.build_arg_parser().parse_args([*TINY, "--attn-impl", "naive", "--seq-lens", "16,32"])
    argv = bench.bench_argv(opts)
    rows = rows_of(argv)
    assert shlex.split(rows["alibi"]) == ["--arch", "alibi_lm", "--decoder-layers", "2", "--decoder-embed-dim", "32",
                                          "--decoder-attention-heads", "4", "--decoder-ffn-embed-dim", "64",
                                          "--attn-impl", "naive", "--alibi-bias-form", "relative"]
    assert shlex.split(rows["sinusoidal"])[:2] == ["--arch", "transformer_lm"]
    assert shlex.split(rows["sinusoidal"])[2:] == shlex.split(rows["alibi"])[2:10]  # the same dimensions
    assert argv[argv.index("--original") + 1] == "alibi" and argv[argv.index("--models") + 1] == "none"
    assert argv[argv.index("--tokens-per-batch") + 1] == "4096" and argv[argv.index("--metrics") + 1] == "train"
    preset = bench.bench_argv(bench.build_arg_parser().parse_args(["--arch", "alibi_lm_wiki103", "--layers", "2"]))
    assert rows_of(preset)["sinusoidal"] == "--arch transformer_lm_wiki103 --decoder-layers 2"


def test_bad_choices_name_the_fix(bench, capsys):
    with pytest.raises(SystemExit) as err:
        bench.sinusoidal_arch("alibi_lm_tiny")
    assert "transformer_lm_tiny, which does not exist" in str(err.value) and "--models alibi,fork" in str(err.value)
    with pytest.raises(SystemExit):
        bench.build_arg_parser().parse_args(["--models", "sinusoidal,fork"])
    assert "it needs alibi" in capsys.readouterr().err


def test_targets_follow_the_measured_rows(bench):
    ok = dict(status="ok")
    rows = [dict(model="alibi", T=512, train=96.0, peak_mb=10.0, **ok), dict(model="sinusoidal", T=512, train=100.0,
                                                                           peak_mb=9.0, **ok),
            dict(model="alibi", T=2048, train=50.0, peak_mb=20.0, **ok),
            dict(model="alibi-original", T=2048, train=50.0, peak_mb=25.0, **ok),
            dict(model="alibi", T=4096, train=10.0, peak_mb=30.0, **ok),
            dict(model="alibi-original", T=4096, status="OOM")]
    lines = bench.target_lines(rows)
    assert "- alibi / sinusoidal training tokens/s at T=512: 0.96x (target >= 0.95x: met)" in lines
    assert "- ALiBi peak memory < fork at T=2048: 20.0 vs 25.0 MB -> met" in lines
    assert "- ALiBi peak memory < fork at T=4096: n/a (a row is missing or failed)" in lines
    rows[0]["train"] = 90.0
    assert "NOT met" in bench.target_lines(rows)[0]


@pytest.mark.slow
def test_bench_prints_a_row_for_every_model_and_length(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, *TINY, "--steps", "1", "--warmup", "1", "--seq-lens", "16,32",
                           "--tokens-per-batch", "64", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "python scripts/bench.py --models none --model" in proc.stdout and "Targets:" in proc.stdout
    rows = parse_tables(proc.stdout)[0]
    assert [(r["model"], r["T"], r["B"]) for r in rows] == [
        (m, t, b) for m in ("alibi", "alibi-original", "sinusoidal") for t, b in (("16", "4"), ("32", "2"))]
    for row in rows:
        assert number(row["train tok/s"]) > 0 and number(row["peak MB"]) > 0, row
    assert len({r["params (layers)"] for r in rows}) == 1  # the same size
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["tokens_per_batch"] == 64 and (tmp_path / "bench.png").exists()
    ratio = report["rows"][0]["train"] / report["rows"][4]["train"]
    assert f"- alibi / sinusoidal training tokens/s at T=16: {ratio:.2f}x" in proc.stdout
    assert "- alibi / alibi-original, T 16, 1 interleaved run(s): train" in proc.stdout


# --------------------------------------------------------------------------------------------------------------------
# scripts/bench_alibi_eval_memory.py (issue 11: evaluation memory vs window length, full-bias sdpa vs auto/chunked)
# --------------------------------------------------------------------------------------------------------------------

EVAL_MEMORY_SCRIPT = os.path.join(REPO_ROOT, "scripts", "bench_alibi_eval_memory.py")


@pytest.fixture(scope="module")
def eval_memory_bench() -> ModuleType:
    if "bench_alibi_eval_memory" in sys.modules:
        return sys.modules["bench_alibi_eval_memory"]
    spec = importlib.util.spec_from_file_location("bench_alibi_eval_memory", EVAL_MEMORY_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_alibi_eval_memory"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_eval_memory_bench_prints_identical_losses_for_every_length():
    proc = subprocess.run([sys.executable, EVAL_MEMORY_SCRIPT, "--quick", "--in-process", "--threads", "1",
                           "--seq-lens", "48,96", "--tokens", "96"],
                          capture_output=True, text=True, timeout=180, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = parse_tables(proc.stdout)[0]
    assert [int(r["T"]) for r in rows] == [48, 96]
    assert [int(r["windows"]) for r in rows] == [2, 1]  # 96 tokens
    for row in rows:
        assert row["sdpa: kernel run"] == "sdpa" and row["auto: kernel run"] == "chunked (16 rows)"
        assert number(row["sdpa: tokens/s"]) > 0 and number(row["auto: tokens/s"]) > 0
        assert row["sdpa: loss"] == row["auto: loss"] and row["identical loss"] == "yes"
    assert "Targets:" in proc.stdout and "python scripts/bench_alibi_eval_memory.py --quick" in proc.stdout
    assert "over 96 random tokens" in proc.stdout


def test_eval_memory_report_marks_failures_and_targets(eval_memory_bench):
    opts = eval_memory_bench.parse_bench_args(["--seq-lens", "16384,32768", "--tokens", "32768"])
    ok = dict(status="ok", loss=1.5, tokens_per_s=10.0, cuda_mb=None, rss_before_mb=400.0, ran="chunked (256 rows)")
    results = [dict(kernel="sdpa", seq_len=16384, **{**ok, "ran": "sdpa"}, rss_mb=5700.0),
               dict(kernel="auto", seq_len=16384, **ok, rss_mb=900.0),
               dict(kernel="sdpa", seq_len=32768, status="OOM"),
               dict(kernel="auto", seq_len=32768, **{**ok, "loss": 1.25}, rss_mb=2500.0)]
    report = eval_memory_bench.render_report(opts, results, "cmd", (0.0, 0.0))
    rows = parse_tables(report)[0]
    assert rows[0]["sdpa: peak RSS MB"] == "5,700" and rows[0]["sdpa / auto"] == "6.33×"
    assert rows[0]["identical loss"] == "yes"
    assert rows[1]["sdpa: peak RSS MB"] == "OOM" and rows[1]["sdpa / auto"] == "-"
    assert rows[1]["identical loss"] == "-"  # one kernel failed: nothing to compare
    assert "<= 2 GB peak RSS (auto): 900 MB -> met" in report
    assert "32k-token windows complete (auto): ok -> met" in report
    results[1]["rss_mb"] = 2100.0
    assert "(auto): 2,100 MB -> NOT met" in eval_memory_bench.render_report(opts, results, "cmd", (0.0, 0.0))


# --------------------------------------------------------------------------------------------------------------------
# scripts/bench_alibi_kernels.py (the ALiBi op alone: sdpa, blocked, chunked, unbiased causal)
# --------------------------------------------------------------------------------------------------------------------

def test_kernel_bench_prints_every_kernel_at_every_length(capsys):
    kernels = script_module("bench_alibi_kernels")
    assert kernels.main(["--quick", "--rows", "auto,16"]) == 0
    rows = parse_tables(capsys.readouterr().out)[0]
    assert [(int(r["T"]), r["kernel"]) for r in rows] == [
        (t, k) for t in (64, 96) for k in ("sdpa", f"blocked ({t}, auto)", "blocked (16)", "chunked",
                                           "causal, no bias")]
    assert [int(r["B"]) for r in rows] == [3] * 5 + [2] * 5
    for row in rows:
        assert number(row["forward + backward ms"]) >= 0 and number(row["forward, no grad, ms"]) >= 0
        if row["kernel"] == "sdpa":
            assert row["vs sdpa"] == "1.00×"


def test_kernel_bench_refuses_bad_sizes():
    kernels = script_module("bench_alibi_kernels")
    for argv in (["--rows", "0"], ["--seq-lens", "0"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            kernels.parse_args(argv)
