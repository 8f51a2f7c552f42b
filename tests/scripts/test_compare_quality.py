"""scripts/compare_quality.py: the quick comparison on a tiny generated corpus trains one model per family with one
command each, evaluates every protocol a model supports at L and 2L, writes results.json / results.md /
commands.sh / the plots, shows the JSON's numbers in its table, and a second run reuses everything."""
import json
import os
import subprocess
import sys

import pytest

from tests.harness import REPO_ROOT, generated_data_dir
from tests.scripts.tables import number, parse_tables

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
    proc = _run("--quick", "--data", data, "--out", str(out), "--tokens", "1024")
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
