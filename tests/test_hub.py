"""fairseq_ext.hub on the frozen checkpoints (every family, and four originals converted by this project's converters):
the same log-probs as when they were frozen, repeated calls identical, score_document equal to fairseq-eval-lm under
both protocols, reproducible sampling, loading from anywhere, clear errors."""
import math
import os
import shutil

import pytest
import torch

import fairseq_ext.hub as hub
from tests.harness import USER_DIR, fairseq_eval_lm, fairseq_preprocess, random_corpus, single_thread

one_thread = pytest.fixture(autouse=True)(single_thread)

FROZEN = os.path.join(os.path.dirname(__file__), "frozen", "data")
CASES = sorted(os.listdir(FROZEN))
ONE_PASS = ("alibi",)  # frozen as one forward pass over the whole row (stateless, no segments)


@pytest.fixture(scope="module")
def models():
    return {case: hub.load(os.path.join(FROZEN, case), device="cpu") for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_next_token_log_probs_are_the_frozen_ones(models, case):
    lm = models[case]
    expected = torch.load(os.path.join(FROZEN, case, "expected.pt"))
    tokens = expected["tokens"]
    segment = tokens.size(1) if case in ONE_PASS else expected["segment"]
    for row in range(tokens.size(0)):  # one stream per row, from a cold state (frozen: both rows in one batch)
        actual = lm.next_token_log_probs(tokens[row], segment)
        assert (actual - expected["log_probs"][row]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["transformer_xl", "sha_rnn", "fast_weight_dpfp_carry", "converted_adaptive_span",
                                  "alibi"])
def test_score_is_identical_on_repeated_calls_and_leaks_no_state(models, case):
    lm = models[case]
    text = " ".join(lm.dictionary[i] for i in range(4, 17)) + "\n" + lm.dictionary[5]
    first, second = lm.score(text), lm.score([text, text])
    assert all(torch.equal(first["log_probs"], other["log_probs"]) for other in second)
    assert first["tokens"].numel() == first["log_probs"].numel() == 16  # 13 + 1 symbols, two </s>
    if lm.stateful:
        assert lm.model.decoder.stream_state("eval") is None
    inputs = torch.cat([torch.tensor([lm.dictionary.eos()]), first["tokens"][:-1]])
    gathered = lm.next_token_log_probs(inputs).gather(-1, first["tokens"][:, None])[:, 0]
    assert torch.equal(gathered, first["log_probs"])
    assert first["protocol"] == ("nonoverlap(L=6)" if case == "alibi" else "stream(B=1, T=6, cold)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 12-line text and, per dictionary, its binarised valid split."""
    root = tmp_path_factory.mktemp("hub")
    raw = random_corpus(str(root / "valid.txt"), 12, num_words=25, seed=3)

    def binarised(case: str) -> str:
        destdir = str(root / case)
        return fairseq_preprocess(destdir, trainpref=raw, validpref=raw,
                                  srcdict=os.path.join(FROZEN, case, "dict.txt"))
    return raw, binarised


def bits_per_token(result) -> float:
    return -result["log_probs"].sum().item() / result["tokens"].numel() / math.log(2)


@pytest.mark.parametrize("case", ["transformer_xl", "sha_rnn", "fast_weight_dpfp_carry", "adaptive_span",
                                  "converted_transformer_xl", "alibi"])
def test_score_document_is_fairseq_eval_lm_streaming(models, corpus, case):
    raw, binarised = corpus
    data = binarised(case)
    result = fairseq_eval_lm([data, "--user-dir", USER_DIR, "--path", os.path.join(FROZEN, case, "model.pt"),
                              "--task", "streaming_lm", "--batch-size", "1", "--tokens-per-sample", "6",
                              "--gen-subset", "valid", "--cpu", "--num-workers", "0"])
    ours = models[case].score_document(open(raw).read())
    assert ours["tokens"].numel() == 12 + sum(len(line.split()) for line in open(raw))
    assert bits_per_token(ours) == pytest.approx(float(result["loss"]), abs=1e-4)


def test_sliding_window_is_fairseq_eval_lm_context_window(models, corpus):
    raw, binarised = corpus
    case = "fast_weight_delta"  # stateless (no carry-over)
    result = fairseq_eval_lm([binarised(case), "--user-dir", USER_DIR, "--path", os.path.join(FROZEN, case, "model.pt"),
                              "--task", "language_modeling", "--context-window", "2", "--tokens-per-sample", "6",
                              "--sample-break-mode", "none", "--batch-size", "1", "--gen-subset", "valid", "--cpu",
                              "--num-workers", "0"])
    ours = models[case].score_document(open(raw).read(), protocol="sliding", context_window=2)
    assert ours["protocol"] == "sliding(L=6, S=4)"
    assert bits_per_token(ours) == pytest.approx(float(result["loss"]), abs=1e-4)
    with pytest.raises(ValueError, match="does not apply"):
        models["transformer_xl"].score_document(open(raw).read(), protocol="sliding", context_window=2)
    with pytest.raises(ValueError, match="choose one of"):
        models[case].score_document("w1", protocol="window")


@pytest.mark.parametrize("case", ["transformer_xl", "sha_rnn", "fast_weight_softmax", "alibi", "adaptive_span"])
def test_sample_is_reproducible_with_a_seed(models, case):
    lm = models[case]
    prompt = f"{lm.dictionary[4]} {lm.dictionary[5]}"
    first = lm.sample(prompt, max_new_tokens=12, seed=7)
    assert lm.sample(prompt, max_new_tokens=12, seed=7) == first
    assert lm.sample(prompt, max_new_tokens=12, temperature=0) == lm.sample(prompt, max_new_tokens=12, temperature=0)
    generated = first.split()
    assert 0 < len(generated) <= 12 and not {"<pad>", "<s>"} & set(generated)


def test_greedy_sample_follows_the_streaming_log_probs(models):
    """Incremental decoding continues the same distributions the streaming pass gives (Transformer-XL, which
    needs the segment boundaries reproduced: 2 + 10 tokens cross T = 6 twice)."""
    lm = models["transformer_xl"]
    prompt = f"{lm.dictionary[4]} {lm.dictionary[5]}"
    continuation = lm.sample(prompt, max_new_tokens=10, temperature=0)
    tokens = torch.tensor([lm.dictionary.eos(), 4, 5] + [lm.dictionary.index(w) for w in continuation.split()])
    log_probs = lm.next_token_log_probs(tokens[:-1])
    assert torch.equal(log_probs[2:].argmax(-1), tokens[3:])


def test_load_works_from_any_directory_and_says_what_is_missing(tmp_path, monkeypatch):
    case_dir = tmp_path / "copy"
    shutil.copytree(os.path.join(FROZEN, "sha_rnn"), case_dir)
    monkeypatch.chdir(tmp_path)
    lm = hub.load("copy", device="cpu")  # the directory: model.pt, dict.txt beside it
    assert lm.score("w1 w2")["log_probs"].numel() == 3
    with pytest.raises(hub.MissingFileError, match="holds none of"):
        hub.load(str(tmp_path))
    with pytest.raises(hub.MissingFileError, match="no checkpoint at"):
        hub.load("nowhere.pt")
    with pytest.raises(hub.MissingFileError, match="holds no dict.txt"):
        hub.load("copy", data=str(tmp_path))
    state = torch.load(case_dir / "model.pt", weights_only=False)
    state["cfg"]["task"]["data"] = str(tmp_path / "gone")  # the training data directory no longer exists
    torch.save(state, case_dir / "model.pt")
    assert hub.load("copy", device="cpu").score("w1 w2")["log_probs"].numel() == 3  # the dict.txt beside it serves
    os.remove(case_dir / "dict.txt")
    with pytest.raises(hub.MissingFileError, match="pass data="):
        hub.load("copy/model.pt")


@pytest.fixture(scope="module")
def composed_checkpoint(tmp_path_factory):
    """A composed hybrid (ALiBi softmax over memory + carried delta rule) after 2 updates of fairseq-train."""
    from tests.harness import fairseq_train, generated_data_dir

    data = generated_data_dir(tmp_path_factory, train_lines=40)
    save_dir = str(tmp_path_factory.mktemp("composed"))
    fairseq_train([data, "--user-dir", USER_DIR, "--task", "streaming_lm", "--arch", "composed_hybrid_delta_tiny",
                   "--tokens-per-sample", "6", "--batch-size", "2", "--max-update", "2", "--optimizer", "adam",
                   "--lr", "0.003", "--criterion", "lm_loss", "--save-dir", save_dir, "--no-epoch-checkpoints",
                   "--cpu", "--num-workers", "0", "--disable-validation"])
    return data, save_dir


def test_a_composed_model_scores_and_streams_like_fairseq_eval_lm(composed_checkpoint):
    data, save_dir = composed_checkpoint
    lm = hub.load(os.path.join(save_dir, "checkpoint_last.pt"), device="cpu")  # dict.txt: where it was trained
    text = "w1 w2 w3 w4 w5 w6 w7 w8 w9\nw3 w4"
    assert torch.equal(lm.score(text)["log_probs"], lm.score(text)["log_probs"])
    from fairseq.data import data_utils

    lines = data_utils.load_indexed_dataset(os.path.join(data, "valid"), lm.dictionary)
    tokens = torch.cat([lines[i] for i in range(len(lines))])
    ours = lm.score_document(tokens)
    result = fairseq_eval_lm([data, "--user-dir", USER_DIR, "--path", os.path.join(save_dir, "checkpoint_last.pt"),
                              "--task", "streaming_lm", "--batch-size", "1", "--tokens-per-sample", "6",
                              "--gen-subset", "valid", "--cpu", "--num-workers", "0"])
    assert ours["protocol"] == "stream(B=1, T=6, cold)"
    assert bits_per_token(ours) == pytest.approx(float(result["loss"]), abs=1e-4)
    assert len(lm.sample("w1 w2", max_new_tokens=8, seed=1).split()) <= 8
