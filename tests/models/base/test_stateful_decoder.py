"""StatefulDecoder / StatefulLanguageModel: per-stream state, truncated BPTT, incremental decoding, boundaries."""
import copy

import pytest
import torch
from fairseq.dataclass.configs import FairseqConfig
from fairseq.sequence_generator import SequenceGenerator
from omegaconf import OmegaConf
from torch import nn

from fairseq_ext.models.base import StatefulDecoder, StatefulLanguageModel, reset_stream_state
from tests.harness import assert_close, run_in_segments, tiny_dictionary
from tests.models.base.toy_lm import ToyDecoder, toy_model

B, T, V = 3, 13, 12


def tokens_for(model, batch: int = B, length: int = T, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    vocab = len(model.decoder.dictionary)
    return torch.randint(4, vocab, (batch, length), generator=generator)  # (B, T): real words, no specials


def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """One pass from a cold state on a copy of the model (the model's own streams are left alone)."""
    clone = copy.deepcopy(model).eval()
    clone.reset_state()
    with torch.no_grad():
        return clone(tokens)[0]  # (B, T, V)


@pytest.mark.parametrize("lengths", [[13], [5, 8], [1, 4, 7, 1]])
@pytest.mark.parametrize("training", [False, True])
def test_segments_continue_the_stream(lengths, training):
    model = toy_model()
    tokens = tokens_for(model)
    expected = full_logits(model, tokens)
    model.train(training)

    def step(segment, state):
        return model(segment)[0], state  # the state lives in the model's stream

    actual, _ = run_in_segments(step, tokens, lengths)
    assert_close(actual, expected)
    stream = "train" if training else "eval"
    counts = model.decoder.stream_state(stream).counts  # (B, V) histogram of every input read
    assert torch.equal(counts, torch.nn.functional.one_hot(tokens, V + 4).sum(1).float())


def test_stateless_model_does_not_continue():
    model = toy_model(carry_state=False)
    tokens = tokens_for(model)
    expected = full_logits(model, tokens)
    model.eval()
    actual, _ = run_in_segments(lambda seg, st: (model(seg)[0], st), tokens, [6, 7])
    assert_close(actual[:, :6], expected[:, :6])
    assert not torch.allclose(actual[:, 6:], expected[:, 6:])
    assert model.decoder.stream_state("eval") is None


def test_training_state_is_detached():
    model = toy_model().train()
    tokens = tokens_for(model)
    model(tokens[:, :6])[0].sum().backward()
    state = model.decoder.stream_state("train")
    assert state.memory.grad_fn is None and not state.memory.requires_grad
    model.zero_grad()
    model(tokens[:, 6:])[0].sum().backward()  # would fail ("backward through the graph a second time") if attached
    assert model.decoder.embed.weight.grad is not None


def test_train_and_eval_streams_are_separate():
    model = toy_model()
    tokens = tokens_for(model)
    model.train()
    model(tokens[:, :5])
    train_state = model.decoder.stream_state("train")
    model.eval()
    with torch.no_grad():
        model(tokens[:, 5:])
    assert model.decoder.stream_state("train") is train_state
    assert model.decoder.stream_state("eval").counts.sum() == B * (T - 5)


def test_batch_size_change_starts_over():
    model = toy_model().eval()
    tokens = tokens_for(model)
    with torch.no_grad():
        model(tokens)
        out = model(tokens[:2, :4])[0]  # B 3 -> 2: no state to continue
    assert_close(out, full_logits(model, tokens[:2, :4]))
    assert model.decoder.stream_state("eval").batch_size == 2


def test_reset_state_and_reset_stream_state_through_wrappers():
    model = toy_model()
    tokens = tokens_for(model)
    for training in (True, False):
        model.train(training)
        model(tokens)
    model.decoder.reset_state("train")
    assert model.decoder.stream_state("train") is None and model.decoder.stream_state("eval") is not None

    class Wrapper(nn.Module):  # like DistributedDataParallel: the model is a submodule named ``module``
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    assert reset_stream_state(Wrapper(Wrapper(model)), "eval") == 1
    assert model.decoder.stream_state("eval") is None
    assert reset_stream_state(nn.Linear(2, 2), "eval") == 0
    with pytest.raises(ValueError, match="unknown stream"):
        model.decoder.reset_state("valid")


def test_incremental_decoding_equals_full_pass():
    model = toy_model().eval()
    tokens = tokens_for(model)
    expected = full_logits(model, tokens)
    for ends in ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [4, 5, 11, 13]):  # token by token, then in chunks
        incremental_state = {}
        outputs, start = [], 0
        with torch.no_grad():
            for end in ends:
                out = model.decoder(tokens[:, :end], incremental_state=incremental_state)[0]  # (B, new, V)
                assert out.size(1) == end - start
                outputs.append(out)
                start = end
        assert_close(torch.cat(outputs, dim=1), expected)
    assert model.decoder.stream_state("eval") is None  # incremental decoding leaves the streams alone


def test_reorder_incremental_state():
    model = toy_model().eval()
    tokens = tokens_for(model)
    order = torch.tensor([2, 0, 2, 1])
    expected = full_logits(model, tokens[order])  # (4, T, V)
    incremental_state = {}
    with torch.no_grad():
        first = model.decoder(tokens[:, :5], incremental_state=incremental_state)[0]
        model.decoder.reorder_incremental_state_scripting(incremental_state, order)
        rest = model.decoder(tokens[order], incremental_state=incremental_state)[0]
    assert_close(first[order], expected[:, :5])
    assert_close(rest, expected[:, 5:])


def test_beam_search_scores_equal_full_pass_scores():
    """fairseq's SequenceGenerator (beam 3, incremental, reordering beams) agrees with full-pass log-probs."""
    model = toy_model().eval()
    eos = model.decoder.dictionary.eos()
    src = torch.tensor([[eos, 5, 6], [eos, 7, 8]])  # (2, 3) </s> + prefix
    generator = SequenceGenerator([model], model.decoder.dictionary, beam_size=3, max_len_b=6, min_len=6,
                                  normalize_scores=False)
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.tensor([3, 3])}}
    hypos = generator.generate([model], sample, prefix_tokens=src[:, 1:], bos_token=eos)
    for beams in hypos:
        assert len(beams) == 3
        for hypo in beams:
            inputs = torch.cat([torch.tensor([eos]), hypo["tokens"][:-1]])[None]  # (1, L)
            lprobs = torch.log_softmax(full_logits(model, inputs), dim=-1)[0]  # (L, V)
            expected = lprobs.gather(1, hypo["tokens"][:, None])[:, 0]  # (L,)
            assert_close(hypo["positional_scores"], expected)


def inference_cfg(context_window: int):
    cfg = OmegaConf.structured(FairseqConfig)
    cfg.eval_lm.context_window = context_window
    return cfg


def test_context_window_is_rejected_at_inference():
    model = toy_model()
    with pytest.raises(ValueError, match="--task streaming_lm without --context-window"):
        model.prepare_for_inference_(inference_cfg(64))
    model.prepare_for_inference_(inference_cfg(0))


def test_base_classes_check_their_contract():
    with pytest.raises(TypeError):
        StatefulDecoder(tiny_dictionary(4))  # abstract: forward_segment and output_layer
    with pytest.raises(TypeError, match="StatefulDecoder"):
        StatefulLanguageModel(nn.Linear(2, 2))
    model = toy_model()
    with pytest.raises(ValueError, match="encoder_out"):
        model.decoder(tokens_for(model), encoder_out={"x": []})
    assert isinstance(model.decoder, ToyDecoder)


def test_carrying_state_into_unrelated_batches_is_refused_until_streams_are_attached():
    """Without a stream source (e.g. built by fairseq's language_modeling task), the second batch would silently
    continue an unrelated row's state: an error names --task streaming_lm."""
    model = toy_model()
    model.decoder.stream_source = None
    x = tokens_for(model)
    model(x)  # the first batch starts cold: fine
    with pytest.raises(RuntimeError, match="--task streaming_lm"):
        model(x)
    model.reset_state()
    model(x)  # an explicit reset between unrelated batches is fine
    model.decoder.attach_streams("tests")
    model(x)


def test_training_stream_travels_in_the_state_dict_and_resumes_only_where_it_ended():
    model = toy_model()
    model.train()
    x = tokens_for(model)
    for segment in torch.split(x, [6, 7], dim=1):
        model(segment)
    saved = model.state_dict()
    assert saved["decoder._extra_state"]["train_segments"] == 2

    fresh = toy_model(seed=1)
    fresh.load_state_dict(saved)
    assert fresh.decoder.stream_state("train") is None and fresh.decoder.has_saved_train_stream  # until resumed
    assert not fresh.decoder.resume_train_stream(5)  # the iterator restarted elsewhere: cold
    assert fresh.decoder.stream_state("train") is None
    fresh.load_state_dict(saved)
    assert fresh.decoder.resume_train_stream(2) and not fresh.decoder.has_saved_train_stream
    expected = model.decoder.stream_state("train")
    for a, b in zip(fresh.decoder.stream_state("train").tensors(), expected.tensors()):
        assert torch.equal(a, b)
    converted = {k: v for k, v in saved.items() if k != "decoder._extra_state"}
    toy_model().load_state_dict(converted)  # checkpoints without a stream (converted, older) still load strictly


@pytest.mark.parametrize("num,offset,length,expected", [
    (5, 0, 3, [(0, 3, True), (3, 5, False)]),
    (4, 2, 3, [(0, 1, True), (1, 4, True)]),
    (1, 1, 3, [(0, 1, False)]),
    (7, 0, 1, [(i, i + 1, True) for i in range(7)]),
])
def test_segment_pieces_cut_new_tokens_at_the_streaming_boundaries(num, offset, length, expected):
    from fairseq_ext.models.base import segment_pieces

    assert segment_pieces(num, offset, length) == expected


def test_segment_pieces_need_a_segment_length():
    from fairseq_ext.models.base import segment_pieces

    with pytest.raises(ValueError, match="--tokens-per-sample"):
        segment_pieces(3, 0, None)
    with pytest.raises(ValueError, match="offset 3"):
        segment_pieces(3, 3, 3)
