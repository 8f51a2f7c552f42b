"""Every documented launch of fairseq's data-parallel training works on CPU (``fairseq_ext.compat.launch`` and
``.distributed``): each one trains 2 gloo workers that together equal one process with the same global batch.

Without the shims: fairseq's spawn asserts "world size is 2 but have 0 available devices", ``--distributed-init-method``
without ``--distributed-no-spawn`` spawns 0 processes and exits 0, torchrun runs two independent single workers,
``--ddp-backend c10d`` fails on ``device_ids``.
"""
import os
import subprocess
import sys
import types

import pytest
import torch
from fairseq import trainer as fairseq_trainer

from fairseq_ext.compat.distributed import rank_seed
from fairseq_ext.compat.launch import free_port
from fairseq_ext.errors import ConfigError
from tests.harness import (USER_DIR, checkpoint_weights, command_env, fairseq_command,
                           fairseq_train, generated_data_dir, logged_updates)

UPDATES = 4
STREAMS = 4  # in all: 4 for one worker, 2 per worker for two


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return generated_data_dir(tmp_path_factory, train_lines=40)


def train_args(data: str, save_dir: str, streams_per_worker: int, *extra: str):
    return [data, "--user-dir", USER_DIR, "--task", "streaming_lm", "--arch", "transformer_xl_tiny",
            "--mem-len", "8", "--tokens-per-sample", "8", "--batch-size", str(streams_per_worker),
            "--criterion", "lm_loss", "--optimizer", "adam", "--lr", "0.003", "--max-update", str(UPDATES),
            "--disable-validation", "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--seed", "3",
            "--no-progress-bar", "--log-format", "simple", "--log-interval", "1", "--save-dir", save_dir, *extra]


@pytest.fixture(scope="module")
def one_worker(data, tmp_path_factory) -> dict:
    """Weights after UPDATES updates of a single process reading all STREAMS streams."""
    save_dir = str(tmp_path_factory.mktemp("one"))
    fairseq_command("fairseq-train", train_args(data, save_dir, STREAMS))
    return checkpoint_weights(os.path.join(save_dir, "checkpoint_last.pt"))


def launch(kind: str, data: str, save_dir: str) -> str:
    """Start 2 CPU workers of STREAMS // 2 streams each the ``kind`` way; returns their combined output."""
    two = train_args(data, save_dir, STREAMS // 2)
    port = str(free_port())
    if kind == "spawn":
        proc = fairseq_command("fairseq-train", two + ["--distributed-world-size", "2"])
    elif kind == "c10d":
        proc = fairseq_command("fairseq-train", two + ["--distributed-world-size", "2", "--ddp-backend", "c10d"])
    elif kind == "tcp-init":
        proc = fairseq_command("fairseq-train", two + ["--distributed-world-size", "2", "--distributed-init-method",
                                                       f"tcp://localhost:{port}"])
    elif kind == "torchrun":
        train = os.path.join(os.path.dirname(sys.executable), "fairseq-train")
        proc = fairseq_command("torchrun", ["--nproc_per_node", "2", "--master_port", port, train, *two])
    else:
        proc = None
    if proc is not None:
        return proc.stdout + proc.stderr
    if kind == "no-spawn":  # one command per worker, as on several machines
        procs = [subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "fairseq-train"), *two,
                                   "--distributed-world-size", "2", "--distributed-rank", str(rank),
                                   "--distributed-init-method", f"tcp://localhost:{port}", "--distributed-no-spawn"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=command_env())
                 for rank in range(2)]
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
        assert [proc.returncode for proc in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
        return "".join(outputs)
    raise ValueError(kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["spawn", "tcp-init", "torchrun", "c10d", "no-spawn"])
def test_two_cpu_workers_equal_one_worker_with_the_same_global_batch(kind, data, one_worker, tmp_path):
    log = launch(kind, data, str(tmp_path))
    assert "distributed init (rank 1)" in log
    updates = logged_updates(log)
    assert sorted(updates) == list(range(1, UPDATES + 1))
    assert f"bsz={STREAMS}," in log  # fairseq sums the batch over the workers: both trained
    weights = checkpoint_weights(os.path.join(str(tmp_path), "checkpoint_last.pt"))
    assert weights.keys() == one_worker.keys()
    for name, value in one_worker.items():
        torch.testing.assert_close(weights[name], value, atol=2e-6, rtol=1e-5, msg=name)


def test_fully_sharded_is_refused_on_cpu_naming_what_works(data, tmp_path):
    with pytest.raises(ConfigError, match="legacy_ddp, c10d or pytorch_ddp"):
        fairseq_train(train_args(data, str(tmp_path), 2, "--ddp-backend", "fully_sharded",
                                 "--distributed-world-size", "2"))


def test_a_launch_that_would_start_no_worker_is_refused(data, tmp_path):
    with pytest.raises(ConfigError, match="leaves no rank"):
        fairseq_train(train_args(data, str(tmp_path), 2, "--distributed-world-size", "2", "--distributed-rank", "2",
                                 "--distributed-init-method", f"tcp://localhost:{free_port()}"))


def test_every_rank_draws_its_own_dropout_masks_and_rank_0_keeps_fairseqs_seed():
    """fairseq seeds every rank with seed + num_updates (identical dropout masks on every worker); the shim keeps
    that seed for rank 0 and derives another, reproducible one for each other rank."""
    draws = {}
    for rank in range(3):
        fake = types.SimpleNamespace(cfg=types.SimpleNamespace(common=types.SimpleNamespace(seed=7)),
                                     get_num_updates=lambda: 5, data_parallel_rank=rank)
        fairseq_trainer.Trainer._set_seed(fake)
        draws[rank] = torch.rand(8)
        assert torch.initial_seed() == rank_seed(12, rank)
    assert rank_seed(12, 0) == 12
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    fairseq_trainer.Trainer._set_seed(types.SimpleNamespace(
        cfg=types.SimpleNamespace(common=types.SimpleNamespace(seed=7)), get_num_updates=lambda: 5,
        data_parallel_rank=1))
    assert torch.equal(torch.rand(8), draws[1])  # the same (seed, update, rank): the same masks (exact resume)


def test_a_cpu_worker_destroys_its_process_group_before_returning(monkeypatch):
    """fairseq's ``distributed_main`` returns with the gloo group alive (a CPU worker then sometimes aborted at exit:
    "terminate called without an active exception"); ``run_worker`` destroys it, also when ``main`` raises."""
    import fairseq_ext.compat.launch as launch

    def fake_distributed_main(index, main, cfg, kwargs):  # fairseq's: init a group, run main, leave the group alive
        torch.distributed.init_process_group("gloo", init_method=f"tcp://localhost:{free_port()}", world_size=1,
                                             rank=index)
        main(cfg)

    monkeypatch.setattr(launch.distributed_utils, "distributed_main", fake_distributed_main)
    seen = []
    launch.run_worker(0, lambda cfg: seen.append(torch.distributed.is_initialized()), None, {})
    assert seen == [True] and not torch.distributed.is_initialized()

    def failing(cfg):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        launch.run_worker(0, failing, None, {})
    assert not torch.distributed.is_initialized()


def test_a_spawned_worker_exits_at_once_after_its_exit_handlers(monkeypatch):
    """``spawned_worker`` runs ``run_worker`` (the group destroyed), the exit handlers, then ``os._exit(0)``, skipping
    the interpreter teardown where a finished worker sometimes aborted; a failing worker raises, exiting nothing."""
    import atexit

    import fairseq_ext.compat.launch as launch

    events = []
    monkeypatch.setattr(launch, "run_worker", lambda index, main, cfg, kwargs: events.append(("worker", index)))
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: events.append("atexit"))
    monkeypatch.setattr(launch.logging, "shutdown", lambda: events.append("logging"))  # not pytest's handlers

    def fake_exit(code):
        events.append(("exit", code))
        raise SystemExit(code)

    monkeypatch.setattr(launch.os, "_exit", fake_exit)
    with pytest.raises(SystemExit):
        launch.spawned_worker(1, None, None, {})
    assert events == [("worker", 1), "logging", "atexit", ("exit", 0)]

    def failing(index, main, cfg, kwargs):
        raise RuntimeError("boom")

    events.clear()
    monkeypatch.setattr(launch, "run_worker", failing)
    with pytest.raises(RuntimeError, match="boom"):
        launch.spawned_worker(0, None, None, {})
    assert events == []

