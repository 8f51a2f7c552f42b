"""streaming_lm: contiguous streams, state handover and boundaries, exact coverage, stock-eval parity, sharding."""
import copy
import os
import shutil
from collections import defaultdict
from types import SimpleNamespace
from typing import Dict, List

import pytest
import torch
from fairseq import tasks
from fairseq.data import data_utils
from fairseq.sequence_scorer import SequenceScorer
from fairseq_cli.eval_lm import eval_lm
from torch import nn

from fairseq_ext.criterions.lm_loss import LMLossCriterion
from tests.harness import split_token_count, training_cfg
from tests.models.base.toy_lm import TOY_ARCH


def make_task(data: str, task: str = "streaming_lm", tokens_per_sample: int = 5, batch_size: int = 3,
              extra: List[str] = ()):
    cfg = training_cfg(TOY_ARCH, ["--batch-size", str(batch_size), "--tokens-per-sample", str(tokens_per_sample),
                                  *extra], task=task, data=data)
    return tasks.setup_task(cfg.task), cfg


def split_tokens(data_dir: str, split: str) -> torch.Tensor:
    lines = data_utils.load_indexed_dataset(os.path.join(data_dir, split), None)
    return torch.cat([lines[i] for i in range(len(lines))])  # (n,) every line with its </s>


def batches(task, split: str, batch_size: int, num_shards: int = 1, shard_id: int = 0, max_tokens=None) -> List:
    iterator = task.get_batch_iterator(task.dataset(split), max_tokens=max_tokens, max_sentences=batch_size,
                                       num_shards=num_shards, shard_id=shard_id)
    return list(iterator.next_epoch_itr(shuffle=True))  # shuffle is asked for and must be ignored


def no_optimizer():
    return SimpleNamespace(backward=lambda loss: loss.backward())


def one_hot_counts(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(tokens, vocab).sum(1).float()  # (B, T) -> (B, V)


def test_training_batches_continue_streams_and_hand_over_state(data_dir):
    task, cfg = make_task(data_dir, batch_size=3, tokens_per_sample=5)
    task.load_dataset("train")
    model, criterion = task.build_model(cfg.model), LMLossCriterion(task, sentence_avg=False)
    vocab = len(task.dictionary)
    task.begin_epoch(1, model)
    seen, previous, targets = torch.zeros(3, vocab), None, 0
    for sample in batches(task, "train", 3):
        source = sample["net_input"]["src_tokens"]  # (B, T)
        if previous is not None:
            assert torch.equal(source[:, 0], previous["target"][:, -1])  # each row continues its stream
        task.train_step(sample, model, criterion, no_optimizer(), update_num=0)
        seen += one_hot_counts(source, vocab)
        assert torch.equal(model.decoder.stream_state("train").counts, seen)  # state handed over, batch to batch
        targets += sample["ntokens"]
        previous = sample
    assert targets == split_token_count(data_dir, "train")


def train_some(task, model, criterion, count: int) -> None:
    for sample in batches(task, "train", 3)[:count]:
        task.train_step(sample, model, criterion, no_optimizer(), update_num=0)


def test_validation_does_not_disturb_training(data_dir):
    task, cfg = make_task(data_dir)
    for split in ("train", "valid"):
        task.load_dataset(split)
    model, criterion = task.build_model(cfg.model), LMLossCriterion(task, sentence_avg=False)
    task.begin_epoch(1, model)
    train_some(task, model, criterion, 4)
    train_state, untouched = model.decoder.stream_state("train"), copy.deepcopy(model)
    task.begin_valid_epoch(1, model)
    for sample in batches(task, "valid", 2):
        task.valid_step(sample, model, criterion)
    assert model.decoder.stream_state("train") is train_state
    assert model.decoder.stream_state("eval").counts.sum() == split_token_count(data_dir, "valid")
    following = batches(task, "train", 3)[4]
    loss = task.train_step(following, model, criterion, no_optimizer(), update_num=0)[0]
    expected = task.train_step(following, untouched, criterion, no_optimizer(), update_num=0)[0]
    assert torch.equal(loss, expected)


def test_epoch_and_validation_boundaries_reset_their_stream(data_dir):
    task, cfg = make_task(data_dir)
    for split in ("train", "valid", "test"):
        task.load_dataset(split)
    model, criterion = task.build_model(cfg.model), LMLossCriterion(task, sentence_avg=False)
    train_some(task, model, criterion, 2)
    valid = batches(task, "valid", 2)
    task.valid_step(valid[0], model, criterion)
    task.valid_step(valid[1], model, criterion)
    task.begin_epoch(2, model)
    assert model.decoder.stream_state("train") is None and model.decoder.stream_state("eval") is not None
    train_some(task, model, criterion, 1)
    task.begin_valid_epoch(2, model)
    assert model.decoder.stream_state("eval") is None and model.decoder.stream_state("train") is not None
    task.valid_step(valid[0], model, criterion)
    first_test = batches(task, "test", 2)[0]  # a second validation subset starts cold, not after "valid"
    task.valid_step(first_test, model, criterion)
    expected = one_hot_counts(first_test["net_input"]["src_tokens"], len(task.dictionary))
    assert torch.equal(model.decoder.stream_state("eval").counts, expected)


@pytest.mark.parametrize("batch_size,length", [(1, 7), (2, 8), (3, 5), (4, 64), (7, 3)])
def test_streaming_evaluation_scores_every_token_once(data_dir, batch_size, length):
    """Through fairseq's SequenceScorer (which strips end padding): the streams tile the split exactly."""
    task, cfg = make_task(data_dir, tokens_per_sample=length)
    task.load_dataset("test")
    model = task.build_model(cfg.model).eval()
    scorer, pieces = SequenceScorer(task.target_dictionary), defaultdict(list)
    for sample in task.eval_lm_dataloader(task.dataset("test"), batch_size=batch_size, num_workers=0):
        for stream, hypos in zip(sample["id"].tolist(), scorer.generate([model], sample)):
            assert hypos[0]["positional_scores"].shape == hypos[0]["tokens"].shape
            assert torch.isfinite(hypos[0]["positional_scores"]).all()
            pieces[stream].append(hypos[0]["tokens"])
    assert sorted(pieces) == list(range(batch_size))
    scored = torch.cat([torch.cat(pieces[stream]) for stream in range(batch_size)])
    assert len(scored) == split_token_count(data_dir, "test")
    assert torch.equal(scored, split_tokens(data_dir, "test"))


def streaming_loss(task, model, batch_size: int) -> float:
    iterator = task.eval_lm_dataloader(task.dataset("valid"), batch_size=batch_size, num_workers=0)
    return float(eval_lm([model], task.source_dictionary, iterator)["loss"])


@pytest.mark.parametrize("batch_size,length", [(1, 7), (2, 8), (4, 6)])
def test_stateless_streaming_equals_stock_nonoverlapping_evaluation(data_dir, batch_size, length):
    """A stateless model scored in streams == fairseq's own ``--task language_modeling --context-window 0``
    (streams of 240 / B tokens start on T-token block boundaries here); a stateful one differs."""
    stream_task, cfg = make_task(data_dir, tokens_per_sample=length, extra=["--toy-stateless"])
    stream_task.load_dataset("valid")
    stateless = stream_task.build_model(cfg.model).eval()
    lm_task, _ = make_task(data_dir, task="language_modeling", tokens_per_sample=length)
    lm_task.load_dataset("valid")
    stock = eval_lm([stateless], lm_task.source_dictionary, lm_task.eval_lm_dataloader(
        lm_task.dataset("valid"), max_tokens=1000, batch_size=3, num_workers=0, context_window=0))
    assert streaming_loss(stream_task, stateless, batch_size) == pytest.approx(float(stock["loss"]), rel=1e-6)

    stateful_task, stateful_cfg = make_task(data_dir, tokens_per_sample=length)
    stateful_task.load_dataset("valid")
    stateful = stateful_task.build_model(stateful_cfg.model).eval()
    stateful.load_state_dict(stateless.state_dict())
    assert streaming_loss(stateful_task, stateful, batch_size) != pytest.approx(float(stock["loss"]), rel=1e-3)


def test_eval_lm_dataloader_rejects_context_window_and_needs_batch_size(data_dir):
    task, _ = make_task(data_dir)
    task.load_dataset("test")
    with pytest.raises(ValueError, match="omit --context-window.*--task language_modeling --context-window"):
        task.eval_lm_dataloader(task.dataset("test"), batch_size=2, context_window=4)
    with pytest.raises(ValueError, match="--batch-size"):
        task.eval_lm_dataloader(task.dataset("test"), batch_size=None)
    with pytest.raises(ValueError, match="--batch-size"):
        task.get_batch_iterator(task.dataset("test"), max_tokens=1024, max_sentences=None)


def test_two_shards_read_disjoint_contiguous_streams(data_dir):
    task, _ = make_task(data_dir)
    task.load_dataset("train")
    pad, steps = task.dictionary.pad(), set()
    pieces: Dict[int, List[torch.Tensor]] = defaultdict(list)
    for shard in (0, 1):
        shard_batches = batches(task, "train", 3, num_shards=2, shard_id=shard)
        steps.add(len(shard_batches))
        for index, sample in enumerate(shard_batches):
            assert sample["id"].tolist() == [3 * shard, 3 * shard + 1, 3 * shard + 2]
            if index > 0:
                assert torch.equal(sample["net_input"]["src_tokens"][:, 0], shard_batches[index - 1]["target"][:, -1])
            for row, stream in enumerate(sample["id"].tolist()):
                pieces[stream].append(sample["target"][row][sample["target"][row] != pad])
    assert len(steps) == 1  # every worker takes the same number of steps
    scored = torch.cat([torch.cat(pieces[stream]) for stream in range(6)])
    assert torch.equal(scored, split_tokens(data_dir, "train"))


def test_layout_does_not_depend_on_max_tokens(data_dir):
    task, _ = make_task(data_dir)
    task.load_dataset("valid")
    reference = batches(task, "valid", 2)
    for max_tokens in (7, 10 ** 6):
        for sample, expected in zip(batches(task, "valid", 2, max_tokens=max_tokens), reference, strict=True):
            assert torch.equal(sample["target"], expected["target"])


def test_missing_data_split_and_bad_options_are_explained(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare-<corpus>.sh.*fairseq-preprocess"):
        make_task(str(tmp_path / "no-such-dir"))
    with pytest.raises(ValueError, match="--add-bos-token"):
        make_task(data_dir, extra=["--add-bos-token"])
    task, _ = make_task(data_dir)
    with pytest.raises(FileNotFoundError, match=r"'valid7' not found.*\['test', 'train', 'valid'\]"):
        task.load_dataset("valid7")


def test_dictionary_mismatch_is_refused(data_dir, other_data_dir, tmp_path):
    task, _ = make_task(data_dir)
    other, _ = make_task(other_data_dir)
    task.load_state_dict(task.state_dict())  # the same dictionary: accepted
    with pytest.raises(ValueError, match="dictionary mismatch.*--srcdict"):
        other.load_state_dict(task.state_dict())
    truncated = shutil.copytree(data_dir, tmp_path / "truncated")
    with open(truncated / "dict.txt") as f:
        head = f.readlines()[:5]
    with open(truncated / "dict.txt", "w") as f:
        f.writelines(head)
    short, _ = make_task(str(truncated))
    with pytest.raises(ValueError, match="binarised with another dictionary"):
        short.load_dataset("train")


def test_optimizer_step_clamps_declared_parameter_bounds(data_dir):
    class Clamped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.value = nn.Parameter(torch.tensor([2.0, -1.0]))

        def parameter_bounds(self):
            return [(self.value, 0.0, 1.0)]

    task, _ = make_task(data_dir)
    model, steps = nn.Sequential(nn.Sequential(Clamped())), []
    task.optimizer_step(SimpleNamespace(step=lambda: steps.append(1)), model, update_num=0)
    assert steps == [1] and model[0][0].value.tolist() == [1.0, 0.0]


def test_random_train_stream_offset_moves_boundaries_between_epochs(data_dir):
    from fairseq_ext.tasks.segment_lengths import train_stream_offset

    task, _ = make_task(data_dir, batch_size=3, tokens_per_sample=5, extra=["--train-stream-offset", "random"])
    task.load_dataset("train")
    task.load_dataset("valid")

    def first_targets(split, epoch):
        iterator = task.get_batch_iterator(task.dataset(split), max_sentences=3, epoch=epoch, seed=7)
        return next(iter(iterator.next_epoch_itr(shuffle=False)))["target"][:, 0]

    offsets = [train_stream_offset(7, epoch, 5) for epoch in range(2, 12)]
    assert all(0 <= o < 5 for o in offsets) and len(set(offsets)) > 1  # deterministic, uniform in [0, T)
    assert offsets == [train_stream_offset(7, epoch, 5) for epoch in range(2, 12)]
    epoch1 = first_targets("train", 1)
    for epoch, offset in zip(range(2, 5), offsets):
        moved = first_targets("train", epoch)
        base = task.get_batch_iterator(task.dataset("train"), max_sentences=3, epoch=1, seed=7).dataset
        assert torch.equal(moved, torch.from_numpy(base.tokens[base.stream_starts + offset].astype("int64")))
        assert torch.equal(first_targets("valid", epoch), first_targets("valid", 1))  # evaluation never moves
    plain, _ = make_task(data_dir, batch_size=3, tokens_per_sample=5)
    plain.load_dataset("train")
    iterator = plain.get_batch_iterator(plain.dataset("train"), max_sentences=3, epoch=3, seed=7)
    assert torch.equal(next(iter(iterator.next_epoch_itr(shuffle=False)))["target"][:, 0], epoch1)  # default: none


def test_variable_bptt_lengths_follow_the_sha_rnn_rule():
    """Spec check 9: over 10,000 draws with T = 1024, about 95% centred at 1024 and 5% at 512, all in [5, T]."""
    import numpy as np

    from fairseq_ext.tasks.segment_lengths import sample_bptt_lengths

    lengths = sample_bptt_lengths(np.random.default_rng(1234), 1024, 10_000)  # (10000,)
    assert lengths.shape == (10_000,) and lengths.dtype == np.int64
    assert lengths.min() >= 5 and lengths.max() <= 1024
    full, half = lengths[lengths > 768], lengths[lengths <= 768]
    assert len(full) / 10_000 == pytest.approx(0.95, abs=0.01)
    assert len(half) / 10_000 == pytest.approx(0.05, abs=0.01)
    assert half.mean() == pytest.approx(512, abs=1.0) and 3.5 < half.std() < 6.5  # N(512, 5), rounded
    assert full.min() > 1024 - 40 and (full == 1024).mean() == pytest.approx(0.5, abs=0.03)  # N(1024, 5) clipped at T
    assert np.array_equal(np.unique(sample_bptt_lengths(np.random.default_rng(0), 4, 100)), [4])  # T < 5: T


def test_variable_bptt_lengths_are_deterministic_per_seed_and_epoch():
    import numpy as np

    from fairseq_ext.tasks.segment_lengths import variable_bptt_lengths

    lengths = variable_bptt_lengths(7, 3, 64, 10_000)  # (m,)
    assert lengths.sum() >= 10_000 and lengths.min() >= 5 and lengths.max() <= 64
    assert np.array_equal(lengths, variable_bptt_lengths(7, 3, 64, 10_000))  # every worker, and on resume
    assert not np.array_equal(lengths[:50], variable_bptt_lengths(7, 4, 64, 10_000)[:50])  # another epoch
    assert not np.array_equal(lengths[:50], variable_bptt_lengths(8, 3, 64, 10_000)[:50])  # another seed
    assert len(variable_bptt_lengths(7, 3, 64, 0)) == 0


def test_variable_bptt_varies_training_segments_only_and_streams_stay_continuous(data_dir):
    from fairseq_ext.tasks.segment_lengths import variable_bptt_lengths

    length = 12
    task, cfg = make_task(data_dir, batch_size=3, tokens_per_sample=length, extra=["--variable-bptt"])
    assert cfg.task.variable_bptt is True and make_task(data_dir)[1].task.variable_bptt is False
    for split in ("train", "valid", "test"):
        task.load_dataset(split)
    model, criterion = task.build_model(cfg.model), LMLossCriterion(task, sentence_avg=False)
    vocab = len(task.dictionary)

    def epoch_batches(split: str, epoch: int, seed: int = 7, num_shards: int = 1, shard_id: int = 0) -> List:
        iterator = task.get_batch_iterator(task.dataset(split), max_sentences=3, epoch=epoch, seed=seed,
                                           num_shards=num_shards, shard_id=shard_id)
        return list(iterator.next_epoch_itr(shuffle=False))

    widths = {}
    for epoch in (1, 2):
        task.begin_epoch(epoch, model)
        seen, previous, targets, pieces = torch.zeros(3, vocab), None, 0, defaultdict(list)
        samples = epoch_batches("train", epoch)
        widths[epoch] = [s["target"].size(1) for s in samples]
        assert all(5 <= w <= length for w in widths[epoch][:-1]) and 1 <= widths[epoch][-1] <= length
        stream_length = task.get_batch_iterator(task.dataset("train"), max_sentences=3).dataset.max_stream_length
        expected = variable_bptt_lengths(7, epoch, length, stream_length)
        assert widths[epoch][:-1] == expected[:len(samples) - 1].tolist()
        for sample in samples:
            source = sample["net_input"]["src_tokens"]  # (B, T_j): every row of the batch is T_j wide
            if previous is not None:
                assert torch.equal(source[:, 0], previous["target"][:, -1])  # each row continues its stream
            task.train_step(sample, model, criterion, no_optimizer(), update_num=0)
            seen += one_hot_counts(source, vocab)
            assert torch.equal(model.decoder.stream_state("train").counts, seen)  # state carried across lengths
            for row, stream in enumerate(sample["id"].tolist()):
                pieces[stream].append(sample["target"][row][sample["target"][row] != task.dictionary.pad()])
            targets += sample["ntokens"]
            previous = sample
        assert targets == split_token_count(data_dir, "train")
        scored = torch.cat([torch.cat(pieces[stream]) for stream in range(3)])
        assert torch.equal(scored, split_tokens(data_dir, "train"))  # every target exactly once, in order
        assert [s["target"].size(1) for s in epoch_batches("train", epoch)] == widths[epoch]  # rebuilt: same
    assert widths[1] != widths[2] and len(set(widths[1][:-1])) > 1  # lengths vary, and differ across epochs
    shard_widths = [[s["target"].size(1) for s in epoch_batches("train", 1, num_shards=2, shard_id=shard)]
                    for shard in (0, 1)]
    assert shard_widths[0] == shard_widths[1] and len(set(shard_widths[0][:-1])) > 1  # every worker: same lengths
    for split in ("valid", "test"):  # validation and evaluation never vary
        assert {s["target"].size(1) for s in epoch_batches(split, 2)[:-1]} == {length}
    evaluated = list(task.eval_lm_dataloader(task.dataset("train"), batch_size=3, num_workers=0))
    assert {s["target"].size(1) for s in evaluated[:-1]} == {length}  # fairseq-eval-lm even on the train split
    assert task.dataset("train").segment_lengths is None  # the loaded dataset is untouched
