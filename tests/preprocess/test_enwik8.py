"""preprocess.enwik8: byte tokenisation identical to prep_enwik8.py, newline conventions, 90/5/5 split."""
import io
import random

import pytest

from preprocess.enwik8.prepare import main, prepare
from preprocess.enwik8.tokenize import encode_bytes, fairseq_token_count, write_encoded
from preprocess.stats import file_stats


def reference_prep_enwik8(part: bytes) -> bytes:
    """The tokenisation line of Smerity/sha-rnn data/enwik8/prep_enwik8.py (written in text mode, ASCII)."""
    return " ".join([str(c) if c != ord("\n") else "\n" for c in part]).encode("ascii")


def random_bytes(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.choice([10, 10, 32, 65, 200, 0, 255, 13, 9]) if rng.random() < 0.3 else rng.randrange(256)
                 for _ in range(n))


def test_small_example():
    assert encode_bytes(b"ab\ncd") == b"97 98 \n 99 100"


def test_newline_at_edges():
    assert encode_bytes(b"\na\n") == b"\n 97 \n"
    assert encode_bytes(b"\n\n") == b"\n \n"


def test_drop_convention_removes_newlines_and_keeps_one_line():
    assert encode_bytes(b"ab\ncd\n", "drop") == b"97 98 99 100"


@pytest.mark.parametrize("seed", range(3))
def test_matches_reference_script(seed):
    data = random_bytes(3000, seed) + bytes(range(256))
    assert encode_bytes(data) == reference_prep_enwik8(data)


@pytest.mark.parametrize("newline", ["eos", "drop"])
@pytest.mark.parametrize("chunk", [1, 2, 7, 4096])
def test_streaming_equals_in_memory(newline, chunk):
    data = b"\n\nab\n\n\ncd\ne\n" + random_bytes(500, 7)
    out = io.BytesIO()
    write_encoded(data, out, newline, chunk=chunk)
    assert out.getvalue() == encode_bytes(data, newline)


def test_unknown_convention_is_rejected():
    with pytest.raises(ValueError, match="newline"):
        encode_bytes(b"a", "keep")


@pytest.mark.parametrize("newline", ["eos", "drop"])
@pytest.mark.parametrize("data", [b"ab\ncd", b"ab\ncd\n", b"\nab", b"a\n\n\nb", b"\n", b"abc", b"x\n" * 5])
def test_token_count_is_what_fairseq_counts(tmp_path, data, newline):
    path = tmp_path / "split.txt"
    path.write_bytes(encode_bytes(data, newline))
    assert file_stats(str(path)).tokens == fairseq_token_count(data, newline)


def test_token_count_examples():
    # every newline byte is one </s>, plus one more when the split does not end with a newline
    assert fairseq_token_count(b"ab\ncd") == 6
    assert fairseq_token_count(b"ab\ncd\n") == 6
    assert fairseq_token_count(b"ab\ncd\n", "drop") == 5


def test_prepare_writes_split_files(tmp_path):
    data = b"0123456789\nABCDEFGHI\n\nabc"  # 25 bytes
    counts = prepare(data, str(tmp_path), heldout=4)
    assert (tmp_path / "train.txt.raw").read_bytes() == b"0123456789\nABCDEF"
    assert (tmp_path / "valid.txt.raw").read_bytes() == b"GHI\n"
    assert (tmp_path / "test.txt.raw").read_bytes() == b"\nabc"
    assert (tmp_path / "train.txt").read_bytes() == b"48 49 50 51 52 53 54 55 56 57 \n 65 66 67 68 69 70"
    assert (tmp_path / "valid.txt").read_bytes() == b"71 72 73 \n"
    assert (tmp_path / "test.txt").read_bytes() == b"\n 97 98 99"
    # train: 17 bytes + final </s>; valid ends with its newline; test: </s> 97 98 99 </s>
    assert counts == {"train": 18, "valid": 4, "test": 5}
    for name, n in counts.items():
        assert file_stats(str(tmp_path / f"{name}.txt")).tokens == n


def test_prepare_drop_convention_types(tmp_path):
    prepare(b"ab\nab\nba\n" * 3 + b"aaaa\nbbbb", str(tmp_path), heldout=3, newline="drop", raw=False)
    stats = file_stats(str(tmp_path / "train.txt"))
    assert stats.lines == 1 and stats.types == 2  # no newline token: only "97" and "98"
    assert not (tmp_path / "train.txt.raw").exists()


def test_cli_rejects_short_input(tmp_path, capsys):
    src = tmp_path / "enwik8"
    src.write_bytes(b"tiny")
    assert main(["--input", str(src), "--outdir", str(tmp_path / "out"), "--heldout", "2"]) == 1
    assert "need more than" in capsys.readouterr().err
