"""The fast-weight user flows in process on a generated corpus (spec fast_weights.md §1.7, §4):

* carry-over: fairseq-train --task streaming_lm --arch fast_weight_tiny --carry-over-fast-weight --no-pos (fast
  weights carried across batches, truncated BPTT) -> fairseq-eval-lm streaming, which with no_pos equals reading each
  stream in one pass; checkpoint round trip;
* the paper's limited-context protocol: a non-carry model trained with fairseq's language_modeling task and
  evaluated with ``fairseq-eval-lm --context-window`` (sliding window), every token scored once.
"""
import math
import os

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_ext.models.fast_weight_lm import FastWeightLanguageModel
from fairseq_ext.state import DecoderState, state_from_plain
from tests.harness import (USER_DIR, fairseq_eval_lm, fairseq_preprocess, fairseq_train, random_corpus,
                           split_token_count, streaming_eval_lm)
from tests.harness import whole_stream_loss as harness_whole_stream_loss

pytestmark = pytest.mark.slow
COMMON = ["--user-dir", USER_DIR, "--arch", "fast_weight_tiny", "--tokens-per-sample", "12", "--batch-size", "4",
          "--max-update", "6", "--optimizer", "adam", "--lr", "0.003", "--criterion", "lm_loss", "--clip-norm", "0.25",
          "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--seed", "1", "--no-progress-bar",
          "--log-format", "simple"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    raw = tmp_path_factory.mktemp("fwp-raw")
    return fairseq_preprocess(str(tmp_path_factory.mktemp("fwp-bin")),
                              trainpref=random_corpus(os.path.join(raw, "train.txt"), 120, seed=30),
                              validpref=random_corpus(os.path.join(raw, "valid.txt"), 60, seed=31))


def train(data, save_dir, extra):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fairseq_train([data, *COMMON, "--save-dir", save_dir, *extra])
    finally:
        torch.set_num_threads(threads)
    return os.path.join(save_dir, "checkpoint_last.pt")


@pytest.fixture(scope="module")
def carry_ckpt(data, tmp_path_factory):
    return train(data, str(tmp_path_factory.mktemp("fwp-carry")),
                 ["--task", "streaming_lm", "--carry-over-fast-weight", "--no-pos", "--fwp-normalize", "output"])


@pytest.fixture(scope="module")
def window_ckpt(data, tmp_path_factory):
    return train(data, str(tmp_path_factory.mktemp("fwp-window")),
                 ["--task", "language_modeling", "--sample-break-mode", "none"])


def load(data, ckpt):
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([ckpt], arg_overrides={"data": data})
    model = models[0].eval()
    assert isinstance(model, FastWeightLanguageModel)
    return model, task


def whole_stream_loss(data, ckpt, num_streams):
    """Bits/token when each of the B streams is read in ONE forward pass (carry-over with no_pos = one pass)."""
    model, task = load(data, ckpt)
    return harness_whole_stream_loss(model, task.dictionary, data, num_streams)


def test_carry_over_training_saves_the_fast_weights(data, carry_ckpt):
    state = checkpoint_utils.load_checkpoint_to_cpu(carry_ckpt)
    extra = state["model"]["decoder._extra_state"]
    assert extra["train_segments"] > 0
    carried = state_from_plain(extra["train"])
    assert isinstance(carried, DecoderState) and carried.batch_size == 4
    assert carried.layers[0].weight.shape == (4, 4, 8, 8) and carried.layers[0].weight.dtype == torch.float32


@pytest.mark.parametrize("batch,tps", [(3, 8), (1, 5)])
def test_streaming_eval_of_carry_over_equals_one_pass_per_stream(data, carry_ckpt, caplog, batch, tps):
    """Carried fast weights and key sums across segments of any length == each stream read at once."""
    n = split_token_count(data, "valid")
    loss, scored, log = streaming_eval_lm(data, carry_ckpt, caplog, "--batch-size", str(batch),
                                          "--tokens-per-sample", str(tps))
    assert scored == n and f"stream(B={batch}, T={tps}" in log
    assert loss == pytest.approx(whole_stream_loss(data, carry_ckpt, batch), rel=1e-5)


def test_carry_over_rejects_the_sliding_window(data, carry_ckpt, caplog):
    with pytest.raises(ValueError, match="streaming"):
        streaming_eval_lm(data, carry_ckpt, caplog, "--batch-size", "2", "--tokens-per-sample", "8",
                          "--context-window", "4")


def test_checkpoint_reload_gives_identical_logits(data, carry_ckpt):
    model, _ = load(data, carry_ckpt)
    again, _ = load(data, carry_ckpt)
    x = torch.randint(4, 24, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x)[0], again(x)[0])


def eval_lm_window(data, ckpt, window, tps=8):
    args = [data, "--user-dir", USER_DIR, "--path", ckpt, "--task", "language_modeling", "--gen-subset", "valid",
            "--cpu", "--num-workers", "0", "--no-progress-bar", "--tokens-per-sample", str(tps), "--batch-size", "4",
            "--sample-break-mode", "none", "--context-window", str(window)]
    return float(fairseq_eval_lm(args)["loss"])


def test_sliding_window_eval_of_a_non_carry_model(data, window_ckpt):
    """The paper's protocol for limited-context models runs through fairseq-eval-lm --context-window; it gives a
    different number from non-overlapping blocks."""
    sliding = eval_lm_window(data, window_ckpt, 7)
    blocks = eval_lm_window(data, window_ckpt, 0)
    assert math.isfinite(sliding) and math.isfinite(blocks) and sliding != blocks
    model, _ = load(data, window_ckpt)
    assert model.decoder.stream_state("eval") is None  # stateless: nothing carried between windows
