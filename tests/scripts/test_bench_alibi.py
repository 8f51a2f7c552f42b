"""scripts/bench_alibi.py: the fork reproduction is faithful (so the bench compares like with like) and the
benchmark prints a complete table."""
import importlib.util
import os
import subprocess
import sys
from types import ModuleType
from typing import Dict, List, Tuple

import pytest
import torch

from tests.harness import REPO_ROOT, assert_close
from tests.scripts.tables import number, parse_tables, script_module

SCRIPT = os.path.join(REPO_ROOT, "scripts", "bench_alibi.py")
TINY = ["--layers", "2", "--embed-dim", "32", "--heads", "4", "--ffn-dim", "64", "--vocab", "64"]
LABEL_PREFIX = {"alibi": "alibi_lm", "sinusoidal": "transformer_lm", "fork": "fork"}


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The script imported as a module (registers ``alibi_fork_lm`` with fairseq once)."""
    return script_module("bench_alibi")


def build(bench: ModuleType, model: str, seq_len: int, batch: int, *extra: str) -> torch.nn.Module:
    opts = bench.parse_bench_args([*TINY, "--tokens-per-batch", str(batch * seq_len), "--seq-lens", str(seq_len),
                                   *extra])
    _, lm, _ = bench.build_model_and_criterion(opts, model, seq_len)
    return lm


@pytest.mark.parametrize("heads", [4, 6])
def test_fork_mask_is_causal_plus_key_index_bias_at_b_times_h_plus_h(bench, heads):
    from fairseq_ext.ops.alibi import alibi_slopes

    t, b_max, b = 8, 3, 2
    decoder = build(bench, "fork", t, b_max, "--heads", str(heads), "--embed-dim", str(8 * heads)).decoder
    assert type(decoder) is bench.ForkAlibiDecoder and decoder.embed_positions is None
    assert decoder.alibi.shape == (b_max * heads, 1, t)  # sized from max_tokens // tokens_per_sample
    mask = decoder.buffered_future_mask(torch.zeros(t, b, 8 * heads))  # x is (T, B, C) at the call site
    assert mask.shape == (b * heads, t, t) and mask.dtype == torch.float32
    slopes = alibi_slopes(heads)
    j = torch.arange(t, dtype=torch.float32)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    for bi in range(b):
        for h in range(heads):
            expected = (slopes[h] * j).expand(t, t).masked_fill(future, float("-inf"))
            assert torch.equal(mask[bi * heads + h], expected), (bi, h)
    assert decoder.buffered_future_mask(torch.zeros(t, b, 8 * heads)) is not None  # cached: no rebuild
    assert decoder._future_mask.shape == (b_max * heads, t, t)


@pytest.mark.parametrize("bias_form", ["key_index", "relative"])
def test_fork_logits_equal_alibi_lm_logits_for_the_same_weights(bench, bias_form):
    t, b = 16, 3
    ours = build(bench, "alibi", t, b, "--alibi-bias-form", bias_form).eval()
    fork = build(bench, "fork", t, b).eval()
    fork.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.endswith("._extra_state")}, strict=True)
    tokens = torch.randint(4, 64, (b, t), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(fork(tokens)[0], ours(tokens)[0], atol=1e-5, msg=f"fork vs alibi_lm ({bias_form})")


def test_the_three_models_have_the_same_size(bench):
    models = {name: build(bench, name, 16, 2) for name in bench.MODELS}
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    assert len(set(sizes.values())) == 1, sizes
    assert models["sinusoidal"].decoder.embed_positions is not None  # sinusoidal: no parameters
    assert models["fork"].decoder.embed_positions is None
    assert not any("embed_positions" in k for k in models["alibi"].state_dict())
    shapes = {name: [tuple(p.shape) for p in m.parameters()] for name, m in models.items()}
    assert shapes["alibi"] == shapes["sinusoidal"] == shapes["fork"]


def test_cpu_peak_replays_allocations_inside_the_window(bench):
    mib = 1 << 20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        before = torch.empty(mib, dtype=torch.uint8)
        with torch.profiler.record_function("window"):
            transient = torch.empty(2 * mib, dtype=torch.uint8)
            del transient
            kept = torch.empty(mib, dtype=torch.uint8)
    assert before.numel() + kept.numel() == 2 * mib
    assert bench.cpu_peak_bytes(prof, "window") == 3 * mib


def run_bench(*args: str) -> Tuple[str, List[Dict[str, str]]]:
    proc = subprocess.run([sys.executable, SCRIPT, *TINY, "--steps", "2", "--warmup", "1", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, parse_tables(proc.stdout)[0]


@pytest.mark.slow
def test_bench_prints_a_row_for_every_model_and_length():
    stdout, rows = run_bench("--seq-lens", "16,32", "--tokens-per-batch", "64", "--isolation", "none")
    assert "torch " + torch.__version__ in stdout and "python scripts/bench_alibi.py" in stdout
    assert "Targets:" in stdout
    seen = set()
    for row in rows:
        model = next(m for m, prefix in LABEL_PREFIX.items() if row["model"].startswith(prefix))
        seen.add((model, int(row["T"])))
        assert int(row["batch"]) == 64 // int(row["T"])
        fastest, median = (number(v) for v in row["step ms (min / median)"].split("/"))
        assert 0 < fastest <= median, row
        for column in ("tokens/s", "peak memory (MB)", "params"):
            assert number(row[column]) > 0, row
        if model == "sinusoidal":
            assert row["vs sinusoidal"] == "1.00×"
    assert seen == {(m, t) for m in LABEL_PREFIX for t in (16, 32)}


@pytest.mark.slow
def test_bench_isolates_each_configuration_in_a_subprocess():
    _, rows = run_bench("--seq-lens", "16", "--tokens-per-batch", "32", "--models", "fork")
    assert len(rows) == 1 and rows[0]["model"].startswith("fork") and number(rows[0]["tokens/s"]) > 0
    assert rows[0]["vs sinusoidal"] == "n/a"


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
