"""streaming_lm --eval-warmup-tokens: NVIDIA's Transformer-XL warm-up protocol next to the cold one.

Every stream is prefixed with the text preceding it; those segments fill the state and score nothing, every token
is still scored exactly once, training never gets a warm-up, and a model that uses its state scores differently.
"""
import logging
import math
import os
import re
from collections import defaultdict
from typing import Dict, List, Tuple

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.logging import metrics
from fairseq.sequence_scorer import SequenceScorer
from fairseq_cli.eval_lm import eval_lm

from fairseq_ext.criterions.lm_loss import LMLossCriterion
from fairseq_ext.state import state_from_plain
from tests.harness import USER_DIR, fairseq_eval_lm, fairseq_train, split_token_count
from tests.models.base.toy_lm import TOY_ARCH
from tests.tasks.test_streaming_lm import batches, make_task, one_hot_counts, split_tokens


def warm_task(data: str, warmup: int, tokens_per_sample: int = 5, extra: Tuple[str, ...] = ()):
    return make_task(data, tokens_per_sample=tokens_per_sample,
                     extra=["--eval-warmup-tokens", str(warmup), *extra])


@pytest.mark.parametrize("requested,length,expected", [(0, 5, 0), (12, 5, 15), (15, 5, 15), (1, 8, 8), (640, 64, 640)])
def test_warmup_is_rounded_up_to_whole_segments(data_dir, caplog, requested, length, expected):
    with caplog.at_level(logging.INFO, logger="fairseq_ext.tasks.streaming_lm"):
        task, cfg = warm_task(data_dir, requested, tokens_per_sample=length)
    assert cfg.task.eval_warmup_tokens == requested and task.eval_warmup_tokens == expected
    if expected:
        assert f"--eval-warmup-tokens {requested} rounded up to {expected}" in caplog.text
    if expected <= 240:  # the valid split's length
        task.load_dataset("valid")
        assert task.dataset("valid").warmup_tokens == expected


def test_negative_or_too_long_warmup_is_explained(data_dir):
    with pytest.raises(ValueError, match=r"--eval-warmup-tokens must be >= 0, got -1.*mem_len"):
        warm_task(data_dir, -1)
    task, _ = warm_task(data_dir, 241)  # the valid split has 240 tokens
    with pytest.raises(ValueError, match=r"--eval-warmup-tokens 245 .*exceeds valid \(240 tokens\).*lower "
                                         r"--eval-warmup-tokens"):
        task.load_dataset("valid")
    task.load_dataset("train")  # the training split never gets a warm-up, so nothing to refuse


def test_training_subset_never_gets_a_warmup(data_dir):
    task, _ = warm_task(data_dir, 10)
    cold, _ = make_task(data_dir)
    for split in ("train", "valid", "test"):
        task.load_dataset(split)
        cold.load_dataset(split)
    assert [task.dataset(split).warmup_tokens for split in ("train", "valid", "test")] == [0, 10, 10]
    for sample, expected in zip(batches(task, "train", 3), batches(cold, "train", 3), strict=True):
        assert not sample["warmup"]
        assert torch.equal(sample["net_input"]["src_tokens"], expected["net_input"]["src_tokens"])
        assert torch.equal(sample["target"], expected["target"])
    renamed, _ = warm_task(data_dir, 10, extra=("--train-subset", "valid"))  # --train-subset names the split
    for split in ("train", "valid"):
        renamed.load_dataset(split)
    assert renamed.dataset("valid").warmup_tokens == 0 and renamed.dataset("train").warmup_tokens == 10


def scored_pieces(task, model, batch_size: int, num_shards: int = 1) -> Tuple[Dict[int, List[torch.Tensor]], int]:
    """Target tokens SequenceScorer scores for every stream (through eval_lm_dataloader), and the warm-up batches."""
    scorer, pieces, warmups = SequenceScorer(task.target_dictionary), defaultdict(list), 0
    for shard in range(num_shards):
        for sample in task.eval_lm_dataloader(task.dataset("test"), batch_size=batch_size, num_shards=num_shards,
                                              shard_id=shard, num_workers=0):
            hypos = scorer.generate([model], sample)
            warmups += int(sample["warmup"])
            for stream, hypo in zip(sample["id"].tolist(), hypos):
                assert torch.isfinite(hypo[0]["positional_scores"]).all()
                if sample["warmup"]:
                    assert hypo[0]["tokens"].numel() == 0  # pad targets: nothing scored
                pieces[stream].append(hypo[0]["tokens"])
    return pieces, warmups


@pytest.mark.parametrize("batch_size,length,warmup,shards", [(1, 7, 7, 1), (2, 8, 20, 1), (3, 5, 5, 2),
                                                             (4, 6, 30, 2)])
def test_eval_lm_scores_every_token_once_under_warmup(data_dir, batch_size, length, warmup, shards):
    task, cfg = warm_task(data_dir, warmup, tokens_per_sample=length)
    task.load_dataset("test")
    model = task.build_model(cfg.model).eval()
    pieces, warmups = scored_pieces(task, model, batch_size, shards)
    assert warmups == shards * math.ceil(warmup / length)
    assert sorted(pieces) == list(range(batch_size * shards))
    scored = torch.cat([torch.cat(pieces[stream]) for stream in range(batch_size * shards)])
    assert len(scored) == split_token_count(data_dir, "test")
    assert torch.equal(scored, split_tokens(data_dir, "test"))


def test_eval_lm_dataloader_applies_the_warmup_to_any_split_and_logs_the_protocol(data_dir, caplog):
    task, _ = warm_task(data_dir, 8, tokens_per_sample=4)
    task.load_dataset("train")  # fairseq-eval-lm --gen-subset train: still an evaluation, so warmed up
    with caplog.at_level(logging.INFO, logger="fairseq_ext.tasks.streaming_lm"):
        samples = list(task.eval_lm_dataloader(task.dataset("train"), batch_size=3, num_workers=0))
    assert [sample["warmup"] for sample in samples[:3]] == [True, True, False]
    assert "evaluation protocol: stream(B=3, T=4, warm-up 8 tokens unscored)" in caplog.text
    cold, _ = make_task(data_dir, tokens_per_sample=4)
    cold.load_dataset("valid")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fairseq_ext.tasks.streaming_lm"):
        batches(cold, "valid", 2, num_shards=2)
    assert "valid: evaluation protocol stream(B=4, T=4, cold)" in caplog.text  # B counts the streams of all shards


def streaming_loss(task, model, batch_size: int) -> float:
    iterator = task.eval_lm_dataloader(task.dataset("valid"), batch_size=batch_size, num_workers=0)
    return float(eval_lm([model], task.source_dictionary, iterator)["loss"])


@pytest.mark.parametrize("batch_size,length,warmup", [(1, 7, 14), (2, 8, 10), (4, 6, 6)])
def test_warmup_changes_only_what_a_stateful_model_sees(data_dir, batch_size, length, warmup):
    """A stateless model scores the same positions with the same context either way; a stateful one differs."""
    losses = {}
    for stateless in (True, False):
        extra = ("--toy-stateless",) if stateless else ()
        warm, cfg = warm_task(data_dir, warmup, tokens_per_sample=length, extra=extra)
        cold, _ = make_task(data_dir, tokens_per_sample=length, extra=list(extra))
        warm.load_dataset("valid")
        cold.load_dataset("valid")
        torch.manual_seed(0)
        model = warm.build_model(cfg.model).eval()
        losses[stateless] = streaming_loss(warm, model, batch_size), streaming_loss(cold, model, batch_size)
    assert losses[True][0] == pytest.approx(losses[True][1], rel=1e-6)
    assert losses[False][0] != pytest.approx(losses[False][1], rel=1e-4)


def test_valid_step_fills_the_state_in_the_warmup_and_scores_every_token_once(data_dir):
    """Validation through the task: warm-up steps run the model (the eval state counts their inputs) but report
    no tokens; the summed NLL equals fairseq's eval_lm over the same layout; the training state is untouched."""
    task, cfg = warm_task(data_dir, 10)
    task.load_dataset("valid")
    model, criterion = task.build_model(cfg.model), LMLossCriterion(task, sentence_avg=False)
    vocab, nll, ntokens, seen = len(task.dictionary), 0.0, 0, torch.zeros(2, len(task.dictionary))
    task.begin_valid_epoch(1, model)
    samples = batches(task, "valid", 2)
    for sample in samples:
        loss, sample_size, log = task.valid_step(sample, model, criterion)
        seen += one_hot_counts(sample["net_input"]["src_tokens"], vocab)
        assert torch.equal(model.decoder.stream_state("eval").counts, seen)  # warm-up inputs are in the state
        if sample["warmup"]:
            assert sample_size == 0 and float(loss) == 0.0 and log["ntokens"] == 0
        else:
            nll, ntokens = nll + float(log["nll_loss"]), ntokens + log["ntokens"]
    assert [sample["warmup"] for sample in samples[:3]] == [True, True, False]
    assert ntokens == split_token_count(data_dir, "valid")
    assert model.decoder.stream_state("train") is None
    model.reset_state("eval")  # eval_lm has no boundary hook: fairseq-eval-lm starts from a fresh model
    expected = eval_lm([model.eval()], task.source_dictionary,
                       task.eval_lm_dataloader(task.dataset("valid"), batch_size=2, num_workers=0))
    assert nll / ntokens / math.log(2) == pytest.approx(float(expected["loss"]), rel=1e-5)


def test_warmup_steps_log_no_loss_into_the_validation_average(data_dir):
    """fairseq's trainer logs loss = -1 (weight 1) after a step whose reduce_metrics logged no ``loss``; warm-up
    steps log a weightless one instead, so the validation loss is the average over scored tokens only."""
    task, cfg = warm_task(data_dir, 10)
    task.load_dataset("valid")
    model, criterion = task.build_model(cfg.model), LMLossCriterion(task, sentence_avg=False)
    task.begin_valid_epoch(1, model)
    nll, ntokens = 0.0, 0
    with metrics.aggregate(new_root=True) as valid:
        for sample in batches(task, "valid", 2):
            _, _, log = task.valid_step(sample, model, criterion)
            with metrics.aggregate() as step:  # as fairseq's Trainer._reduce_and_log_stats
                task.reduce_metrics([log], criterion)
                assert "loss" in step
            nll, ntokens = nll + float(log.get("nll_loss", 0.0)), ntokens + log["ntokens"]
    assert valid["loss"].count == ntokens == split_token_count(data_dir, "valid")
    assert valid["loss"].avg == pytest.approx(nll / ntokens / math.log(2), rel=1e-6)


# ======================================================================================================================
# in process, as a user would run it: fairseq-train (validation with the warm-up) -> fairseq-eval-lm
# ======================================================================================================================

B, B_VALID, T, WARMUP = 4, 8, 8, 36  # WARMUP rounds up to 40 = five segments; validation streams of 30 tokens


def train_args(data: str, save_dir: str, *extra: str) -> List[str]:
    return [data, "--user-dir", USER_DIR, "--task", "streaming_lm", "--arch", TOY_ARCH, "--criterion", "lm_loss",
            "--optimizer", "adam", "--lr", "0.01", "--batch-size", str(B), "--batch-size-valid", str(B_VALID),
            "--tokens-per-sample", str(T),
            "--max-epoch", "1", "--valid-subset", "valid,test", "--save-dir", save_dir, "--no-epoch-checkpoints",
            "--cpu", "--num-workers", "0", "--seed", "1", "--no-progress-bar", "--log-format", "simple", *extra]


@pytest.fixture(scope="module")
def checkpoints(data_dir, tmp_path_factory) -> Dict[str, str]:
    paths = {}
    for name, extra in (("cold", ()), ("warm", ("--eval-warmup-tokens", str(WARMUP)))):
        save_dir = str(tmp_path_factory.mktemp(f"checkpoints-{name}"))
        fairseq_train(train_args(data_dir, save_dir, *extra))
        paths[name] = os.path.join(save_dir, "checkpoint_last.pt")
    return paths


@pytest.mark.slow
def test_training_is_unaffected_and_validation_uses_the_warmup(checkpoints, data_dir):
    cold, warm = (checkpoint_utils.load_checkpoint_to_cpu(checkpoints[name]) for name in ("cold", "warm"))
    assert cold["model"].keys() == warm["model"].keys()
    for key in cold["model"]:  # validation (with or without warm-up) never changes what training does
        a, b = cold["model"][key], warm["model"][key]
        if not torch.is_tensor(a):  # the decoder's extra state: the training streams' memory
            a, b = (list(state_from_plain(x["train"]).tensors()) for x in (a, b))
            assert len(a) == len(b) > 0
            assert all(torch.equal(x, y) for x, y in zip(a, b)), key
            continue
        assert torch.equal(a, b), key
    losses = {}
    for name, warmup in (("cold", 0), ("warm", WARMUP)):  # the validation loss fairseq-train logged, recomputed
        task, cfg = warm_task(data_dir, warmup, tokens_per_sample=T)
        task.load_dataset("valid")
        models, _ = checkpoint_utils.load_model_ensemble([checkpoints["cold"]], task=task)
        model, criterion = models[0], LMLossCriterion(task, sentence_avg=False)
        task.begin_valid_epoch(1, model)
        nll, ntokens = 0.0, 0
        for sample in batches(task, "valid", B_VALID):
            _, _, log = task.valid_step(sample, model, criterion)
            nll, ntokens = nll + float(log.get("nll_loss", 0.0)), ntokens + log["ntokens"]
        assert ntokens == split_token_count(data_dir, "valid")
        losses[name] = nll / ntokens / math.log(2)
    for name, state in (("cold", cold), ("warm", warm)):
        assert state["extra_state"]["val_loss"] == pytest.approx(losses[name], abs=1e-3)  # logged rounded to 3
    assert abs(losses["warm"] - losses["cold"]) > 5e-3  # far enough apart to tell which one was logged


def eval_lm_run(data: str, checkpoint: str, caplog, *extra: str) -> Tuple[float, int]:
    """fairseq-eval-lm on the test split: (loss in bits per token, tokens it says it evaluated)."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        result = fairseq_eval_lm([data, "--user-dir", USER_DIR, "--task", "streaming_lm", "--path", checkpoint,
                                  "--gen-subset", "test", "--batch-size", "2", "--tokens-per-sample", str(T),
                                  "--cpu", "--num-workers", "0", "--no-progress-bar", *extra])
    evaluated = re.search(r"Evaluated ([\d,]+) tokens", caplog.text)
    assert evaluated is not None, caplog.text[-2000:]
    return float(result["loss"]), int(evaluated.group(1).replace(",", ""))


@pytest.mark.slow
def test_eval_lm_with_warmup_scores_the_same_tokens_with_another_loss(checkpoints, data_dir, caplog):
    cold_loss, cold_tokens = eval_lm_run(data_dir, checkpoints["warm"], caplog)
    assert "evaluation protocol: stream(B=2, T=8, cold)" in caplog.text
    warm_loss, warm_tokens = eval_lm_run(data_dir, checkpoints["warm"], caplog, "--eval-warmup-tokens", str(WARMUP))
    assert "evaluation protocol: stream(B=2, T=8, warm-up 40 tokens unscored)" in caplog.text
    assert cold_tokens == warm_tokens == split_token_count(data_dir, "test")
    assert warm_loss != pytest.approx(cold_loss, abs=1e-3)
