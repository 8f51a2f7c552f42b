"""preprocess.split: the 90M/5M/5M held-out split of enwik8 and text8, with small override sizes."""
import pytest

from preprocess.split import HELDOUT, split_heldout


def test_default_is_five_million():
    assert HELDOUT == 5_000_000


def test_bytes_boundaries():
    assert split_heldout(b"0123456789", 2) == (b"012345", b"67", b"89")


def test_str_boundaries():
    assert split_heldout("abcdefg", 3) == ("a", "bcd", "efg")


def test_parts_concatenate_to_input():
    data = bytes(range(256)) * 3
    train, valid, test = split_heldout(data, 100)
    assert (len(train), len(valid), len(test)) == (568, 100, 100)
    assert train + valid + test == data


@pytest.mark.parametrize("n", [0, 1, 8, 10])
def test_too_short_input_is_rejected(n):
    with pytest.raises(ValueError, match="need more than"):
        split_heldout(b"x" * n, 5)


def test_nonpositive_heldout_is_rejected():
    with pytest.raises(ValueError, match="positive"):
        split_heldout(b"abcdef", 0)
