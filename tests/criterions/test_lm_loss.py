"""lm_loss: NLL over full and adaptive softmax against a hand computation, auxiliary terms, logged metrics."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
from fairseq.logging import metrics

from fairseq_ext.criterions.lm_loss import LMLossCriterion
from tests.harness import assert_close
from tests.models.base.toy_lm import toy_model

B, T = 3, 9


def make_sample(model, pad_tail: int = 2):
    """A (B, T) sample whose last row ends in ``pad_tail`` pads; targets include every tail-cluster word."""
    vocab = len(model.decoder.dictionary)
    pad = model.decoder.dictionary.pad()
    generator = torch.Generator().manual_seed(3)
    source = torch.randint(4, vocab, (B, T), generator=generator)  # (B, T)
    target = torch.randint(4, vocab, (B, T), generator=generator)  # (B, T)
    target[0, : vocab - 4] = torch.arange(4, vocab)[:T]  # ids cutoff_i + pad (7, 11) among them
    source[-1, T - pad_tail:] = pad
    target[-1, T - pad_tail:] = pad
    lengths = source.ne(pad).sum(1)  # (B,)
    return {"net_input": {"src_tokens": source, "src_lengths": lengths}, "target": target,
            "ntokens": int(lengths.sum()), "nsentences": B}


def hand_nll(model, sample) -> torch.Tensor:
    """-sum log p(target) over non-pad targets, from full (B, T, V) log-probabilities of a cold copy."""
    clone = copy.deepcopy(model)
    clone.reset_state()
    features = clone.decoder(sample["net_input"]["src_tokens"], features_only=True)[0]  # (B, T, C)
    if clone.decoder.adaptive_softmax is not None:
        lprobs = clone.decoder.adaptive_softmax.get_log_prob(features, target=None)  # (B, T, V)
    else:
        lprobs = torch.log_softmax(clone.decoder.output_layer(features), dim=-1)  # (B, T, V)
    target = sample["target"]
    keep = target.ne(clone.decoder.dictionary.pad())  # (B, T)
    return -lprobs.gather(2, target[..., None])[..., 0][keep].sum()


def criterion_for(model, sentence_avg: bool = False) -> LMLossCriterion:
    return LMLossCriterion(SimpleNamespace(target_dictionary=model.decoder.dictionary), sentence_avg)


@pytest.mark.parametrize("cutoff", [None, [6, 10]])
def test_nll_matches_hand_computation(cutoff):
    model = toy_model(adaptive_cutoff=cutoff)
    sample = make_sample(model)
    expected = hand_nll(model, sample)
    loss, sample_size, log = criterion_for(model)(model.train(), sample)
    assert_close(loss, expected)
    assert sample_size == log["ntokens"] == B * T - 2 and log["nsentences"] == B
    assert_close(log["nll_loss"], expected) and torch.equal(log["loss"], log["nll_loss"])
    assert "aux_loss" not in log


def test_adaptive_tail_words_at_pad_offset_are_scored():
    """Target id cutoff_0 + pad (7) lives in tail cluster 1 as relative id 1 == pad: it must still count."""
    model = toy_model(adaptive_cutoff=[6, 10])
    sample = make_sample(model)
    criterion = criterion_for(model)
    base = criterion(copy.deepcopy(model), sample)[0]
    changed = copy.deepcopy(sample)
    changed["target"][0, 3] = 7 if int(sample["target"][0, 3]) != 7 else 8
    assert not torch.isclose(criterion(copy.deepcopy(model), changed)[0], base)
    assert_close(criterion(copy.deepcopy(model), changed)[0], hand_nll(model, changed))


@pytest.mark.parametrize("sentence_avg", [False, True])
def test_aux_loss_is_added_and_logged(sentence_avg):
    model = toy_model(aux_coef=0.1)
    sample = make_sample(model)
    nll = hand_nll(model, sample)
    aux = 0.1 * model.decoder.penalty.weight.pow(2).sum()  # 0.1 * C * 0.25
    loss, sample_size, log = criterion_for(model, sentence_avg)(model, sample)
    assert sample_size == (B if sentence_avg else B * T - 2)
    assert_close(loss, nll + aux * sample_size)
    assert_close(log["aux_loss"], aux * sample_size) and assert_close(log["nll_loss"], nll)
    assert log["stat_count"] == 1 and log["stat:toy_weight_mean"] == pytest.approx(0.5)
    loss.backward()
    assert model.decoder.penalty.weight.grad is not None


def test_reduce_metrics_in_bits_and_summable():
    model = toy_model(aux_coef=0.1)
    criterion = criterion_for(model)
    logs = [criterion(model, make_sample(model, pad_tail=k))[2] for k in (0, 3)]
    logs[1]["stat:toy_weight_mean"] = 1.5  # pretend another worker saw another value
    summed = {key: sum(log[key] for log in logs) for key in logs[0]}  # what fairseq's fast stat sync does
    for outputs in (logs, [summed]):
        with metrics.aggregate() as agg:
            LMLossCriterion.reduce_metrics(outputs)
            values = agg.get_smoothed_values()
        ntokens = sum(log["ntokens"] for log in logs)
        nll_bits = float(sum(log["nll_loss"] for log in logs)) / ntokens / math.log(2)
        loss_bits = float(sum(log["loss"] for log in logs)) / ntokens / math.log(2)
        assert values["nll_loss"] == pytest.approx(nll_bits, abs=1e-3)
        assert values["loss"] == pytest.approx(loss_bits, abs=1e-3)
        assert values["ppl"] == pytest.approx(2 ** nll_bits, rel=1e-2)
        assert values["bits_per_token"] == pytest.approx(nll_bits, abs=1e-3)
        assert values["aux_loss"] == pytest.approx(0.1 * 16 * 0.25, abs=1e-3)
        assert values["toy_weight_mean"] == pytest.approx(1.0)  # (0.5 + 1.5) / 2 forward passes
    assert LMLossCriterion.logging_outputs_can_be_summed()


def test_unreduced_loss_is_refused():
    model = toy_model()
    with pytest.raises(ValueError, match="reduce"):
        criterion_for(model)(model, make_sample(model), reduce=False)
