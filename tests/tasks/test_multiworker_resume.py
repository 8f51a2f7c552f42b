"""Resuming with 2 CPU workers is exact for every family: stop after K updates, resume to N == N uninterrupted
updates, bit for bit, each worker's carried memory restored (dropout on, so every worker's seeds matter too).

Without ``fairseq_ext.compat.distributed``'s broadcast fix the resume crashes on rank 1 (``UnpicklingError``:
omegaconf ``DictConfig`` under torch's weights-only load); without every rank's stream in the checkpoint
(``StatefulDecoder.gather_train_stream``) the workers restart cold and the weights differ (checked below).
"""
import os
import shutil

import pytest
import torch

from fairseq_ext.state import state_from_plain
from tests.harness import (USER_DIR, checkpoint_weights, fairseq_command, logged_updates,
                           generated_data_dir)

pytestmark = pytest.mark.slow

SAVE_AT, UPDATES = 2, 4
STREAM_FAMILY = ["--task", "streaming_lm", "--criterion", "lm_loss", "--tokens-per-sample", "8", "--batch-size", "2"]
FAMILIES = {
    "alibi_lm": ["--task", "language_modeling", "--arch", "alibi_lm_tiny", "--criterion", "cross_entropy",
                 "--tokens-per-sample", "8", "--sample-break-mode", "none", "--batch-size", "2", "--dropout", "0.1"],
    "transformer_xl_lm": STREAM_FAMILY + ["--arch", "transformer_xl_tiny", "--mem-len", "8", "--dropout", "0.1"],
    "adaptive_span_lm": STREAM_FAMILY + ["--arch", "adaptive_span_tiny", "--dropout", "0.1"],
    "fast_weight_lm": STREAM_FAMILY + ["--arch", "fast_weight_tiny", "--carry-over-fast-weight", "--no-pos"],
    "sha_rnn_lm": STREAM_FAMILY + ["--arch", "sha_rnn_tiny"],
}
STATEFUL = [name for name in FAMILIES if name != "alibi_lm"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return generated_data_dir(tmp_path_factory, train_lines=60)


def train(data: str, family: str, save_dir: str) -> str:
    """2 spawned CPU workers up to UPDATES updates, saving every SAVE_AT; returns the log."""
    proc = fairseq_command("fairseq-train", [
        data, "--user-dir", USER_DIR, *FAMILIES[family], "--optimizer", "adam", "--lr", "0.003",
        "--max-update", str(UPDATES), "--save-interval-updates", str(SAVE_AT), "--disable-validation",
        "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--seed", "5", "--no-progress-bar",
        "--log-format", "simple", "--log-interval", "1", "--distributed-world-size", "2", "--save-dir", save_dir])
    return proc.stdout + proc.stderr


def resume(data: str, family: str, source: str, save_dir: str, edit=None) -> str:
    """Continue from ``source``'s checkpoint after SAVE_AT updates (optionally edited) to UPDATES updates."""
    os.makedirs(save_dir)
    target = os.path.join(save_dir, "checkpoint_last.pt")
    shutil.copy(os.path.join(source, f"checkpoint_1_{SAVE_AT}.pt"), target)
    if edit is not None:
        state = torch.load(target, weights_only=False)
        edit(state)
        torch.save(state, target)
    return train(data, family, save_dir)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    runs = {}

    def run(family: str):
        if family not in runs:
            save_dir = str(tmp_path_factory.mktemp(family))
            runs[family] = (save_dir, train(data, family, save_dir))
        return runs[family]
    return run


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_worker_resume_equals_the_uninterrupted_run(family, data, uninterrupted, tmp_path):
    full_dir, full_log = uninterrupted(family)
    log = resume(data, family, full_dir, str(tmp_path / "resumed"))
    resumed_losses, full_losses = logged_updates(log), logged_updates(full_log)
    assert sorted(resumed_losses) == list(range(SAVE_AT + 1, UPDATES + 1))
    assert all(resumed_losses[u] == full_losses[u] for u in resumed_losses)
    full = checkpoint_weights(os.path.join(full_dir, "checkpoint_last.pt"))
    resumed = checkpoint_weights(str(tmp_path / "resumed" / "checkpoint_last.pt"))
    assert all(torch.equal(full[name], resumed[name]) for name in full), "resumed weights differ"
    if family in STATEFUL:
        assert "resumed the training streams' state at segment" in log


@pytest.mark.parametrize("family", STATEFUL)
def test_the_checkpoint_holds_every_workers_own_stream(family, uninterrupted):
    full_dir, _ = uninterrupted(family)
    state = torch.load(os.path.join(full_dir, f"checkpoint_1_{SAVE_AT}.pt"), weights_only=True)
    extra = state["model"]["decoder._extra_state"]
    assert extra["world_size"] == 2 and extra["train_segments"] == SAVE_AT and len(extra["other_ranks"]) == 1
    rank0, rank1 = (list(state_from_plain(plain).tensors()) for plain in (extra["train"], extra["other_ranks"][0]))
    assert len(rank0) == len(rank1) > 0
    assert any(not torch.equal(a, b) for a, b in zip(rank0, rank1))  # each worker read its own streams


def test_without_the_other_workers_streams_the_resume_is_cold_and_differs(data, uninterrupted, tmp_path):
    """The check above can fail: the same resume with only rank 0's stream in the checkpoint starts every worker
    cold (logged) and ends with other weights."""
    family = "transformer_xl_lm"
    full_dir, _ = uninterrupted(family)

    def drop_other_ranks(state):
        state["model"]["decoder._extra_state"]["other_ranks"] = None

    log = resume(data, family, full_dir, str(tmp_path / "cold"), edit=drop_other_ranks)
    assert "training streams start cold: the checkpoint holds only rank 0's stream" in log
    full = checkpoint_weights(os.path.join(full_dir, "checkpoint_last.pt"))
    cold = checkpoint_weights(str(tmp_path / "cold" / "checkpoint_last.pt"))
    assert not all(torch.equal(full[name], cold[name]) for name in full)
