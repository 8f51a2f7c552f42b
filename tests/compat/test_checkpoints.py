"""Checkpoints survive interruption; ``--no-save`` writes nothing; a NaN memory is never saved
(``fairseq_ext.compat.checkpoints``, ``StatefulDecoder.get_extra_state``).

Without the shim, the interrupted run below exits 0 after logging "Saved checkpoint ... checkpoint_1_4.pt", and that
file (6.4 MB instead of 5.4 MB: fairseq's retry appends a second copy to the same handle) does not load.
"""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_ext.compat.checkpoints import atomic_copy
from fairseq_ext.models.transformer_xl_lm import TransformerXLDecoder
from tests.harness import REPO_ROOT, USER_DIR, command_env, fairseq_train, generated_data_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return generated_data_dir(tmp_path_factory, train_lines=60)


def train_args(data: str, save_dir: str, *extra: str):
    """transformer_xl_tiny widened so that a checkpoint (weights + Adam) is about 5 MB; saves every 2 updates."""
    return [data, "--user-dir", USER_DIR, "--task", "streaming_lm", "--arch", "transformer_xl_tiny",
            "--decoder-embed-dim", "128", "--decoder-ffn-embed-dim", "512", "--mem-len", "8",
            "--tokens-per-sample", "8", "--batch-size", "2", "--criterion", "lm_loss", "--optimizer", "adam",
            "--lr", "0.003", "--max-update", "6", "--save-interval-updates", "2", "--disable-validation",
            "--cpu", "--num-workers", "0", "--seed", "1", "--no-progress-bar", "--log-format", "simple",
            "--save-dir", save_dir, *extra]


def interrupted_train(data: str, save_dir: str, interrupts: int) -> subprocess.CompletedProcess:
    """fairseq-train interrupted ``interrupts`` times (SIGINT) while writing its 2nd checkpoint (update 4)."""
    env = command_env(INTERRUPT_SAVE="2", INTERRUPTS=str(interrupts), PYTHONPATH=REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "tests.compat.interrupting_train", *train_args(data, save_dir)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)


def updates_of(path: str) -> int:
    return checkpoint_utils.load_checkpoint_to_cpu(path)["optimizer_history"][-1]["num_updates"]


@pytest.mark.slow
def test_ctrl_c_during_a_save_finishes_it_then_stops_with_a_nonzero_status(data, tmp_path):
    proc = interrupted_train(data, str(tmp_path), interrupts=1)
    assert proc.returncode != 0
    assert "interrupt received while writing checkpoints: finishing it, then stopping" in proc.stdout + proc.stderr
    assert updates_of(str(tmp_path / "checkpoint_1_4.pt")) == 4
    assert updates_of(str(tmp_path / "checkpoint_last.pt")) == 4
    assert not os.path.exists(tmp_path / "checkpoint_1_6.pt")  # it stopped
    assert not glob.glob(str(tmp_path / ".*.tmp"))


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_the_save_and_keeps_the_previous_checkpoint(data, tmp_path):
    proc = interrupted_train(data, str(tmp_path), interrupts=2)
    assert proc.returncode != 0
    assert "interrupted again while writing checkpoints: aborted" in proc.stderr
    assert not os.path.exists(tmp_path / "checkpoint_1_4.pt")
    assert updates_of(str(tmp_path / "checkpoint_last.pt")) == 2  # the previous save, intact
    assert not glob.glob(str(tmp_path / ".*.tmp"))


def test_an_interrupted_copy_leaves_the_previous_file(tmp_path, monkeypatch):
    src, dst = tmp_path / "checkpoint_1_4.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old")

    def copy_half_then_interrupt(a, b):
        with open(a, "rb") as f_in, open(b, "wb") as f_out:
            f_out.write(f_in.read(100))
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", copy_half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1_4.pt", "checkpoint_last.pt"]


@pytest.fixture
def nan_at_third_segment(monkeypatch):
    """The Transformer-XL decoder's 3rd training segment returns NaN features and a NaN memory."""
    calls = []
    original = TransformerXLDecoder.forward_segment

    def forward_segment(self, tokens, state):
        features, new_state, extra = original(self, tokens, state)
        if self.training:
            calls.append(1)
            if len(calls) == 3:
                nan = float("nan")
                features = features * nan
                new_state = new_state._map(lambda t: t * nan)
        return features, new_state, extra

    monkeypatch.setattr(TransformerXLDecoder, "forward_segment", forward_segment)


@pytest.mark.slow
def test_no_save_writes_no_crash_checkpoint(data, tmp_path, nan_at_third_segment):
    with pytest.raises(FloatingPointError):
        fairseq_train(train_args(data, str(tmp_path), "--no-save"))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_the_crash_checkpoint_after_a_nan_holds_no_nan_memory(data, tmp_path, nan_at_third_segment):
    with pytest.raises(FloatingPointError):
        fairseq_train(train_args(data, str(tmp_path), "--save-interval-updates", "100"))
    state = torch.load(tmp_path / "crash.pt", weights_only=True)
    extra = state["model"]["decoder._extra_state"]
    assert extra["train_segments"] == 3 and extra["train"] is None  # the NaN memory was dropped


def test_an_optimizer_state_for_other_tensors_names_reset_optimizer():
    """Without the shim torch's "doesn't match the size of optimizer's group" surfaces from inside the trainer."""
    from fairseq.optim import FairseqOptimizer

    from fairseq_ext.errors import ConfigError

    class Plain(FairseqOptimizer):
        def __init__(self, params) -> None:
            super().__init__(None)
            self._optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)

    old = Plain([torch.nn.Parameter(torch.zeros(2)) for _ in range(3)])  # e.g. separate q, k, v
    new = Plain([torch.nn.Parameter(torch.zeros(6))])  # one qkv tensor
    with pytest.raises(ConfigError, match="--reset-optimizer"):
        new.load_state_dict(old.state_dict())
    Plain([torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]).load_state_dict(old.state_dict())
