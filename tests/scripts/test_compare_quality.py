"""scripts/compare_quality.py: the quick comparison on a tiny generated corpus trains one model per family with one
command each (two models at a time: ``--jobs 2``), evaluates every protocol a model supports at L and 2L, writes
results.json / results.md / commands.sh / the plots, shows the JSON's numbers in its table, and a second run
(``--jobs 1``) reuses everything. ``--jobs`` itself: concurrent models, results in ``--models`` order, torch's
threads shared on CPU, one GPU per job on CUDA, a failure stops the models not started yet."""
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from tests.harness import REPO_ROOT, generated_data_dir
from tests.scripts.tables import number, parse_tables, script_module

pytestmark = pytest.mark.slow
SCRIPT = os.path.join(REPO_ROOT, "scripts", "compare_quality.py")
FAMILIES = ["alibi", "transformer_xl", "adaptive_span", "fast_weight_delta", "sha_rnn", "composed_hybrid"]


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=1200,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    data = generated_data_dir(tmp_path_factory, train_lines=400, valid_lines=60)
    out = tmp_path_factory.mktemp("compare")
    proc = _run("--quick", "--data", data, "--out", str(out), "--tokens", "1024", "--jobs", "2")
    return data, out, proc, json.loads((out / "results.json").read_text())


def test_one_trained_row_per_family_and_every_file(compared):
    _, out, proc, report = compared
    assert [m["model"] for m in report["models"]] == FAMILIES
    assert report["splits"] == ["valid"] and report["unit"] == "bpc"  # a dictionary of <= 300 entries: bits
    for name in ("results.md", "commands.sh", "curves.png", "lengths.png", "spans-adaptive_span.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    commands = (out / "commands.sh").read_text()
    for model in report["models"]:
        assert model["updates"] == 1024 // (4 * 16) and model["curve"], model["model"]
        assert os.path.exists(model["checkpoint"])
        train = " ".join(model["command"])
        assert "--task streaming_lm" in train and "--max-update 16" in train and "--seed 1" in train
        assert " ".join(model["command"][:2]) in commands
        protocols = {(e["protocol"], e["length"]) for e in model["evals"]}
        stateless = model["model"] == "alibi"  # the only family that carries nothing across segments
        expected = {("stream", 16), ("stream", 32)} | ({("sliding", 16), ("sliding", 32)} if stateless else set())
        assert protocols == expected, model["model"]
        for e in model["evals"]:
            assert e["tokens"] > 0 and e["ppl"] > 1 and ("memory: none" in e["label"]) == (
                stateless and e["protocol"] == "stream"), e
            if e["protocol"] == "sliding":
                assert e["label"] == f"sliding(L={e['length']}, S={e['length'] // 2})"
                assert "--context-window" in e["command"]


def test_table_shows_the_json_numbers(compared):
    _, out, proc, report = compared
    assert (out / "results.md").read_text().strip() in proc.stdout
    (table,) = parse_tables((out / "results.md").read_text())
    rows = {(r["model"], r["protocol"]): r for r in table}
    for model in report["models"]:
        for e in model["evals"]:
            protocol = "nonoverlap" if model["model"] == "alibi" and e["protocol"] == "stream" else e["protocol"]
            assert number(rows[(model["model"], protocol)][f"n={e['length']}"]) == round(e["bits"], 3)
        assert number(rows[(model["model"], "nonoverlap" if model["model"] == "alibi" else "stream")]["params"]) > 0


def test_second_run_reuses_training_and_evaluation(compared):
    data, out, _, report = compared
    logs = {p: p.stat().st_mtime_ns for p in out.rglob("*.log") if p.name != "plot_spans.log"}
    proc = _run("--quick", "--data", data, "--out", str(out), "--tokens", "1024")
    assert proc.stdout.count("reusing the finished training run") == len(FAMILIES)
    assert {p: p.stat().st_mtime_ns for p in logs} == logs  # no training or evaluation ran again
    assert json.loads((out / "results.json").read_text()) == report


def test_bad_arguments_name_the_fix(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--models", "nope"], capture_output=True, text=True,
                          cwd=REPO_ROOT)
    assert proc.returncode != 0 and "unknown ['nope']" in proc.stderr
    proc = subprocess.run([sys.executable, SCRIPT, "--data", str(tmp_path), "--models", "alibi"],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode != 0 and "is not a fairseq data-bin" in proc.stderr


@pytest.fixture
def cq(monkeypatch, tmp_path):
    module = script_module("compare_quality")
    (tmp_path / "valid.bin").write_bytes(b"")
    (tmp_path / "dict.txt").write_text("a 1\n")
    return module, tmp_path


def test_jobs_run_models_at_once_and_keep_the_models_order(cq, monkeypatch):
    module, data = cq
    second_started = threading.Event()
    seen = []

    def fake(opts, label, flags, split_names, job_env):
        seen.append((label, job_env))
        if label == "alibi":  # returns only once the second model has started: both run at once
            assert second_started.wait(timeout=60), "the second model did not start while the first ran"
        else:
            second_started.set()
        return {"model": label, "evals": []}

    monkeypatch.setattr(module, "train_and_evaluate", fake)
    opts = module.parse_args(["--quick", "--data", str(data), "--models", "alibi", "sha_rnn", "--jobs", "2",
                              "--device", "cpu"])
    report = module.compare(opts)
    assert [m["model"] for m in report["models"]] == ["alibi", "sha_rnn"]
    assert sorted(label for label, _ in seen) == ["alibi", "sha_rnn"]
    assert all(job_env["OMP_NUM_THREADS"] == str(max(1, torch.get_num_threads() // 2)) for _, job_env in seen)


def test_a_failed_model_stops_the_ones_not_started(cq, monkeypatch):
    module, data = cq
    started = []

    def fake(opts, label, flags, split_names, job_env):
        started.append(label)
        sys.exit(f"command failed: {label}")

    monkeypatch.setattr(module, "train_and_evaluate", fake)
    opts = module.parse_args(["--quick", "--data", str(data), "--models", "alibi", "sha_rnn", "transformer_xl",
                              "--device", "cpu"])
    with pytest.raises(SystemExit, match="command failed: alibi"):
        module.compare(opts)
    assert started == ["alibi"]


def test_two_models_with_one_label_are_refused(cq):
    module, data = cq
    with pytest.raises(SystemExit, match="x given twice"):
        module.parse_args(["--quick", "--data", str(data), "--models", "none", "--model", "x=--arch alibi_lm_tiny",
                           "--model", "x=--arch transformer_xl_tiny"])


def test_cuda_jobs_see_one_gpu_each_round_robin(cq, monkeypatch):
    module, data = cq
    opts = module.parse_args(["--quick", "--data", str(data), "--jobs", "3", "--device", "cuda"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert module.job_slots(opts) == [{"CUDA_VISIBLE_DEVICES": g} for g in ("3", "5", "3")]
    one = module.parse_args(["--quick", "--data", str(data), "--device", "cuda"])
    assert module.job_slots(one) == [{"CUDA_VISIBLE_DEVICES": "3"}]  # one worker, as the token budget counts
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(SystemExit, match="no visible GPU"):
        module.job_slots(opts)


def test_cpu_jobs_share_torchs_threads(cq, monkeypatch):
    module, data = cq
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    opts = module.parse_args(["--quick", "--data", str(data), "--jobs", "3", "--device", "cpu"])
    assert module.job_slots(opts) == [{"OMP_NUM_THREADS": "5", "MKL_NUM_THREADS": "5"}] * 3
    opts = module.parse_args(["--quick", "--data", str(data), "--jobs", "32", "--device", "cpu"])
    assert module.job_slots(opts)[0] == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    opts = module.parse_args(["--quick", "--data", str(data), "--device", "cpu"])
    assert module.job_slots(opts) == [{}]  # one job: the environment as it is


def test_run_adds_the_jobs_environment(cq, monkeypatch, tmp_path):
    module, _ = cq
    log = tmp_path / "env.log"
    module.run([sys.executable, "-c", "import os; print('GPU=' + os.environ['CUDA_VISIBLE_DEVICES'])"], str(log),
               {"CUDA_VISIBLE_DEVICES": "5"})
    assert "GPU=5" in log.read_text()
