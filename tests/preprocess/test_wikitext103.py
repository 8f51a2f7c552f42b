"""preprocess.wikitext103 and preprocess.unzip: the three token files are extracted unchanged."""
import zipfile

import pytest

from preprocess.unzip import MemberMissing, extract_member, main as unzip_main
from preprocess.wikitext103.prepare import extract_splits, main, member_name
from tests.preprocess.helpers import make_zip

FILES = {
    "train": b" \n = Valkyria Chronicles III = \n \n Senj\xc5\x8d no Valkyria 3 : <unk> Chronicles \n",
    "valid": b" \n = Homarus gammarus = \n",
    "test": b" \n = Robert <unk> = \n",
}


def test_member_names():
    assert member_name("train") == "wikitext-103/wiki.train.tokens"


def test_extract_splits_is_byte_identical(tmp_path):
    archive = make_zip(str(tmp_path / "w.zip"), {member_name(s): data for s, data in FILES.items()})
    paths = extract_splits(archive, str(tmp_path / "out"))
    for split, data in FILES.items():
        with open(paths[split], "rb") as f:
            assert f.read() == data
        assert paths[split].endswith(f"wiki.{split}.tokens")


def test_missing_member_names_what_is_there(tmp_path, capsys):
    archive = make_zip(str(tmp_path / "w.zip"), {"wikitext-2/wiki.train.tokens": b"x\n"})
    with pytest.raises(MemberMissing, match="wikitext-2/wiki.train.tokens"):
        extract_splits(archive, str(tmp_path / "out"))
    assert main(["--archive", archive, "--outdir", str(tmp_path / "out")]) == 1
    assert "has no member 'wikitext-103/wiki.train.tokens'" in capsys.readouterr().err


def test_not_a_zip(tmp_path, capsys):
    bogus = tmp_path / "bogus.zip"
    bogus.write_bytes(b"<html>404</html>")
    with pytest.raises(zipfile.BadZipFile):
        extract_member(str(bogus), "x", str(tmp_path / "x"))
    assert unzip_main([str(bogus), "x", str(tmp_path / "x")]) == 1
    assert "bogus.zip" in capsys.readouterr().err
