"""streaming_lm --batch-split K: K row slices per training batch == K = 1 (losses, gradients, carried state), also
through fairseq's Trainer with --update-freq 2; the slicing helpers; K > B is refused with the fix named."""
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from fairseq import models, tasks
from fairseq.trainer import Trainer

from fairseq_ext.criterions.lm_loss import STAT_COUNT, LMLossCriterion
from fairseq_ext.models.base import StatefulDecoder
from fairseq_ext.tasks.batch_split import merge_slice_logging_outputs, row_slices, sample_rows
from tests.harness import assert_close, training_cfg

B, T, BATCHES = 5, 6, 3
# memory models, tiny, dropout 0; adaptive span only once its model is registered (added by a parallel change)
ARCH_ARGS: Dict[str, List[str]] = {
    "transformer_xl_tiny": ["--decoder-layers", "2", "--decoder-embed-dim", "16", "--decoder-attention-heads", "2",
                            "--decoder-ffn-embed-dim", "24", "--mem-len", "8", "--attn-impl", "naive"],
    "adaptive_span_tiny": ["--decoder-layers", "2", "--decoder-embed-dim", "16", "--decoder-attention-heads", "2",
                           "--decoder-ffn-embed-dim", "24", "--attn-span", "12", "--adapt-span-ramp", "4",
                           "--adapt-span-init", "0.5", "--adapt-span-loss", "0.01",
                           "--adaptive-softmax-cutoff", "12"],  # fp64 end to end (full softmax: fp32)
}
ARCHS = [arch for arch in ARCH_ARGS if arch in models.ARCH_MODEL_REGISTRY]


def setup(data_dir: str, arch: str, batch_split: int, extra: Sequence[str] = (), dtype=torch.float64):
    cfg = training_cfg(arch, ["--batch-size", str(B), "--tokens-per-sample", str(T), "--dropout", "0",
                              "--batch-split", str(batch_split), "--criterion", "lm_loss", *ARCH_ARGS[arch], *extra],
                       task="streaming_lm", data=data_dir)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    torch.manual_seed(0)
    model = task.build_model(cfg.model).to(dtype)
    return cfg, task, model, LMLossCriterion(task, sentence_avg=False)


def train_batches(task, count: int) -> List[dict]:
    iterator = task.get_batch_iterator(task.dataset("train"), max_sentences=B)
    batches = list(iterator.next_epoch_itr(shuffle=False))[:count]
    assert len(batches) == count and batches[0]["net_input"]["src_tokens"].shape == (B, T)
    return batches


def decoder_of(model) -> StatefulDecoder:
    return next(m for m in model.modules() if isinstance(m, StatefulDecoder))


def run(data_dir: str, arch: str, batch_split: int) -> Tuple[list, list, list, object]:
    """Three consecutive batches, state carried, no parameter update: per batch (loss, sample size, gradients)."""
    _, task, model, criterion = setup(data_dir, arch, batch_split)
    optimizer = SimpleNamespace(backward=lambda loss: loss.backward())
    task.begin_epoch(1, model)
    losses, sizes, grads = [], [], []
    for sample in train_batches(task, BATCHES):
        model.zero_grad()
        loss, size, logging_output = task.train_step(sample, model, criterion, optimizer, update_num=0)
        assert logging_output["nsentences"] == B and logging_output["ntokens"] == sample["ntokens"]
        losses.append(loss)
        sizes.append(size)
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    return losses, sizes, grads, model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch_split", [2, 3])  # 3: uneven slices of 2, 2, 1 streams
def test_batch_split_equals_whole_batch(data_dir, arch, batch_split):
    losses, sizes, grads, model = run(data_dir, arch, 1)
    split_losses, split_sizes, split_grads, split_model = run(data_dir, arch, batch_split)
    assert split_sizes == sizes
    for batch in range(BATCHES):
        assert_close(split_losses[batch], losses[batch], msg=f"loss of batch {batch}")
        assert split_grads[batch].keys() == grads[batch].keys() and grads[batch]
        for name, grad in grads[batch].items():
            assert_close(split_grads[batch][name], grad, msg=f"batch {batch}: gradient of {name}")
    state, split_state = decoder_of(model).stream_state("train"), decoder_of(split_model).stream_state("train")
    assert state is not None and type(split_state) is type(state) and split_state.batch_size == B
    for split_tensor, tensor in zip(split_state.tensors(), state.tensors(), strict=True):
        assert_close(split_tensor, tensor, msg="carried train state")
    assert decoder_of(split_model).get_extra_state()["train_segments"] == BATCHES  # one segment per batch


def trainer_updates(data_dir: str, arch: str, batch_split: int, updates: int = 2) -> Tuple[list, dict]:
    """fairseq's Trainer with --update-freq 2 (two consecutive segments per update), SGD: per update the
    logging output, and the parameters at the end. float32: the trainer's gradient norm is computed in float32."""
    cfg, task, model, criterion = setup(data_dir, arch, batch_split,
                                        ["--cpu", "--update-freq", "2", "--optimizer", "sgd", "--lr", "0.5"],
                                        dtype=torch.float32)
    trainer = Trainer(cfg, task, model, criterion)
    trainer.begin_epoch(1)
    batches = train_batches(task, 2 * updates)
    logs = [trainer.train_step(batches[2 * i:2 * i + 2]) for i in range(updates)]
    return logs, {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_split_composes_with_update_freq_in_fairseqs_trainer(data_dir, arch):
    logs, params = trainer_updates(data_dir, arch, 1)
    split_logs, split_params = trainer_updates(data_dir, arch, 3)
    for log, split_log in zip(logs, split_logs, strict=True):  # the trainer's smoothed values (3 decimals)
        assert split_log["sample_size"] == log["sample_size"] > 0
        assert split_log["loss"] == pytest.approx(log["loss"], abs=2e-3)
    for name, value in params.items():
        assert_close(split_params[name], value, msg=f"{name} after two updates")


def test_ignore_grad_zeroes_every_slice_and_still_carries_state(data_dir):
    arch = ARCHS[0]
    _, task, model, criterion = setup(data_dir, arch, 2)
    optimizer = SimpleNamespace(backward=lambda loss: loss.backward())
    sample = train_batches(task, 1)[0]
    task.train_step(sample, model, criterion, optimizer, update_num=0, ignore_grad=True)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert decoder_of(model).stream_state("train").batch_size == B


def test_more_slices_than_streams_is_refused_with_the_fix(data_dir):
    _, task, model, criterion = setup(data_dir, ARCHS[0], B + 1)
    sample = train_batches(task, 1)[0]
    with pytest.raises(ValueError, match=rf"--batch-split {B + 1} exceeds the {B} streams.*--batch-split <= {B}"):
        task.train_step(sample, model, criterion, SimpleNamespace(backward=lambda loss: None), update_num=0)
    with pytest.raises(ValueError, match="--batch-split must be >= 1"):
        setup(data_dir, ARCHS[0], 0)


def test_batch_split_parses_and_defaults_to_one(data_dir):
    assert setup(data_dir, ARCHS[0], 2)[0].task.batch_split == 2
    cfg = training_cfg(ARCHS[0], ["--batch-size", str(B)], task="streaming_lm", data=data_dir)
    assert cfg.task.batch_split == 1


def test_row_slices_follow_tensor_split():
    for batch_size, parts in [(5, 1), (5, 2), (5, 3), (6, 3), (7, 7)]:
        bounds = row_slices(batch_size, parts)
        sizes = [len(piece) for piece in torch.arange(batch_size).tensor_split(parts)]
        assert [stop - start for start, stop in bounds] == sizes
        assert bounds[0][0] == 0 and bounds[-1][1] == batch_size
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_sample_rows_cuts_every_row_tensor_and_recounts():
    pad = 1
    target = torch.tensor([[5, 6, 7], [8, 9, pad], [5, pad, pad]])
    sample = {"id": torch.tensor([3, 4, 5]), "segment": 7, "warmup": False, "ntokens": 6, "nsentences": 3,
              "net_input": {"src_tokens": target + 10, "src_lengths": torch.tensor([3, 2, 1])}, "target": target}
    rows = sample_rows(sample, 1, 3, pad)
    assert rows["id"].tolist() == [4, 5] and rows["segment"] == 7 and rows["warmup"] is False
    assert torch.equal(rows["target"], target[1:]) and torch.equal(rows["net_input"]["src_tokens"], target[1:] + 10)
    assert rows["net_input"]["src_lengths"].tolist() == [2, 1]
    assert rows["ntokens"] == 3 and rows["nsentences"] == 2
    assert sample["ntokens"] == 6 and sample["target"].shape == (3, 3)  # the batch itself is untouched
    with pytest.raises(ValueError, match="not one row per stream"):
        sample_rows({**sample, "extra": torch.zeros(2)}, 0, 1, pad)


def test_slice_logging_outputs_sum_and_module_statistics_count_once():
    def log(loss: float, ntokens: int, stat: Optional[float]) -> dict:
        out = {"loss": torch.tensor(loss), "nll_loss": torch.tensor(loss), "ntokens": ntokens, "nsentences": 2,
               "sample_size": ntokens}
        if stat is not None:
            out.update({STAT_COUNT: 1, "stat:span": stat})
        return out

    merged = merge_slice_logging_outputs([log(1.0, 4, 10.0), log(2.0, 3, 20.0), log(4.0, 5, 30.0)])
    assert merged["loss"].item() == 7.0 and merged["ntokens"] == 12 and merged["sample_size"] == 12
    assert merged["nsentences"] == 6 and merged[STAT_COUNT] == 1 and merged["stat:span"] == pytest.approx(20.0)
    assert STAT_COUNT not in merge_slice_logging_outputs([log(1.0, 4, None), log(2.0, 3, None)])


def test_stream_rows_joins_state_after_the_last_slice_and_refuses_out_of_order_slices(data_dir):
    _, task, model, _ = setup(data_dir, ARCHS[0], 1)
    decoder, tokens = decoder_of(model.train()), train_batches(task, 1)[0]["net_input"]["src_tokens"]
    model(tokens)
    before = decoder.stream_state("train")
    with decoder.stream_rows(0, 2, B):
        model(tokens[:2])
    assert decoder.stream_state("train") is before  # the batch is not done yet
    with pytest.raises(RuntimeError, match="in row order from row 0"):
        with decoder.stream_rows(3, 5, B):
            model(tokens[3:])
    with pytest.raises(ValueError, match="expects 2 rows, got 3"):
        with decoder.stream_rows(0, 2, B):
            model(tokens[:3])
    with pytest.raises(ValueError, match="0 <= start < stop <= batch_size"):
        with decoder.stream_rows(4, 6, B):
            pass
    for start, stop in row_slices(B, 2):
        with decoder.stream_rows(start, stop, B):
            model(tokens[start:stop])
    assert decoder.stream_state("train") is not before and decoder.stream_state("train").batch_size == B
    assert decoder.get_extra_state()["train_segments"] == 2
