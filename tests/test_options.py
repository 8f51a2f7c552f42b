"""``python -m fairseq_ext.options ARCH``: a model's options with the preset's values, and clear errors."""
import re
import subprocess
import sys

from fairseq_ext.options import arch_options, main, plugin_archs
from tests.harness import REPO_ROOT


def test_every_preset_of_the_package_is_listed():
    archs = plugin_archs()
    assert {"transformer_xl_wiki103_base", "alibi_lm_wiki103", "adaptive_span_enwik8_small", "sha_rnn_enwik8",
            "fast_weight_wiki103_small_fwm", "composed_span_xl_enwik8"} <= set(archs)
    assert "transformer_lm" not in archs  # fairseq's own models are not ours to list


def test_options_show_the_preset_values_and_help(capsys):
    rows = {flag: (value, source, text) for flag, value, source, text in arch_options("transformer_xl_wiki103_base")}
    assert rows["--mem-len"][:2] == (150, "preset") and "memory" in rows["--mem-len"][2]
    assert rows["--clamp-len"][:2] == (-1, "default")
    assert rows["--tokens-per-sample"][0] == "from --tokens-per-sample"
    assert main(["sha_rnn_enwik8"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"--max-memory\s+5000\s+\(preset\)\s+attention window", out)


def test_an_unknown_arch_names_the_close_ones(capsys):
    assert main(["transformer_xl_wt103"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_runs_as_a_module_from_any_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fairseq_ext.options", "alibi_lm_tiny"], cwd=tmp_path,
                          env={"PYTHONPATH": REPO_ROOT, "PATH": ""}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and re.search(r"--decoder-embed-dim\s+64\s+\(preset\)", proc.stdout)
