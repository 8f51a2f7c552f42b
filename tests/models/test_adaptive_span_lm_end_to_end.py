"""The adaptive-span user flow in process on a generated corpus: fairseq-preprocess -> fairseq-train --task
streaming_lm --arch adaptive_span_tiny --optimizer adagrad_clip (caches carried across batches, span statistics
logged, z clamped after every step, also under --fp16) -> fairseq-eval-lm streaming, whose result does not depend
on the segment length (each token sees the same L previous positions) -> generation through fairseq-interactive."""
import logging
import os
import subprocess
import sys

import pytest
import torch
from fairseq import checkpoint_utils

from tests.harness import (USER_DIR, fairseq_preprocess, fairseq_train, random_corpus, split_token_count,
                           streaming_eval_lm)

pytestmark = pytest.mark.slow


def train_args(data, save_dir, *extra):
    return [data, "--user-dir", USER_DIR, "--task", "streaming_lm", "--arch", "adaptive_span_tiny",
            "--tokens-per-sample", "12", "--batch-size", "4", "--dropout", "0.1", "--criterion", "lm_loss",
            "--optimizer", "adagrad_clip", "--adagrad-clip", "0.03", "--lr", "0.07", "--lr-scheduler", "fixed",
            "--warmup-updates", "2", "--save-dir", save_dir, "--no-epoch-checkpoints", "--cpu", "--num-workers", "0",
            "--seed", "1", "--no-progress-bar", "--log-format", "simple", "--log-interval", "1", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    raw = tmp_path_factory.mktemp("as-raw")
    return fairseq_preprocess(str(tmp_path_factory.mktemp("as-bin")),
                              trainpref=random_corpus(os.path.join(raw, "train.txt"), 120, seed=30),
                              validpref=random_corpus(os.path.join(raw, "valid.txt"), 60, seed=31))


def _train(args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fairseq_train(args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp("as-ckpt"))
    _train(train_args(data, save_dir, "--max-update", "8", "--adapt-span-init", "0.3"))
    return os.path.join(save_dir, "checkpoint_last.pt")


def test_streaming_eval_does_not_depend_on_the_segment_length(data, trained, caplog):
    n = split_token_count(data, "valid")
    losses = []
    for length in ("5", "12", "29"):
        loss, scored, _ = streaming_eval_lm(data, trained, caplog, "--batch-size", "3",
                                            "--tokens-per-sample", length)
        assert scored == n
        losses.append(loss)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)


def test_training_logs_span_statistics(data, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        _train(train_args(data, str(tmp_path), "--max-update", "2", "--disable-validation"))
    line = [ln for ln in caplog.text.splitlines() if "train_inner" in ln or "| train |" in ln][-1]
    for key in ("span_avg", "span_max", "attn_len", "attn_mflop_tok", "aux_loss", "bits_per_token"):
        assert f" {key}=" in line, line


@pytest.mark.parametrize("coeff,bound,extra", [("10", 0.0, ()), ("-10", 1.0, ("--fp16", "--fp16-no-flatten-grads"))])
def test_z_is_clamped_after_every_step(data, tmp_path, coeff, bound, extra):
    """z starts on a bound and a huge span loss pushes it outwards at every step (by ~lr·c/||g||, Adagrad with
    per-tensor clipping); the checkpoint's z sit exactly on the bound (the fp32 z of an fp16 model included)."""
    _train(train_args(data, str(tmp_path), "--max-update", "3", "--disable-validation", "--adapt-span-init",
                      str(bound), "--adapt-span-loss", coeff, *extra))
    state = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "checkpoint_last.pt"))
    zs = [v for k, v in state["model"].items() if k.endswith("span.z")]
    assert len(zs) == 2 and all(z.dtype == torch.float32 and torch.all(z == bound) for z in zs), zs


def test_fairseq_interactive_generates(data, trained):
    exe = os.path.join(os.path.dirname(sys.executable), "fairseq-interactive")
    proc = subprocess.run([exe, data, "--user-dir", USER_DIR, "--task", "language_modeling", "--path", trained,
                           "--beam", "2", "--min-len", "20", "--max-len-b", "30", "--cpu"],
                          input="w1 w2 w3\nw4\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hypos = [line.split("\t")[2].split() for line in proc.stdout.splitlines() if line.startswith("H-")]
    assert len(hypos) == 2
    for prompt, hypo in zip((["w1", "w2", "w3"], ["w4"]), hypos):
        assert hypo[:len(prompt)] == prompt and len(hypo) >= 20
