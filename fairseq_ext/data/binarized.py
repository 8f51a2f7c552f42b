"""Checks of a binarised split (``<prefix>.idx`` + ``<prefix>.bin``, written by fairseq-preprocess) before fairseq
reads it, and datasets that check every item read against the dictionary.

fairseq 0.12.3.1 trusts both files: a truncated ``.bin`` fails later with ``buffer is smaller than requested size``
or ``offset must be non-negative``, a corrupt ``.idx`` with a bare ``AssertionError``, a broadcast error or an
``AttributeError`` from ``__del__``, and a ``.bin`` with out-of-range token ids with an ``IndexError`` inside the
embedding (or, for ids that still fit, a silently wrong number). Here each is a ``DataError`` that names the file
and the fix. The checks read the header and the per-line arrays of the index: numpy over the number of lines, never
over the tokens (WikiText-103's training split has 1.8M lines, 103M tokens).

Formats (``fairseq.data.indexed_dataset``; ``--dataset-impl``):

* ``mmap`` (the default): ``.idx`` = magic ``MMIDIDX\\0\\0``, version 1 (<Q), dtype code (<B), item count n (<Q),
  sizes (n x int32), byte pointers (n x int64); the items lie back to back in ``.bin``;
* ``lazy`` / ``cached``: ``.idx`` = magic ``TNTIDX\\0\\0``, version 1, dtype code and element size, n and the number
  of size entries s (all <Q), dim offsets (n + 1 x int64), element offsets (n + 1 x int64), sizes (s x int64); the
  ``.bin`` holds the ids + 1 (Lua indexing), which fairseq subtracts again.
"""
import os
import struct
from typing import Any, Optional, Tuple

import numpy as np
import torch
from fairseq.data.indexed_dataset import (IndexedCachedDataset, IndexedDataset, MMapIndexedDataset,
                                          _code_to_dtype, data_file_path, index_file_path)

from fairseq_ext.errors import ConfigError, DataError

REBINARISE = ("binarise the split again with fairseq-preprocess (scripts/prepare-<corpus>.sh), or copy the data "
              "directory again if it was copied")
REBINDICT = ("binarise it again with the data directory's dictionary: fairseq-preprocess --only-source --srcdict "
             "<data dir>/dict.txt (scripts/prepare-<corpus>.sh)")
MMAP_MAGIC = MMapIndexedDataset.Index._HDR_MAGIC  # 9 bytes
TNT_MAGIC = IndexedDataset._HDR_MAGIC  # 8 bytes
MMAP_HEADER = struct.Struct("<9sQBQ")  # magic, version, dtype code, item count n: 26 bytes
TNT_HEADER = struct.Struct("<8sQQQQQ")  # magic, version, dtype code, element size, n, size entries s: 48 bytes
IMPL_OF_MAGIC = {MMAP_MAGIC[:8]: "mmap", TNT_MAGIC: "lazy/cached"}


class SplitDataError(DataError):
    """A binarised split that cannot be used as it is (one line also when raised in a data-loader worker: see
    ``UserError``)."""


def check_binarized_split(prefix: str, impl: str) -> None:
    """Raise ``SplitDataError`` unless ``prefix``.idx / .bin are a consistent split of format ``impl`` (``mmap``,
    ``lazy`` or ``cached``; other formats are not checked); ``ConfigError`` when the files have the other format."""
    if impl not in ("mmap", "lazy", "cached"):
        return
    idx, data = index_file_path(prefix), data_file_path(prefix)
    with open(idx, "rb") as f:
        head = f.read(TNT_HEADER.size)
    if not head:
        raise SplitDataError(f"{idx} is empty (0 bytes): {REBINARISE}")
    wanted = "mmap" if impl == "mmap" else "lazy/cached"
    found = IMPL_OF_MAGIC.get(head[:8])
    if found is None:
        raise SplitDataError(f"{idx} is not an index written by fairseq-preprocess (it starts with {head[:9]!r}, "
                             f"not {MMAP_MAGIC!r} or {TNT_MAGIC!r}): {REBINARISE}")
    if found != wanted:
        raise ConfigError(f"{idx} was written with --dataset-impl {found}, but --dataset-impl {impl} was given; "
                          f"drop --dataset-impl (fairseq detects the format) or pass --dataset-impl "
                          f"{'mmap' if found == 'mmap' else 'cached'}")
    if impl == "mmap":
        _check_mmap(idx, data, head)
    else:
        _check_tnt(idx, data, head)


def _header(idx: str, head: bytes, layout: struct.Struct) -> Tuple[Any, ...]:
    if len(head) < layout.size:
        raise SplitDataError(f"{idx} is truncated ({len(head)} bytes; the header alone has {layout.size}): "
                             f"{REBINARISE}")
    return layout.unpack_from(head)


def _token_dtype(idx: str, code: int) -> np.dtype:
    dtype = _code_to_dtype.get(code)
    if dtype is None or not np.issubdtype(dtype, np.integer):
        raise SplitDataError(f"{idx} names element type code {code}, not an integer type fairseq-preprocess "
                             f"writes (the header is corrupt): {REBINARISE}")
    return np.dtype(dtype)


def _check_version(idx: str, version: int) -> None:
    if version != 1:
        raise SplitDataError(f"{idx} has index version {version}; fairseq reads version 1 (the header is "
                             f"corrupt): {REBINARISE}")


def _check_index_length(idx: str, expected: int, lines: int) -> None:
    actual = os.path.getsize(idx)
    if actual != expected:
        state = "truncated" if actual < expected else "longer than its header says"
        raise SplitDataError(f"{idx} is {state}: its {lines:,} lines need {expected:,} bytes, the file has "
                             f"{actual:,} (a corrupt header or an interrupted write): {REBINARISE}")


def _check_data_length(idx: str, data: str, expected: int, itemsize: int) -> None:
    actual = os.path.getsize(data)
    if actual < expected:
        raise SplitDataError(f"{data} is truncated: {idx} lists {expected // itemsize:,} tokens ({expected:,} "
                             f"bytes), the file has {actual:,} bytes: {REBINARISE}")
    if actual > expected:
        raise SplitDataError(f"{data} is longer than its index says ({actual:,} bytes; {idx} lists {expected:,}): "
                             f"the .idx and .bin come from different runs or the .bin is corrupt: {REBINARISE}")


def _check_mmap(idx: str, data: str, head: bytes) -> None:
    _, version, code, lines = _header(idx, head, MMAP_HEADER)
    _check_version(idx, version)
    dtype = _token_dtype(idx, code)
    _check_index_length(idx, MMAP_HEADER.size + 12 * lines, lines)
    sizes = np.fromfile(idx, dtype=np.int32, count=lines, offset=MMAP_HEADER.size).astype(np.int64)  # (n,)
    pointers = np.fromfile(idx, dtype=np.int64, count=lines, offset=MMAP_HEADER.size + 4 * lines)  # (n,) bytes
    if lines and sizes.min() < 0:
        raise SplitDataError(f"{idx} is corrupt: line {int(np.argmin(sizes))} has a negative length: {REBINARISE}")
    ends = np.cumsum(sizes * dtype.itemsize)  # (n,) byte end of every line
    starts = ends - sizes * dtype.itemsize  # (n,) where the lines must start: back to back from byte 0
    wrong = np.flatnonzero(pointers != starts)
    if len(wrong):
        line = int(wrong[0])
        raise SplitDataError(f"{idx} is corrupt: line {line} starts at byte {int(pointers[line]):,}, but the line "
                             f"lengths before it put it at byte {int(starts[line]):,}: {REBINARISE}")
    _check_data_length(idx, data, int(ends[-1]) if lines else 0, dtype.itemsize)


def _check_tnt(idx: str, data: str, head: bytes) -> None:
    _, version, code, element_size, lines, size_entries = _header(idx, head, TNT_HEADER)
    _check_version(idx, version)
    dtype = _token_dtype(idx, code)
    if element_size != dtype.itemsize:
        raise SplitDataError(f"{idx} gives element size {element_size} for {dtype.name} (the header is corrupt): "
                             f"{REBINARISE}")
    _check_index_length(idx, TNT_HEADER.size + 16 * (lines + 1) + 8 * size_entries, lines)
    offset = TNT_HEADER.size
    dim_offsets = np.fromfile(idx, dtype=np.int64, count=lines + 1, offset=offset)  # (n + 1,)
    data_offsets = np.fromfile(idx, dtype=np.int64, count=lines + 1, offset=offset + 8 * (lines + 1))  # (n + 1,)
    sizes = np.fromfile(idx, dtype=np.int64, count=size_entries, offset=offset + 16 * (lines + 1))  # (s,)
    for name, offsets, last in (("dimension", dim_offsets, size_entries), ("data", data_offsets, None)):
        if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or (last is not None and offsets[-1] != last):
            raise SplitDataError(f"{idx} is corrupt: its {name} offsets do not grow from 0"
                                 f"{'' if last is None else f' to {last}'}: {REBINARISE}")
    if size_entries == lines and np.array_equal(dim_offsets, np.arange(lines + 1)):  # one dimension per line
        spans = np.diff(data_offsets)  # (n,)
        wrong = np.flatnonzero(spans != sizes)
        if len(wrong):
            line = int(wrong[0])
            raise SplitDataError(f"{idx} is corrupt: line {line} has length {int(sizes[line])} but spans "
                                 f"{int(spans[line])} elements: {REBINARISE}")
    _check_data_length(idx, data, int(data_offsets[-1]) * element_size, element_size)


# ======================================================================================================================
# Items checked against the dictionary as they are read
# ======================================================================================================================
def check_token_range(values: np.ndarray, vocab_size: int, where: str) -> None:
    """Raise ``SplitDataError`` unless every id in ``values`` lies in [0, vocab_size); ``where`` names the data."""
    if values.size == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise SplitDataError(f"{where} holds token id {bad}, but the dictionary has {vocab_size} types (ids "
                             f"0..{vocab_size - 1}): the .bin is corrupt or was binarised with another dictionary; "
                             f"{REBINDICT}")


def checked_item(item: torch.Tensor, vocab_size: Optional[int], prefix: str, index: int) -> torch.Tensor:
    """``item`` (line ``index`` of split ``prefix``) after checking its ids against ``vocab_size`` (None: no check);
    one min/max over an item that is read anyway."""
    if vocab_size is not None and item.numel():
        low, high = torch.aminmax(item)
        if int(low) < 0 or int(high) >= vocab_size:
            check_token_range(item.numpy(), vocab_size, f"{data_file_path(prefix)} (line {index})")
    return item


# Subclasses with the fairseq class as their only base (so ``with_token_checks`` can re-class an instance fairseq
# built); ``vocab_size`` None checks nothing.
class CheckedMMapIndexedDataset(MMapIndexedDataset):
    """``MMapIndexedDataset`` whose items are checked; the dictionary size survives pickling (data-loader workers)."""

    vocab_size: Optional[int] = None

    def __getitem__(self, index: int) -> torch.Tensor:
        return checked_item(super().__getitem__(index), self.vocab_size, self._path, index)

    def __getstate__(self) -> Tuple[str, Optional[int]]:
        return self._path, self.vocab_size

    def __setstate__(self, state: Tuple[str, Optional[int]]) -> None:
        path, self.vocab_size = state
        self._do_init(path)


class CheckedIndexedDataset(IndexedDataset):
    """``IndexedDataset`` (``--dataset-impl lazy``) whose items are checked."""

    vocab_size: Optional[int] = None

    def __getitem__(self, index: int) -> torch.Tensor:
        return checked_item(super().__getitem__(index), self.vocab_size, self.path, index)


class CheckedIndexedCachedDataset(IndexedCachedDataset):
    """``IndexedCachedDataset`` (``--dataset-impl cached``) whose items are checked."""

    vocab_size: Optional[int] = None

    def __getitem__(self, index: int) -> torch.Tensor:
        return checked_item(super().__getitem__(index), self.vocab_size, self.path, index)


CHECKED_CLASSES = {MMapIndexedDataset: CheckedMMapIndexedDataset, IndexedDataset: CheckedIndexedDataset,
                   IndexedCachedDataset: CheckedIndexedCachedDataset}


def with_token_checks(dataset: Any, vocab_size: int) -> Any:
    """``dataset`` (as fairseq's ``make_dataset`` built it) checking its items against ``vocab_size``; datasets of
    other classes are returned unchanged."""
    checked = CHECKED_CLASSES.get(type(dataset))
    if checked is not None:
        dataset.__class__ = checked
        dataset.vocab_size = vocab_size
    return dataset
