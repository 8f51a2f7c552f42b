"""scripts/prepare-text8.sh end to end, offline, on a small fake text8.zip."""
from pathlib import Path

import pytest

from preprocess.split import split_heldout
from tests.preprocess.helpers import digest, fake_text8, make_zip
from tests.scripts.runner import assert_bin_complete, bin_splits, dict_words, run_script, script_env, snapshot

pytestmark = pytest.mark.slow
SCRIPT = "prepare-text8.sh"
HELDOUT = 300
DATA = fake_text8()


def archive_and_env(tmp: Path, data: bytes = DATA, **overrides: str):
    archive = make_zip(str(tmp / "text8.zip"), {"text8": data})
    settings = dict(TEXT8_ZIP_SIZE=str(Path(archive).stat().st_size), TEXT8_SIZE=str(len(data)),
                    TEXT8_SHA1=digest(data, "sha1"), TEXT8_HELDOUT=str(HELDOUT))
    return archive, script_env(tmp, **{**settings, **overrides})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text8")
    archive, env = archive_and_env(tmp)
    env["TEXT8_ZIP"] = archive  # the archive given through the environment instead of the argument
    run = run_script(SCRIPT, env)
    assert run.returncode == 0, run.stderr
    return tmp, env


def test_each_split_is_one_sentence_of_characters(prepared):
    tmp, _ = prepared
    dest = tmp / "data-bin" / "text8"
    assert_bin_complete(dest)
    decoded = bin_splits(dest)
    for split, part in zip(("train", "valid", "test"), split_heldout(DATA.decode(), HELDOUT)):
        assert decoded[split] == [["_" if c == " " else c for c in part.strip()] + ["</s>"]]
    assert set(dict_words(dest)) <= set("abcdefghijklmnopqrstuvwxyz_")


def test_second_run_does_nothing(prepared):
    tmp, env = prepared
    before = snapshot(tmp / "data", tmp / "data-bin")
    run = run_script(SCRIPT, env)
    assert run.returncode == 0 and "nothing to do" in run.stdout
    assert snapshot(tmp / "data", tmp / "data-bin") == before


def test_zip_size_mismatch(tmp_path):
    archive, env = archive_and_env(tmp_path, TEXT8_ZIP_SIZE="31344016")
    run = run_script(SCRIPT, env, archive)
    assert run.returncode != 0
    assert "size mismatch for text8.zip" in run.stderr and "expected 31344016 bytes" in run.stderr


def test_sha1_mismatch(tmp_path):
    archive, env = archive_and_env(tmp_path, TEXT8_SHA1="f" * 40)
    run = run_script(SCRIPT, env, archive)
    assert run.returncode != 0
    assert "checksum mismatch for text8 (unzipped)" in run.stderr and "expected sha1 " + "f" * 40 in run.stderr
    assert not (tmp_path / "data-bin").exists()


def test_characters_outside_text8_alphabet(tmp_path):
    archive, env = archive_and_env(tmp_path, data=DATA + b" Capital letters")
    run = run_script(SCRIPT, env, archive)
    assert run.returncode != 0
    assert "a-z and space" in run.stderr
    assert not (tmp_path / "data-bin").exists()
