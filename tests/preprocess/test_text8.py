"""preprocess.text8: prep_text8.py tokenisation (one line per split, space -> _), 90/5/5 split, charset check."""
import random

import pytest

from preprocess.stats import file_stats
from preprocess.text8.prepare import check_charset, encode_ascii, encode_chars, fairseq_token_count, main, prepare


def reference_prep_text8(part: str) -> str:
    """The tokenisation line of kimiyoung/transformer-xl prep_text8.py."""
    return " ".join(["_" if c == " " else c for c in part.strip()])


def test_small_example():
    assert encode_chars(" ab c ") == "a b _ c"
    assert encode_ascii(b" ab c ") == b"a b _ c"


@pytest.mark.parametrize("text", ["", " ", "a", "  a  b  ", "\x1cab\x1f", "\tab\n"])
def test_ascii_fast_path_matches_reference_on_edge_cases(text):
    assert encode_ascii(text.encode("ascii")).decode("ascii") == reference_prep_text8(text) == encode_chars(text)


def test_ascii_fast_path_matches_reference_on_random_text():
    rng = random.Random(0)
    text = "".join(rng.choice("abc  z") for _ in range(5000))
    assert encode_ascii(text.encode("ascii")).decode("ascii") == reference_prep_text8(text)


def test_charset_check():
    check_charset(b" anarchism originated as a term")
    with pytest.raises(ValueError, match=r"b'A' at offset 3"):
        check_charset(b"ab Ac")
    with pytest.raises(ValueError, match=r"offset 2"):
        check_charset(b"ab\ncd")


def test_prepare_splits_and_single_lines(tmp_path):
    data = b" abc def ghi jk lmn "  # 20 characters
    counts = prepare(data, str(tmp_path), heldout=5)
    assert (tmp_path / "train.txt.raw").read_bytes() == b" abc def g"
    assert (tmp_path / "valid.txt.raw").read_bytes() == b"hi jk"
    assert (tmp_path / "test.txt.raw").read_bytes() == b" lmn "
    assert (tmp_path / "train.txt").read_bytes() == b"a b c _ d e f _ g"  # leading space stripped
    assert (tmp_path / "valid.txt").read_bytes() == b"h i _ j k"
    assert (tmp_path / "test.txt").read_bytes() == b"l m n"
    assert counts == {"train": 10, "valid": 6, "test": 4}
    for name, n in counts.items():
        stats = file_stats(str(tmp_path / f"{name}.txt"))
        assert stats.lines == 1 and stats.tokens == n


def test_token_count():
    assert fairseq_token_count(b" ab ") == 3
    assert fairseq_token_count(b"   ") == 0


def test_cli_rejects_bad_characters(tmp_path, capsys):
    src = tmp_path / "text8"
    src.write_bytes(b"abc def Ghi jkl mno")
    assert main(["--input", str(src), "--outdir", str(tmp_path / "out"), "--heldout", "3"]) == 1
    assert "a-z and space" in capsys.readouterr().err
