"""scripts/prepare-wikitext-103.sh end to end, offline, on a small fake wikitext-103-v1.zip."""
from pathlib import Path

import pytest

from tests.preprocess.helpers import digest, file_digest, make_zip
from tests.scripts.runner import assert_bin_complete, bin_splits, dict_words, run_script, script_env, snapshot

pytestmark = pytest.mark.slow
SCRIPT = "prepare-wikitext-103.sh"
FILES = {
    "train": " \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : <unk> Chronicles is a game . \n"
             " The game began development in 2010 . \n",
    "valid": " \n = Homarus gammarus = \n \n Homarus gammarus is a lobster . \n",
    "test": " \n = Robert <unk> = \n \n Robert <unk> is an actor . \n",
}


def archive_and_env(tmp: Path, **overrides: str):
    archive = make_zip(str(tmp / "wikitext-103-v1.zip"),
                       {f"wikitext-103/wiki.{s}.tokens": text.encode("utf-8") for s, text in FILES.items()})
    settings = dict(WIKITEXT103_SHA256=file_digest(archive, "sha256"),
                    WIKITEXT103_VALID_SHA256=digest(FILES["valid"].encode("utf-8"), "sha256"),
                    WIKITEXT103_TEST_SHA256=digest(FILES["test"].encode("utf-8"), "sha256"))
    return archive, script_env(tmp, **{**settings, **overrides})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wt103")
    archive, env = archive_and_env(tmp)
    run = run_script(SCRIPT, env, archive)
    assert run.returncode == 0, run.stderr
    return tmp, env


def test_files_used_as_is_with_eos_per_line(prepared):
    tmp, _ = prepared
    dest = tmp / "data-bin" / "wikitext-103"
    assert_bin_complete(dest)
    decoded = bin_splits(dest)
    train_words = set(FILES["train"].split())
    for split, text in FILES.items():
        assert (tmp / "data" / "wikitext-103" / f"wiki.{split}.tokens").read_text(encoding="utf-8") == text
        expected = [[w if w in train_words else "<unk>" for w in line.split()] + ["</s>"]
                    for line in text.split("\n")[:-1]]
        assert decoded[split] == expected
    words = dict_words(dest)
    assert "Homarus" not in words and "Valkyria" in words  # dictionary from train only
    assert "<unk>" not in words  # the corpus's <unk> is fairseq's special
    assert (len(words) + 4) % 8 == 0


def test_second_run_does_nothing(prepared):
    tmp, env = prepared
    before = snapshot(tmp / "data", tmp / "data-bin")
    run = run_script(SCRIPT, env)
    assert run.returncode == 0 and "nothing to do" in run.stdout
    assert snapshot(tmp / "data", tmp / "data-bin") == before


def test_zip_checksum_mismatch(tmp_path):
    archive, env = archive_and_env(tmp_path, WIKITEXT103_SHA256="a" * 64)
    run = run_script(SCRIPT, env, archive)
    assert run.returncode != 0
    assert "checksum mismatch for wikitext-103-v1.zip" in run.stderr
    assert "expected sha256 " + "a" * 64 + ", got " + file_digest(archive, "sha256") in run.stderr


REAL_VALID_SHA256 = "9aee9f52d6e77de6c7751fc5e7c44287db3ec0eaf15477098acc6b93c1c4250b"


def test_member_checksum_mismatch_with_zip_check_skipped(tmp_path):
    # e.g. a re-zipped copy: the zip check is skipped, the member checks still run (and catch the fake)
    archive, env = archive_and_env(tmp_path, WIKITEXT103_SHA256="", WIKITEXT103_VALID_SHA256=REAL_VALID_SHA256)
    run = run_script(SCRIPT, env, archive)
    assert run.returncode != 0
    assert "sha256 check of wikitext-103-v1.zip skipped" in run.stderr
    assert "checksum mismatch for wiki.valid.tokens" in run.stderr
    assert not (tmp_path / "data" / "wikitext-103" / "wiki.valid.tokens").exists()
    assert not (tmp_path / "data-bin").exists()
