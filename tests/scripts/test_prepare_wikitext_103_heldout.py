"""scripts/prepare-wikitext-103-heldout.sh offline on small stand-ins for WikiText-103's valid and test files: train =
the test file, valid = the valid file, word level unchanged and byte level in the enwik8 format; checksums checked;
a second run does nothing; a missing folder names the fix."""
import hashlib

import pytest
from fairseq.data import Dictionary
from fairseq.data.indexed_dataset import MMapIndexedDataset

from tests.scripts.runner import run_script, script_env, snapshot

pytestmark = pytest.mark.slow
SCRIPT = "prepare-wikitext-103-heldout.sh"
TEST_TEXT = " = Robert Boulter = \n \n Robert Boulter is an English actor . \n He had a role in 2000 . \n"
VALID_TEXT = " = Homarus gammarus = \n \n Homarus gammarus is a lobster — naïve . \n"


def _decode(destdir, split):
    dictionary = Dictionary.load(str(destdir / "dict.txt"))
    ds = MMapIndexedDataset(str(destdir / split))
    return [[dictionary[i] for i in ds[k].tolist()] for k in range(len(ds))]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("heldout")
    src = tmp / "src"
    src.mkdir()
    (src / "wiki.test.tokens").write_text(TEST_TEXT, encoding="utf-8")
    (src / "wiki.valid.tokens").write_text(VALID_TEXT, encoding="utf-8")
    sha = {name: hashlib.sha256((src / name).read_bytes()).hexdigest() for name in ("wiki.test.tokens",
                                                                                     "wiki.valid.tokens")}
    env = script_env(tmp, WIKITEXT103_VALID_SHA256=sha["wiki.valid.tokens"],
                     WIKITEXT103_TEST_SHA256=sha["wiki.test.tokens"])
    run = run_script(SCRIPT, env, str(src))
    assert run.returncode == 0, run.stderr
    return tmp, src, env


def test_word_level_trains_on_test_and_validates_on_valid(prepared):
    tmp, _, _ = prepared
    dest = tmp / "data-bin" / "wt103-heldout-word"
    assert not (dest / "test.bin").exists()
    for split, text in (("train", TEST_TEXT), ("valid", VALID_TEXT)):
        expected = [line.split() + ["</s>"] for line in text.splitlines()]
        decoded = _decode(dest, split)
        if split == "valid":  # words never seen in the training text are <unk>
            train_words = set(TEST_TEXT.split())
            expected = [[w if w in train_words or w == "</s>" else "<unk>" for w in line] for line in expected]
        assert decoded == expected, split


def test_byte_level_is_the_same_files_as_bytes(prepared):
    tmp, _, _ = prepared
    dest = tmp / "data-bin" / "wt103-heldout-byte"
    for split, text in (("train", TEST_TEXT), ("valid", VALID_TEXT)):
        data = text.encode("utf-8")
        decoded = _decode(dest, split)
        assert sum(len(line) for line in decoded) == len(data)  # every byte one token, newline bytes -> </s>
        if split == "train":
            assert decoded == [[str(b) for b in line] + ["</s>"] for line in data.split(b"\n")[:-1]]


def test_second_run_does_nothing(prepared):
    tmp, src, env = prepared
    before = snapshot(tmp / "data", tmp / "data-bin")
    run = run_script(SCRIPT, env, str(src))
    assert run.returncode == 0 and "nothing to do" in run.stdout
    assert snapshot(tmp / "data", tmp / "data-bin") == before


def test_checksum_mismatch_and_missing_files_name_the_fix(prepared, tmp_path):
    _, src, _ = prepared
    env = script_env(tmp_path, WIKITEXT103_VALID_SHA256="0" * 64)
    run = run_script(SCRIPT, env, str(src))
    assert run.returncode != 0 and "checksum mismatch for wiki.valid.tokens" in run.stderr
    run = run_script(SCRIPT, script_env(tmp_path), str(tmp_path / "nowhere"))
    assert run.returncode != 0 and "lacks wiki.valid.tokens" in run.stderr and "WIKITEXT103_HELDOUT_DIR" in run.stderr
