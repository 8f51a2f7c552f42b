"""Checks of binarised splits (fairseq_ext/data/binarized.py): every way a .idx / .bin pair can be damaged is a
SplitDataError naming the file and fairseq-preprocess; items read are checked against the dictionary (also from a
data-loader worker); concat_lines reads an mmap split in one pass and refuses out-of-range ids."""
import os
import pickle
import struct
from typing import Callable, List

import numpy as np
import pytest
import torch
from fairseq.data import indexed_dataset

from fairseq_ext.data import concat_lines
from fairseq_ext.data.binarized import (CheckedIndexedCachedDataset, CheckedMMapIndexedDataset, SplitDataError,
                                        check_binarized_split, with_token_checks)
from fairseq_ext.errors import ConfigError

LINES = [[5, 6, 2], [7, 2], [8, 9, 10, 11, 2], [2]]
VOCAB = 12


def write_split(prefix: str, impl: str, lines: List[List[int]] = LINES) -> str:
    """``prefix``.idx / .bin written by fairseq's own builders, as fairseq-preprocess --dataset-impl ``impl`` does."""
    builder = indexed_dataset.make_builder(prefix + ".bin", impl, vocab_size=VOCAB)
    for line in lines:
        builder.add_item(torch.tensor(line, dtype=torch.int64))
    builder.finalize(prefix + ".idx")
    return prefix


def rewrite(path: str, change: Callable[[bytearray], bytes]) -> None:
    with open(path, "rb") as f:
        data = bytearray(f.read())
    with open(path, "wb") as f:
        f.write(change(data))


def poke(offset: int, value: bytes) -> Callable[[bytearray], bytes]:
    def change(data: bytearray) -> bytes:
        data[offset:offset + len(value)] = value
        return bytes(data)
    return change


MMAP_SIZES = 26  # header bytes before the sizes array
MMAP_CASES = {
    "truncated .bin": (".bin", lambda d: bytes(d[:-3]), r"train\.bin is truncated: .*train\.idx lists 11 tokens"),
    "longer .bin": (".bin", lambda d: bytes(d) + b"\0\0", r"train\.bin is longer than its index says"),
    "truncated .idx": (".idx", lambda d: bytes(d[:-8]), r"train\.idx is truncated: its 4 lines need 74 bytes"),
    "header only": (".idx", lambda d: bytes(d[:20]), r"train\.idx is truncated \(20 bytes; the header alone"),
    "empty .idx": (".idx", lambda d: b"", r"train\.idx is empty"),
    "magic": (".idx", poke(0, b"XXXX"), r"train\.idx is not an index written by fairseq-preprocess"),
    "version": (".idx", poke(9, struct.pack("<Q", 7)), r"index version 7"),
    "dtype code": (".idx", poke(17, bytes([6])), r"element type code 6"),
    "line count": (".idx", poke(18, struct.pack("<Q", 9)), r"train\.idx is truncated: its 9 lines"),
    "size": (".idx", poke(MMAP_SIZES + 4, struct.pack("<i", 5)), r"line 2 starts at byte 10, but .* byte 16"),
    "negative size": (".idx", poke(MMAP_SIZES, struct.pack("<i", -1)), r"line 0 has a negative length"),
    "pointer": (".idx", poke(MMAP_SIZES + 16 + 8, struct.pack("<q", 4)), r"line 1 starts at byte 4"),
}


@pytest.mark.parametrize("case", sorted(MMAP_CASES))
def test_damaged_mmap_split_is_refused_naming_the_file_and_the_fix(tmp_path, case):
    prefix = write_split(str(tmp_path / "train"), "mmap")
    check_binarized_split(prefix, "mmap")  # intact
    suffix, change, message = MMAP_CASES[case]
    rewrite(prefix + suffix, change)
    with pytest.raises(SplitDataError, match=message) as error:
        check_binarized_split(prefix, "mmap")
    assert "fairseq-preprocess" in str(error.value) and "\n" not in str(error.value)


TNT_CASES = {
    "truncated .bin": (".bin", lambda d: bytes(d[:-4]), r"train\.bin is truncated"),
    "truncated .idx": (".idx", lambda d: bytes(d[:-8]), r"train\.idx is truncated: its 4 lines"),
    "element size": (".idx", poke(24, struct.pack("<Q", 2)), r"element size 2 for int32"),
    "data offsets": (".idx", poke(48 + 40 + 8, struct.pack("<q", 4)), r"line 0 has length 3 but spans 4"),
    "dimension offsets": (".idx", poke(48 + 8, struct.pack("<q", 3)), r"dimension offsets do not grow"),
}


@pytest.mark.parametrize("case", sorted(TNT_CASES))
def test_damaged_cached_split_is_refused(tmp_path, case):
    prefix = write_split(str(tmp_path / "train"), "cached")
    for impl in ("cached", "lazy"):
        check_binarized_split(prefix, impl)
    suffix, change, message = TNT_CASES[case]
    rewrite(prefix + suffix, change)
    with pytest.raises(SplitDataError, match=message):
        check_binarized_split(prefix, "cached")


def test_format_other_than_requested_is_a_config_error(tmp_path):
    mmap = write_split(str(tmp_path / "a"), "mmap")
    cached = write_split(str(tmp_path / "b"), "cached")
    with pytest.raises(ConfigError, match="written with --dataset-impl mmap, but --dataset-impl cached"):
        check_binarized_split(mmap, "cached")
    with pytest.raises(ConfigError, match="--dataset-impl lazy/cached, but --dataset-impl mmap.*--dataset-impl cached"):
        check_binarized_split(cached, "mmap")
    check_binarized_split(mmap, "raw")  # other formats are not checked


@pytest.mark.parametrize("impl", ["mmap", "cached", "lazy"])
def test_items_are_checked_against_the_dictionary(tmp_path, impl):
    prefix = write_split(str(tmp_path / "train"), "cached" if impl == "lazy" else impl)
    dataset = with_token_checks(indexed_dataset.make_dataset(prefix, impl, fix_lua_indexing=True), VOCAB)
    if impl == "cached":
        dataset.prefetch(range(len(LINES)))
    assert [dataset[i].tolist() for i in range(len(dataset))] == LINES
    dataset.vocab_size = 10  # line 2 holds 10 and 11
    with pytest.raises(SplitDataError, match=r"train\.bin \(line 2\) holds token id 11, but the dictionary has 10"):
        dataset[2]


def test_checked_mmap_dataset_keeps_the_check_through_pickling(tmp_path):
    prefix = write_split(str(tmp_path / "train"), "mmap")
    dataset = with_token_checks(indexed_dataset.MMapIndexedDataset(prefix), 10)
    assert type(dataset) is CheckedMMapIndexedDataset
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.vocab_size == 10 and copy[0].tolist() == LINES[0]
    with pytest.raises(SplitDataError, match="holds token id 11"):
        copy[2]
    cached = with_token_checks(indexed_dataset.IndexedCachedDataset(write_split(str(tmp_path / "c"), "cached")), 10)
    assert type(cached) is CheckedIndexedCachedDataset


def test_error_in_a_data_loader_worker_arrives_as_one_line(tmp_path):
    """torch rebuilds a worker's exception from "Caught ... Original Traceback ..."; the message stays one line."""
    prefix = write_split(str(tmp_path / "train"), "mmap")
    dataset = with_token_checks(indexed_dataset.MMapIndexedDataset(prefix), 10)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1)
    with pytest.raises(SplitDataError) as error:
        list(loader)
    assert str(error.value).startswith(f"{prefix}.bin (line 2) holds token id 11") and "\n" not in str(error.value)


def test_concat_lines_reads_an_mmap_split_in_one_pass(tmp_path, monkeypatch):
    prefix = write_split(str(tmp_path / "train"), "mmap")
    dataset = indexed_dataset.MMapIndexedDataset(prefix)
    expected = [t for line in LINES for t in line]
    calls = []
    monkeypatch.setattr(indexed_dataset.MMapIndexedDataset, "__getitem__", lambda self, i: calls.append(i))
    tokens = concat_lines(dataset, VOCAB)
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected and calls == []
    with pytest.raises(SplitDataError, match=r"train\.bin holds token id 11, but the dictionary has 11 types"):
        concat_lines(dataset, 11)


def test_concat_lines_line_by_line_checks_ids_before_narrowing(tmp_path):
    prefix = write_split(str(tmp_path / "train"), "cached")
    dataset = indexed_dataset.IndexedCachedDataset(prefix, fix_lua_indexing=True)
    dataset.prefetch(range(len(LINES)))
    assert concat_lines(dataset, VOCAB).tolist() == [t for line in LINES for t in line]
    with pytest.raises(SplitDataError, match=r"train\.bin holds token id 11"):
        concat_lines(dataset, 11)


def test_intact_preprocessed_split_passes(tmp_path):
    from tests.harness import fairseq_preprocess, random_corpus

    data = fairseq_preprocess(str(tmp_path / "bin"), random_corpus(str(tmp_path / "train.txt"), 40, seed=3))
    prefix = os.path.join(data, "train")
    check_binarized_split(prefix, "mmap")
    assert len(concat_lines(indexed_dataset.MMapIndexedDataset(prefix), 24)) == os.path.getsize(prefix + ".bin") // 2
