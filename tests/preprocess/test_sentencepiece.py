"""preprocess.sentencepiece: train on train only, encode line by line, binarise with fairseq-preprocess."""
import os

import pytest
import sentencepiece as spm

from preprocess.sentencepiece.model import encode_file, train_model
from preprocess.sentencepiece.prepare import main
from tests.preprocess.helpers import fairseq_preprocess

WORDS = "the quick brown fox jumps over lazy dog and then sleeps under a tree while <unk> birds sing".split()


def write_corpus(root, n_lines: int = 400) -> dict:
    paths = {}
    for k, split in enumerate(("train", "valid", "test")):
        lines = [" ".join(WORDS[(i * 3 + j * (k + 1)) % len(WORDS)] for j in range(3 + i % 9))
                 for i in range(n_lines if split == "train" else 40)]
        lines[5] = " "  # a WikiText-style blank line must stay a (blank) line
        paths[split] = os.path.join(root, f"{split}.txt")
        with open(paths[split], "w") as f:
            f.write("\n".join(lines) + "\n")
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("spm_corpus")))


@pytest.mark.parametrize("model_type", ["unigram", "bpe", "char"])
def test_encode_keeps_lines_and_round_trips(tmp_path, corpus, model_type):
    model = train_model(corpus["train"], str(tmp_path / "m"), vocab_size=40, model_type=model_type)
    assert n_lines(corpus["valid"]) == encode_file(model, corpus["valid"], str(tmp_path / "valid.txt"))
    encoded = (tmp_path / "valid.txt").read_text(encoding="utf-8").split("\n")[:-1]
    original = open(corpus["valid"]).read().split("\n")[:-1]
    assert len(encoded) == len(original) and encoded[5] == ""
    sp = spm.SentencePieceProcessor(model_file=model)
    for enc, orig in zip(encoded, original):
        assert sp.decode(enc.split()) == " ".join(orig.split())


def test_unk_symbol_stays_one_piece(tmp_path, corpus):
    model = train_model(corpus["train"], str(tmp_path / "m"), vocab_size=40, user_defined_symbols=["<unk>"])
    sp = spm.SentencePieceProcessor(model_file=model)
    assert "<unk>" in sp.encode("birds <unk> sing", out_type=str)


def test_training_is_deterministic(tmp_path, corpus):
    a = train_model(corpus["train"], str(tmp_path / "a"), vocab_size=40)
    b = train_model(corpus["train"], str(tmp_path / "b"), vocab_size=40)
    assert open(a.replace(".model", ".vocab")).read() == open(b.replace(".model", ".vocab")).read()


def n_lines(path: str) -> int:
    with open(path) as f:
        return sum(1 for _ in f)


@pytest.mark.slow
def test_cli_binarises(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("FAIRSEQ_PREPROCESS", fairseq_preprocess())
    dest = tmp_path / "bin"
    assert main(["--input-dir", os.path.dirname(corpus["train"]), "--outdir", str(tmp_path / "spm"),
                 "--destdir", str(dest), "--vocab-size", "40", "--model-type", "bpe"]) == 0
    for name in ("dict.txt", "train.bin", "train.idx", "valid.bin", "valid.idx", "test.bin", "test.idx"):
        assert (dest / name).stat().st_size > 0
    assert (tmp_path / "spm" / "spm.model").exists()
    # the dictionary holds exactly the pieces of the encoded train split (fairseq's <unk> is a special)
    train_pieces = set((tmp_path / "spm" / "train.txt").read_text(encoding="utf-8").split()) - {"<unk>"}
    dict_words = [line.split()[0] for line in (dest / "dict.txt").read_text(encoding="utf-8").splitlines()]
    assert {w for w in dict_words if not w.startswith("madeupword")} == train_pieces
    assert (len(dict_words) + 4) % 8 == 0


def test_cli_requires_the_three_splits(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--input-dir", str(tmp_path), "--outdir", str(tmp_path / "o")])
    assert "no train file" in capsys.readouterr().err
