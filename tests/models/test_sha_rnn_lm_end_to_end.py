"""The SHA-RNN user flow in process on a generated corpus: fairseq-preprocess -> fairseq-train --task streaming_lm
--arch sha_rnn_tiny --optimizer lamb_torch --min-trust 0.25 (LSTM state and attention memory carried across
batches) -> fairseq-eval-lm streaming. With the memory window widened past the stream length
(``--model-overrides``) nothing is ever trimmed, so the streaming result equals one pass over each whole stream
for any segment length."""
import os

import pytest
import torch
from fairseq import checkpoint_utils

from tests.harness import (USER_DIR, fairseq_preprocess, fairseq_train, random_corpus, split_token_count,
                           streaming_eval_lm, whole_stream_loss)

pytestmark = pytest.mark.slow


def train_args(data, save_dir, *extra):
    return [data, "--user-dir", USER_DIR, "--task", "streaming_lm", "--arch", "sha_rnn_tiny",
            "--tokens-per-sample", "12", "--batch-size", "4", "--criterion", "lm_loss",
            "--optimizer", "lamb_torch", "--min-trust", "0.25", "--trust-denominator", "update_norm",
            "--weight-decay", "1.2e-6", "--lr", "0.002", "--lr-scheduler", "fixed", "--warmup-updates", "2",
            "--save-dir", save_dir, "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--seed", "1",
            "--no-progress-bar", "--log-format", "simple", "--log-interval", "1", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    raw = tmp_path_factory.mktemp("sha-raw")
    return fairseq_preprocess(str(tmp_path_factory.mktemp("sha-bin")),
                              trainpref=random_corpus(os.path.join(raw, "train.txt"), 120, seed=40),
                              validpref=random_corpus(os.path.join(raw, "valid.txt"), 60, seed=41))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp("sha-ckpt"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fairseq_train(train_args(data, save_dir, "--max-update", "8"))
    finally:
        torch.set_num_threads(threads)
    return os.path.join(save_dir, "checkpoint_last.pt")


def test_streaming_eval_scores_every_token(data, trained, caplog):
    loss, scored, _ = streaming_eval_lm(data, trained, caplog, "--batch-size", "3", "--tokens-per-sample", "12")
    assert scored == split_token_count(data, "valid") and 0 < loss < 10


def test_untrimmed_streaming_eval_equals_one_pass(data, trained, caplog):
    overrides = ("--model-overrides", "{'max_memory': 100000}")
    losses = [streaming_eval_lm(data, trained, caplog, "--batch-size", "3", "--tokens-per-sample", length,
                                *overrides)[0] for length in ("5", "29")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [trained], arg_overrides={"data": data, "max_memory": 100000})
    model = models[0].eval()
    assert whole_stream_loss(model, task.dictionary, data, 3) == pytest.approx(losses[0], rel=1e-4)
