"""scripts/bench_gpu.sh (the one GPU check) without a GPU: its help, its refusal to run without CUDA, and a dry run
whose every command parses with the options of the script it calls; and scripts/matmul_peak.py on CPU."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from tests.harness import REPO_ROOT
from tests.scripts.tables import script_module

SCRIPT = os.path.join(REPO_ROOT, "scripts", "bench_gpu.sh")
ENV = {**os.environ, "PYTHON": sys.executable}


def bench_gpu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=120, env=ENV,
                          cwd=REPO_ROOT)


def test_help_names_the_options():
    proc = bench_gpu("--help")
    assert proc.returncode == 0 and "--dry-run" in proc.stdout and "--out DIR" in proc.stdout
    bad = bench_gpu("--nope")
    assert bad.returncode == 2 and "unknown argument '--nope'" in bad.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_refuses_and_points_at_the_dry_run(tmp_path):
    proc = bench_gpu("--out", str(tmp_path / "out"))
    assert proc.returncode != 0 and "needs CUDA (try --dry-run)" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_commands_parse(tmp_path):
    proc = bench_gpu("--dry-run", "--out", str(tmp_path), "--steps", "4")
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
    scripts = [c[1] if c[1] != "-m" else c[2] for c in commands]
    assert scripts == ["scripts/matmul_peak.py", "scripts/bench.py", "scripts/bench.py", "scripts/bench.py",
                       "scripts/bench_adaptive_span.py", "scripts/bench_fast_weights.py", "pytest"]
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    parsers = {"scripts/bench.py": script_module("bench").parse_args,
               "scripts/bench_adaptive_span.py": script_module("bench_adaptive_span").parse_bench_args,
               "scripts/bench_fast_weights.py": script_module("bench_fast_weights").parse_bench_args,
               "scripts/matmul_peak.py": script_module("matmul_peak").build_arg_parser().parse_args}
    archs = set()
    for command, script in zip(commands, scripts):
        if script == "pytest":
            assert command[3:5] == ["tests/gpu", "tests/models/test_compile.py"]
            continue
        args = command[2:command.index(">")] if ">" in command else command[2:]  # run_to: "> FILE" follows
        opts = parsers[script](args)
        assert opts.device == "cuda" and opts.dtype == "bf16", command
        if script == "scripts/bench.py":
            assert opts.peak_tflops == 1 and opts.steps == 4
            archs.update(shlex.split(flags)[1] for _, flags, _ in opts.rows)
    assert archs == {"alibi_lm_wiki103", "transformer_lm_wiki103", "transformer_xl_wiki103_nvidia_base",
                     "sha_rnn_enwik8"}


def test_matmul_peak_on_cpu(tmp_path):
    out = tmp_path / "peak.json"
    assert script_module("matmul_peak").main(["--device", "cpu", "--size", "64", "--iters", "2", "--repeats", "1",
                                              "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tflops"] > 0 and result["size"] == 64 and result["dtype"] == "float32"
