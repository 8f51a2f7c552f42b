"""The contract every stateful model keeps (shared/DESIGN.md, "Tests every model gets"), checked on every tiny
preset of the table below:

1. [A;B] at once == A then B with the state carried by the decoder's stream API (where the row states how);
2. incremental decoding (fairseq's ``incremental_state``, token by token and in uneven chunks) == the streaming pass
   over segments of ``tokens_per_sample``;
3. ``fairseq-eval-lm --task streaming_lm`` over B streams scores every target of the split exactly once (and, for
   rows with exact segments, gives each stream's one-pass number; for rows with a bounded receptive field, the same
   number for any B and T under the warm-up protocol);
4. save -> load (torch.save of the state dict into a fresh build) gives identical log-probs, also after a carried
   state, and the saved training stream resumes exactly;
5. ``reorder_incremental_state`` (beam search) selects the right rows;
6. forward + backward of the tiny preset reaches every parameter.

To add a model: one row in ``PRESETS`` (arch -> args that make it tiny, fast and deterministic); add a row to
``PROPERTIES`` only to state the args that make segments exact, parameters that get no gradient, or a warm-up
invariance. Rows whose arch is not registered are skipped.
"""
import math
import os
from typing import Dict, List

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_MODEL_REGISTRY

from tests.harness import (assert_close, generated_data_dir, single_thread, split_token_count, streaming_eval_lm,
                           tiny_dictionary, whole_stream_loss)
from tests.models.contract import (Properties, arch_of, build, incremental_log_probs, random_tokens, row_cfg,
                                   state_tensors, stream_log_probs, training_loss, write_checkpoint)

one_thread = pytest.fixture(autouse=True)(single_thread)

# ----------------------------------------------------------------------------------------------------------------------
# the table: row ("<arch>" or "<arch>:<variant>") -> extra command-line args (tiny, fast, deterministic: dropout 0;
# the tests run in float64 except through fairseq-eval-lm). Memories are SHORTER than a segment where the model has
# one, so that incremental decoding and reordering cross memory cuts; PROPERTIES lengthens them for exact segments.
# ----------------------------------------------------------------------------------------------------------------------
_TXL = ["--decoder-layers", "2", "--decoder-embed-dim", "16", "--decoder-attention-heads", "2",
        "--decoder-ffn-embed-dim", "24", "--attn-impl", "naive", "--dropout", "0", "--attention-dropout", "0"]
_SPAN = ["--decoder-layers", "2", "--decoder-embed-dim", "16", "--decoder-attention-heads", "4",
         "--decoder-ffn-embed-dim", "24", "--attn-span", "12", "--adapt-span-ramp", "4", "--dropout", "0",
         "--emb-dropout", "0"]
_FW = ["--decoder-embed-dim", "16", "--decoder-attention-heads", "2", "--decoder-attention-head-dim", "4",
       "--decoder-ffn-embed-dim", "24", "--fwp-chunk-size", "3", "--dropout", "0", "--carry-over-fast-weight"]

PRESETS: Dict[str, List[str]] = {
    "transformer_xl_tiny": [*_TXL, "--mem-len", "3"],
    "adaptive_span_tiny": _SPAN,
    "adaptive_span_tiny:all_attention": [*_SPAN, "--pers-mem-size", "4"],  # All-attention: persistent memory, no FF
    "fast_weight_tiny:delta": [*_FW, "--attn-type", "linear", "--update-rule", "delta"],
    "fast_weight_tiny:sum": [*_FW, "--attn-type", "linear", "--update-rule", "sum"],  # output-normalised: key sums
    "sha_rnn_tiny": ["--dropout", "0", "--dropouti", "0", "--dropouth", "0", "--max-memory", "8"],
    "composed_alibi_memory_tiny": ["--dropout", "0", "--mem-len", "3"],
    "composed_delta_persistent_tiny": ["--dropout", "0"],
    "composed_span_xl_tiny": ["--dropout", "0", "--mem-len", "12", "--attn-span", "12"],
    "composed_hybrid_delta_tiny": ["--dropout", "0", "--mem-len", "3"],
    "composed_lm:window": ["--dropout", "0", "--decoder-layers", "2", "--decoder-embed-dim", "16",
                           "--decoder-ffn-embed-dim", "24", "--source", "window", "--mem-len", "4"],
    "composed_lm:window_sha": ["--dropout", "0", "--decoder-layers", "2", "--decoder-embed-dim", "16",
                               "--decoder-ffn-embed-dim", "24", "--mixer", "softmax,sha", "--position", "xl,none",
                               "--source", "window+persistent,memory", "--mem-len", "4", "--pers-mem-size", "2"],
}

# Every parameter of these rows gets a gradient (no ``unused_parameters``). Memories of 256 exceed every sequence
# of the suite (the evaluation corpus' valid split, read as one stream, has 156 tokens).
_SPAN_PROPERTIES = Properties(warmup_invariant=24)  # 2 layers x L = 12 previous positions: receptive field 24
PROPERTIES: Dict[str, Properties] = {
    "transformer_xl_tiny": Properties(exact_segments=("--mem-len", "256")),
    # every position sees its own L previous positions whatever the segmentation (a cold cache reads as zeros)
    "adaptive_span_tiny": _SPAN_PROPERTIES,
    "adaptive_span_tiny:all_attention": _SPAN_PROPERTIES,
    # positions restart per segment; without them the carried fast weights are the one-pass recurrence
    "fast_weight_tiny:delta": Properties(exact_segments=("--no-pos",)),
    "fast_weight_tiny:sum": Properties(exact_segments=("--no-pos",)),
    "sha_rnn_tiny": Properties(exact_segments=("--max-memory", "256")),  # the window never trims
    "composed_alibi_memory_tiny": Properties(exact_segments=("--mem-len", "256")),
    "composed_delta_persistent_tiny": Properties(exact_segments=None, not_exact="its fast weights restart at every "
                                                 "segment (source segment+persistent)"),
    "composed_span_xl_tiny": Properties(exact_segments=("--mem-len", "256")),
    "composed_hybrid_delta_tiny": Properties(exact_segments=("--mem-len", "256")),
    # each query sees its W = 4 previous keys whatever the segmentation: 2 layers -> a receptive field of 8
    "composed_lm:window": Properties(warmup_invariant=8),
    "composed_lm:window_sha": Properties(exact_segments=("--mem-len", "256")),
}


def _rows():
    for row in PRESETS:
        marks = () if arch_of(row) in ARCH_MODEL_REGISTRY else \
            pytest.mark.skip(reason=f"arch {arch_of(row)} is not registered (yet)")
        yield pytest.param(row, id=row, marks=marks)


ROWS = list(_rows())
T = 5  # tokens_per_sample of the tests (segments of the streaming pass that incremental decoding reproduces)


def properties(row: str) -> Properties:
    return PROPERTIES.get(row, Properties())


def make(row: str, extra=(), dtype=torch.float64, seed: int = 0, dictionary=None, tokens_per_sample: int = T):
    return build(row, PRESETS, tiny_dictionary(20) if dictionary is None else dictionary, extra,
                 tokens_per_sample=tokens_per_sample, dtype=dtype, seed=seed)


def exact_model(row: str):
    props = properties(row)
    if props.exact_segments is None:
        pytest.skip(f"{row}: no setting makes segments exact: {props.not_exact}")
    return make(row, props.exact_segments)


# ----------------------------------------------------------------------------------------------------------------------
# 1. segment equivalence
# ----------------------------------------------------------------------------------------------------------------------
N = 17
SEGMENTATIONS = [(8, 9), (3, 3, 3, 8), (1, 15, 1), (5, 5, 5, 2)]


@pytest.mark.parametrize("row", ROWS)
def test_segments_with_carried_state_equal_one_pass(row):
    """[A;B] at once == A then B with the state carried by the decoder (stream API), for several segmentations, in
    evaluation ("eval" stream) and training ("train" stream, stored detached); the final states agree too."""
    model = exact_model(row)
    x = random_tokens(model, 2, N)
    whole = stream_log_probs(model, x, [N])
    whole_state = state_tensors(model.decoder.stream_state("eval"))
    for lengths in SEGMENTATIONS:
        assert_close(stream_log_probs(model, x, lengths), whole, msg=f"segments {lengths}")
        state = state_tensors(model.decoder.stream_state("eval"))
        assert len(state) == len(whole_state)
        for got, expected in zip(state, whole_state):
            assert_close(got, expected, msg=f"final state after segments {lengths}")
    model.train()
    assert_close(stream_log_probs(model, x, SEGMENTATIONS[1]), whole, msg="training stream")
    assert all(not t.requires_grad for t in state_tensors(model.decoder.stream_state("train")))


# ----------------------------------------------------------------------------------------------------------------------
# 2. incremental decoding == streaming over segments of tokens_per_sample
# ----------------------------------------------------------------------------------------------------------------------
CHUNKINGS = [[1] * 3 * T, [1, 4, 2, 7, 1], [3 * T]]  # token by token; uneven chunks across boundaries; one prompt


@pytest.mark.parametrize("row", ROWS)
def test_incremental_decoding_equals_streaming(row):
    model = make(row)
    x = random_tokens(model, 2, 3 * T)
    streamed = stream_log_probs(model, x, [T] * 3)
    for chunks in CHUNKINGS:
        assert_close(incremental_log_probs(model, x, chunks), streamed, msg=f"chunks {chunks}")


# ----------------------------------------------------------------------------------------------------------------------
# 3. streaming evaluation (fairseq-eval-lm --task streaming_lm) covers each target exactly once
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return generated_data_dir(tmp_path_factory, train_lines=20, valid_lines=12)


@pytest.mark.parametrize("row", ROWS)
def test_streaming_eval_scores_every_target_once(row, corpus, tmp_path, caplog):
    """For several (B, T): eval-lm reports every target of the split as evaluated once. Rows with exact segments:
    its number equals each of the B streams read in one pass. Rows with a bounded receptive field: under the warm-up
    protocol the number does not depend on B or T."""
    props = properties(row)
    extra = props.exact_segments or ()
    dictionary = Dictionary.load(os.path.join(corpus, "dict.txt"))
    model = make(row, extra, dtype=torch.float32, dictionary=dictionary)
    checkpoint = write_checkpoint(model, row_cfg(row, PRESETS, extra, T, data=corpus), str(tmp_path / "model.pt"))
    n = split_token_count(corpus, "valid")
    for streams, length in ((1, T + 2), (3, T)):
        loss, scored, log = streaming_eval_lm(corpus, checkpoint, caplog, "--batch-size", str(streams),
                                              "--tokens-per-sample", str(length))
        assert scored == n and math.isfinite(loss)
        assert f"stream(B={streams}, T={length}, cold)" in log
        if props.exact_segments is not None:
            assert loss == pytest.approx(whole_stream_loss(model, dictionary, corpus, streams), rel=1e-5)
    if props.warmup_invariant is not None:
        warmup = str(props.warmup_invariant)
        losses = []
        for streams, length in ((1, 4), (3, 6), (4, 8)):
            loss, scored, log = streaming_eval_lm(corpus, checkpoint, caplog, "--batch-size", str(streams),
                                                  "--tokens-per-sample", str(length), "--eval-warmup-tokens", warmup)
            assert scored == n and "unscored" in log
            losses.append(loss)
        assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# 4. save -> load
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", ROWS)
def test_save_load_gives_identical_log_probs_and_resumes_the_train_stream(row, tmp_path):
    """The state dict (torch.save, loaded weights-only into a fresh build with other weights) gives the same
    log-probs bit for bit, cold and after a carried state; the training stream it holds (if the model carries one)
    continues exactly."""
    model = make(row)
    x = random_tokens(model, 2, 3 * T)
    model.train()
    stream_log_probs(model, x[:, :T], [T])  # one training segment: the "train" stream is saved with the weights
    model.eval()
    expected = stream_log_probs(model, x, [T, 2 * T])
    torch.save(model.state_dict(), tmp_path / "model.pt")
    other = make(row, seed=1)
    assert not torch.equal(stream_log_probs(other, x, [T, 2 * T]), expected)  # the fresh build really differs
    other.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert_close(stream_log_probs(other, x, [T, 2 * T]), expected, atol=0, rtol=0)
    carried = model.decoder.stream_state("train") is not None  # False for a model that carries nothing
    assert other.decoder.resume_train_stream(1) == carried  # the saved stream ends right before training segment 1
    model.train(), other.train()
    continued = stream_log_probs(model, x[:, T:2 * T], [T], fresh=False)
    assert_close(stream_log_probs(other, x[:, T:2 * T], [T], fresh=False), continued, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# 5. beam search reorders the incremental state
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", ROWS)
def test_reorder_incremental_state_selects_rows(row):
    """Decode 7 tokens of 3 rows, reorder to rows [2, 0, 0] (the generator's entry point, which visits every
    submodule: the state must be reordered exactly once), decode 6 more (across a segment boundary): the same as
    decoding the reordered rows from the start."""
    model = make(row)
    x = random_tokens(model, 3, 13)
    order = torch.tensor([2, 0, 0])
    state: dict = {}
    incremental_log_probs(model, x[:, :7], [1] * 7, state)
    model.decoder.reorder_incremental_state_scripting(state, order)  # what fairseq's SequenceGenerator calls
    continued = incremental_log_probs(model, x[order], [8, 1, 1, 1, 1, 1], state)  # first call: token 8 is new
    expected = incremental_log_probs(model, x[order], [1] * 13)[:, 7:]
    assert_close(continued, expected)


# ----------------------------------------------------------------------------------------------------------------------
# 6. forward + backward reaches every parameter
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", ROWS)
def test_forward_backward_reaches_every_parameter(row):
    """Two training segments (the second over the carried state), NLL + auxiliary losses: every parameter gets a
    finite, nonzero gradient, except those the row declares unused (and those really get none)."""
    model = make(row).train()
    x = random_tokens(model, 2, 2 * T + 1)
    model.decoder.reset_state()
    for start in (0, T):
        training_loss(model, x[:, start:start + T], x[:, start + 1:start + T + 1]).backward()
    props = properties(row)
    reached = {name for name, p in model.named_parameters() if p.grad is not None and bool(p.grad.ne(0).any())}
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    missing = sorted(name for name, _ in model.named_parameters() if name not in reached and not props.is_unused(name))
    assert not missing, f"no gradient reaches {missing}"
    stale = sorted(name for name in reached if props.is_unused(name))
    assert not stale, f"declared unused in PROPERTIES but reached: {stale}"
