"""The ALiBi user flow in process: fairseq-preprocess -> fairseq-train --task language_modeling --arch alibi_lm_*
-> fairseq-eval-lm at 4x the training length (non-overlapping and sliding window), with no --model-overrides.
Spec acceptance checks 6 and 11 on a generated corpus; eval-lm's number is recomputed by hand from the checkpoint."""
import logging
import math
import os
import re

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_ext.models.alibi_lm import AlibiLanguageModel
from tests.harness import (USER_DIR, fairseq_eval_lm, fairseq_preprocess, fairseq_train, random_corpus,
                           split_token_count)

pytestmark = pytest.mark.slow
TRAIN_L = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    raw = tmp_path_factory.mktemp("alibi-raw")
    data = fairseq_preprocess(str(tmp_path_factory.mktemp("alibi-bin")),
                              trainpref=random_corpus(os.path.join(raw, "train.txt"), 80, seed=10),
                              validpref=random_corpus(os.path.join(raw, "valid.txt"), 25, seed=11))
    save_dir = str(tmp_path_factory.mktemp("alibi-ckpt"))
    torch.set_num_threads(1)
    fairseq_train([data, "--user-dir", USER_DIR, "--task", "language_modeling", "--arch", "alibi_lm_tiny",
                   "--tokens-per-sample", str(TRAIN_L), "--sample-break-mode", "none", "--max-tokens", "128",
                   "--max-update", "8", "--optimizer", "adam", "--lr", "0.005", "--criterion", "cross_entropy",
                   "--save-dir", save_dir, "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--seed", "1",
                   "--no-progress-bar", "--log-format", "simple"])
    return data, os.path.join(save_dir, "checkpoint_last.pt")


def eval_lm(data, ckpt, caplog, *extra):
    args = [data, "--user-dir", USER_DIR, "--path", ckpt, "--gen-subset", "valid", "--cpu", "--num-workers", "0",
            "--no-progress-bar", "--max-tokens", "1024", *extra]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fairseq_cli.eval_lm"):
        result = fairseq_eval_lm(args)
    scored = int(re.search(r"Evaluated ([0-9,]+) tokens", caplog.text).group(1).replace(",", ""))
    return float(result["loss"]), scored


def hand_nonoverlap_loss(data, ckpt, length):
    """Blocks of `length` targets; each block's input starts with the token before it (eos for the first)."""
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([ckpt], arg_overrides={"data": data})
    model = models[0].eval()
    assert isinstance(model, AlibiLanguageModel)
    task.load_dataset("valid")
    lines = task.datasets["valid"].dataset.dataset  # the binarised lines, each ending in </s>
    stream = torch.cat([lines[i] for i in range(len(lines))])  # (N,)
    inputs = torch.cat([torch.tensor([task.dictionary.eos()]), stream[:-1]])  # (N,)
    nll = 0.0
    with torch.no_grad():
        for start in range(0, len(stream), length):
            x, y = inputs[start:start + length][None], stream[start:start + length][None]  # (1, L)
            lprobs = model.get_normalized_probs(model(x), log_probs=True)  # (1, L, V)
            nll -= lprobs.gather(-1, y[..., None]).sum().item()
    return nll / len(stream) / math.log(2), len(stream)


def test_train_short_evaluate_4x_longer_without_overrides(trained, caplog):
    data, ckpt = trained
    n = split_token_count(data, "valid")
    loss, scored = eval_lm(data, ckpt, caplog, "--tokens-per-sample", str(4 * TRAIN_L), "--context-window", "0")
    assert scored == n
    expected, count = hand_nonoverlap_loss(data, ckpt, 4 * TRAIN_L)
    assert count == n
    assert loss == pytest.approx(expected, rel=1e-4)


def test_sliding_window_scores_every_target_once(trained, caplog):
    data, ckpt = trained
    n = split_token_count(data, "valid")
    for stride in (1, 8):  # sliding(L=4*TRAIN_L, S): --context-window L - S
        loss, scored = eval_lm(data, ckpt, caplog, "--tokens-per-sample", str(4 * TRAIN_L),
                               "--context-window", str(4 * TRAIN_L - stride))
        assert scored == n
        assert math.isfinite(loss)
