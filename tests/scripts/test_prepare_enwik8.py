"""scripts/prepare-enwik8.sh end to end, offline, on a small fake enwik8.zip."""
from pathlib import Path

import pytest

from preprocess.enwik8.tokenize import fairseq_token_count
from preprocess.split import split_heldout
from tests.preprocess.helpers import digest, fake_enwik8, make_zip
from tests.scripts.runner import assert_bin_complete, bin_splits, dict_words, run_script, script_env, snapshot

pytestmark = pytest.mark.slow
SCRIPT = "prepare-enwik8.sh"
HELDOUT = 1000
DATA = fake_enwik8()


def env_for(tmp: Path, **overrides: str):
    settings = dict(ENWIK8_MD5=digest(DATA, "md5"), ENWIK8_SIZE=str(len(DATA)), ENWIK8_HELDOUT=str(HELDOUT))
    return script_env(tmp, **{**settings, **overrides})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("enwik8")
    archive = make_zip(str(tmp / "enwik8.zip"), {"enwik8": DATA})
    env = env_for(tmp)
    run = run_script(SCRIPT, env, archive)
    assert run.returncode == 0, run.stderr
    return tmp, env, archive


def test_binarised_splits_follow_prep_enwik8(prepared):
    tmp, _, archive = prepared
    dest = tmp / "data-bin" / "enwik8"
    assert_bin_complete(dest)
    decoded = bin_splits(dest)
    for split, part in zip(("train", "valid", "test"), split_heldout(DATA, HELDOUT)):
        lines = part.split(b"\n")
        if part.endswith(b"\n"):
            lines.pop()
        # one sentence per line of the split, every byte one decimal token, </s> closing each line
        assert decoded[split] == [[str(b) for b in line] + ["</s>"] for line in lines]
        assert sum(len(s) for s in decoded[split]) == fairseq_token_count(part)
        assert (tmp / "data" / "enwik8" / f"{split}.txt.raw").read_bytes() == part
    assert "10" not in dict_words(dest)  # newline is </s>, never a byte token
    assert not (tmp / "data" / "enwik8" / "enwik8").exists()  # the unzipped intermediate is removed
    assert Path(archive).exists()


def test_second_run_does_nothing(prepared):
    tmp, env, _ = prepared
    before = snapshot(tmp / "data", tmp / "data-bin")
    run = run_script(SCRIPT, env)  # no archive needed once prepared
    assert run.returncode == 0, run.stderr
    assert "nothing to do" in run.stdout
    assert snapshot(tmp / "data", tmp / "data-bin") == before


def test_drop_newline_convention(tmp_path):
    archive = make_zip(str(tmp_path / "enwik8.zip"), {"enwik8": DATA})
    run = run_script(SCRIPT, env_for(tmp_path, ENWIK8_NEWLINE="drop"), archive)
    assert run.returncode == 0, run.stderr
    decoded = bin_splits(tmp_path / "data-bin" / "enwik8-nonl")
    for split, part in zip(("train", "valid", "test"), split_heldout(DATA, HELDOUT)):
        assert decoded[split] == [[str(b) for b in part if b != 10] + ["</s>"]]


def test_checksum_mismatch_fails_clearly(tmp_path):
    archive = make_zip(str(tmp_path / "enwik8.zip"), {"enwik8": DATA})
    run = run_script(SCRIPT, env_for(tmp_path, ENWIK8_MD5="0" * 32), archive)
    assert run.returncode != 0
    assert "checksum mismatch for enwik8 (unzipped)" in run.stderr
    assert "expected md5 " + "0" * 32 + ", got " + digest(DATA, "md5") in run.stderr
    assert not (tmp_path / "data-bin").exists()
    assert not (tmp_path / "data" / "enwik8" / "enwik8").exists()
    assert Path(archive).exists()  # a user-supplied archive is never deleted


def test_size_mismatch_fails_clearly(tmp_path):
    archive = make_zip(str(tmp_path / "enwik8.zip"), {"enwik8": DATA})
    run = run_script(SCRIPT, env_for(tmp_path, ENWIK8_SIZE="100000000"), archive)
    assert run.returncode != 0
    assert f"expected 100000000 bytes, got {len(DATA)}" in run.stderr


def test_archive_without_enwik8_member(tmp_path):
    archive = make_zip(str(tmp_path / "enwik8.zip"), {"enwik9": DATA})
    run = run_script(SCRIPT, env_for(tmp_path), archive)
    assert run.returncode != 0
    assert "has no member 'enwik8'" in run.stderr


def test_incomplete_binarisation_is_redone_from_the_text(tmp_path):
    archive = make_zip(str(tmp_path / "enwik8.zip"), {"enwik8": DATA})
    env = env_for(tmp_path)
    assert run_script(SCRIPT, env, archive).returncode == 0
    dest = tmp_path / "data-bin" / "enwik8"
    expected = bin_splits(dest)
    (dest / "valid.bin").unlink()
    Path(archive).unlink()  # the text stage is complete, so the archive is not needed again
    run = run_script(SCRIPT, env)
    assert run.returncode == 0, run.stderr
    assert "binarising enwik8" in run.stdout and "using archive" not in run.stdout
    assert bin_splits(dest) == expected


def test_download_path_with_a_file_url(tmp_path):
    source = make_zip(str(tmp_path / "mirror.zip"), {"enwik8": DATA})
    url = Path(source).as_uri()
    # a bad checksum: the script's own download is deleted so that a rerun fetches it again
    bad = run_script(SCRIPT, env_for(tmp_path, ENWIK8_URL=url, ENWIK8_MD5="1" * 32))
    assert bad.returncode != 0 and "deleted the downloaded" in bad.stderr
    assert not (tmp_path / "data" / "enwik8" / "enwik8.zip").exists()
    good = run_script(SCRIPT, env_for(tmp_path, ENWIK8_URL=url))
    assert good.returncode == 0, good.stderr
    assert f"downloading {url}" in good.stdout
    assert (tmp_path / "data" / "enwik8" / "enwik8.zip").read_bytes() == Path(source).read_bytes()
    assert_bin_complete(tmp_path / "data-bin" / "enwik8")
