"""A token stream laid out as B contiguous streams per shard; one dataset item is one (B, T) batch.

The split is fairseq's binarised ``data-bin/<corpus>/<split>``: every line followed by the ``</s>`` fairseq stores
with it. Concatenated, that is the token stream x_0 .. x_{n-1}; every x_p is a target exactly once and its input is
x_{p-1} (``</s>`` for p = 0, as in fairseq's ``language_modeling`` task), so n targets are scored in all.

Layout (S = B * N streams for N shards; the first n % S streams are one token longer)::

    stream s covers targets [start_s, start_s + len_s),  len_s = n // S + (s < n % S)
    item k  = segment j = k // N of streams [shard * B, (shard + 1) * B), shard = k % N

fairseq's sharded iterator hands item k to shard k % N, so every worker reads segments 0, 1, 2, ... of its own B
streams in order. All segments are T wide except the last (L - j * T for the longest stream length L); rows of a
shorter stream end in pad (at the END of the row, as fairseq's SequenceScorer requires), and padded targets are
ignored by the criterion and the scorer. The layout depends only on n, B, T, N and W (never on --max-tokens).

Warm-up (``warmup_tokens`` W > 0, a multiple of T; NVIDIA's Transformer-XL evaluation): every stream is prefixed
with the W positions that cyclically precede its start, so segments 0 .. W/T - 1 are warm-up segments::

    warm-up of stream s: targets at positions (start_s - W .. start_s - 1) mod n, inputs x_{(p-1) mod n}
    segment j >= W/T   : segment j - W/T of the cold layout above (the scored segments, unchanged)

Warm-up rows hold real inputs (the text preceding the stream, so a stateful model fills its memory) and targets
that are all pad (nothing is scored; with W a multiple of T no row mixes warm-up and scored positions). Stream 0's
warm-up is the end of the split (NVIDIA's cyclic roll); the split's first target keeps ``</s>`` as its input, as in
the cold layout; fairseq's binarised splits end in ``</s>``, so that is also the token cyclically before it. The
warm-up tokens are scored in their own stream, so every target is still scored exactly once. W may not exceed n: a
longer warm-up would repeat the split and put a stream's own upcoming tokens into the memory. With W > n - len_s
(e.g. one stream) the warm-up of stream s includes the end of stream s itself, as NVIDIA's roll does for one stream.

Start offset (``start_offset`` o, 0 <= o < T; training only, ``--train-stream-offset random``): every stream skips
its first o targets (they are not read this epoch) and starts there; the original adaptive-span trainer restarts
all streams at a random column offset in [0, M) whenever they wrap, so block boundaries move between epochs.

Segment lengths (``segment_lengths``, training only, ``--variable-bptt``): scored segment j covers targets
[offsets[j], offsets[j + 1]) of every stream, offsets the cumulative sums of the given lengths (each in [1, T]) cut
at L, so the last segment holds what is left; the default is T for every segment (offsets 0, T, 2T, ..., L).

NVIDIA's ``LMOrderedIterator`` (DeepLearningExamples, ``PyTorch/LanguageModeling/Transformer-XL/pytorch/
data_utils.py``) differs in two ways, both kept out of this layout: it trims the ``n mod B`` remainder tokens
(``data[:n_step * bsz]``) and never scores the first token of each stream (it is the target of the last warm-up
batch), so it scores ``B * (n // B - 1)`` tokens; here every one of the n tokens is scored.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from fairseq.data import FairseqDataset
from fairseq.data.indexed_dataset import MMapIndexedDataset

from .binarized import check_token_range

Sample = Dict[str, Union[int, torch.Tensor, Dict[str, torch.Tensor]]]


def concat_lines(dataset: torch.utils.data.Dataset, vocab_size: int) -> np.ndarray:
    """Concatenate every line of a fairseq indexed dataset (each already ends in ``</s>``) into one 1-D array.

    The array uses the narrowest integer type that holds ``vocab_size`` ids (uint16 or int32), so a
    WikiText-103-sized training split (103M tokens) takes about 400 MB. An ``mmap`` split whose lines lie back to
    back in its ``.bin`` (as fairseq-preprocess writes them) is read in one numpy pass; any other dataset line by
    line in chunks. Every id is checked against ``vocab_size`` before the narrowing cast (``DataError`` naming the
    file otherwise: a corrupt split, or one binarised with another dictionary).
    """
    sizes = np.asarray(dataset.sizes, dtype=np.int64)  # (lines,)
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    tokens = np.empty(int(sizes.sum()), dtype=dtype)  # (n,)
    where = _describe(dataset)
    stored = _contiguous_mmap_tokens(dataset)  # (n,) as stored in the .bin, or None
    if stored is not None:
        check_token_range(stored, vocab_size, where)
        tokens[:] = stored
        return tokens
    offset = 0
    for start in range(0, len(sizes), _CHUNK_LINES):
        lines = [dataset[i].numpy() for i in range(start, min(start + _CHUNK_LINES, len(sizes)))]
        chunk = np.concatenate(lines) if lines else np.empty(0, dtype=np.int64)  # (chunk tokens,)
        check_token_range(chunk, vocab_size, where)
        tokens[offset:offset + len(chunk)] = chunk
        offset += len(chunk)
    return tokens


_CHUNK_LINES = 65536


def _describe(dataset: torch.utils.data.Dataset) -> str:
    """The .bin file of a fairseq indexed dataset, for error messages."""
    prefix = getattr(dataset, "_path", None) or getattr(dataset, "path", None)
    return f"{prefix}.bin" if isinstance(prefix, str) else "the split"


def _contiguous_mmap_tokens(dataset: torch.utils.data.Dataset) -> Optional[np.ndarray]:
    """All tokens of an ``MMapIndexedDataset`` as one read-only view of its ``.bin`` when its lines lie back to back
    from byte 0 (checked on the index: O(lines)); None for other datasets or layouts."""
    if not isinstance(dataset, MMapIndexedDataset):
        return None
    index = dataset._index
    sizes = np.asarray(index.sizes, dtype=np.int64)  # (lines,)
    itemsize = np.dtype(index.dtype).itemsize
    starts = np.cumsum(sizes * itemsize) - sizes * itemsize  # (lines,) byte offsets if back to back
    if not np.array_equal(np.asarray(index._pointers), starts):
        return None
    total = int(sizes.sum())
    if total * itemsize > len(dataset._bin_buffer):
        return None  # a truncated .bin: the line-by-line path reports it as fairseq does
    return np.frombuffer(dataset._bin_buffer, dtype=index.dtype, count=total)


class StreamDataset(FairseqDataset):
    """B contiguous streams per shard over a flat token array; item k is segment k // N of shard k % N.

    Args:
        tokens: (n,) integer token ids, the whole split in order.
        batch_size: B, streams per shard (``--batch-size``).
        tokens_per_sample: T, segment length (``--tokens-per-sample``).
        pad: padding index (fills the end of rows whose stream is shorter).
        eos: the input fed before the first token of the split (fairseq's convention: ``</s>``).
        num_shards: N, data-parallel workers; the layout has B * N streams in all.
        warmup_tokens: W, a multiple of T and at most n: unscored positions that precede every stream (module
            docstring); 0 is the cold layout.
        start_offset: o in [0, T): targets skipped at the start of every stream (module docstring).
        segment_lengths: (m,) lengths in [1, T] of the scored segments, the same for every stream, covering at
            least the longest stream (module docstring); None: every segment T wide. Not with a warm-up.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, tokens_per_sample: int, pad: int, eos: int,
                 num_shards: int = 1, warmup_tokens: int = 0, start_offset: int = 0,
                 segment_lengths: Optional[np.ndarray] = None) -> None:
        super().__init__()
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a flat (n,) array, got shape {tokens.shape}")
        for name, value in (("batch_size", batch_size), ("tokens_per_sample", tokens_per_sample),
                            ("num_shards", num_shards)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self._check_warmup(warmup_tokens, tokens_per_sample, len(tokens))
        if not 0 <= start_offset < tokens_per_sample:
            raise ValueError(f"start_offset must be in [0, tokens_per_sample={tokens_per_sample}), got {start_offset}")
        if start_offset and warmup_tokens:
            raise ValueError("a start offset (training) and a warm-up (evaluation) do not combine")
        if segment_lengths is not None and warmup_tokens:
            raise ValueError("variable segment lengths (training) and a warm-up (evaluation) do not combine")
        self.tokens = tokens
        self.batch_size = batch_size
        self.tokens_per_sample = tokens_per_sample
        self.pad = pad
        self.eos = eos
        self.num_shards = num_shards

        num_streams = batch_size * num_shards
        base, extra = divmod(len(tokens), num_streams)
        stream_ids = np.arange(num_streams, dtype=np.int64)  # (S,)
        lengths = base + (stream_ids < extra).astype(np.int64)  # (S,)
        self.stream_lengths = np.maximum(lengths - start_offset, 0)  # (S,)
        self.stream_starts = stream_ids * base + np.minimum(stream_ids, extra) + start_offset  # (S,)
        self.max_stream_length = int(self.stream_lengths.max())  # L
        self.start_offset = start_offset
        self.segment_lengths = segment_lengths
        # (num_scored_segments + 1,) start of every scored segment, then L; None: j * T (no array for fixed T)
        self.segment_offsets = None if segment_lengths is None else self._segment_offsets(segment_lengths)
        self.num_scored_segments = (math.ceil(self.max_stream_length / tokens_per_sample)
                                    if self.segment_offsets is None else len(self.segment_offsets) - 1)
        self.warmup_tokens = warmup_tokens
        self.warmup_segments = warmup_tokens // tokens_per_sample
        self.num_segments = self.warmup_segments + self.num_scored_segments

    def _segment_offsets(self, segment_lengths: np.ndarray) -> np.ndarray:
        """Start offset of every scored segment within each stream, then L: (num_scored_segments + 1,)."""
        length, width = self.max_stream_length, self.tokens_per_sample
        lengths = np.asarray(segment_lengths, dtype=np.int64)  # (m,)
        if lengths.ndim != 1 or (len(lengths) and (lengths.min() < 1 or lengths.max() > width)):
            raise ValueError(f"segment_lengths must be a flat array of lengths in [1, tokens_per_sample={width}]")
        if length == 0:
            return np.zeros(1, dtype=np.int64)
        ends = np.cumsum(lengths)  # (m,) end offset of every segment
        count = int(np.searchsorted(ends, length))  # the first segment that reaches L is the last one
        if count == len(ends):
            raise ValueError(f"segment_lengths cover {int(ends[-1]) if len(ends) else 0} targets of every stream, "
                             f"fewer than the longest stream ({length}); draw lengths for at least {length}")
        return np.concatenate([[0], ends[:count], [length]]).astype(np.int64)

    @staticmethod
    def _check_warmup(warmup_tokens: int, tokens_per_sample: int, num_tokens: int) -> None:
        if warmup_tokens < 0 or warmup_tokens % tokens_per_sample != 0:
            raise ValueError(f"warmup_tokens must be a non-negative multiple of tokens_per_sample "
                             f"({tokens_per_sample}), got {warmup_tokens}; round it up to "
                             f"{max(0, math.ceil(warmup_tokens / tokens_per_sample) * tokens_per_sample)}")
        if warmup_tokens > num_tokens:
            raise ValueError(f"a warm-up of {warmup_tokens} tokens exceeds the split ({num_tokens} tokens): it "
                             f"would repeat the split and show the model tokens it is about to score; use a "
                             f"warm-up of at most {num_tokens} tokens or a longer split")

    def with_layout(self, batch_size: int, num_shards: int) -> "StreamDataset":
        """The same tokens laid out for another number of streams per shard and of shards (no copy)."""
        if batch_size == self.batch_size and num_shards == self.num_shards:
            return self
        return StreamDataset(self.tokens, batch_size, self.tokens_per_sample, self.pad, self.eos, num_shards,
                             self.warmup_tokens, self.start_offset, self.segment_lengths)

    def with_start_offset(self, start_offset: int) -> "StreamDataset":
        """The same tokens and layout, every stream starting ``start_offset`` targets later (no copy)."""
        if start_offset == self.start_offset:
            return self
        return StreamDataset(self.tokens, self.batch_size, self.tokens_per_sample, self.pad, self.eos,
                             self.num_shards, self.warmup_tokens, start_offset, self.segment_lengths)

    def with_segment_lengths(self, segment_lengths: Optional[np.ndarray]) -> "StreamDataset":
        """The same tokens and layout cut into segments of the given lengths (each in [1, T], covering the
        longest stream; None: T wide) instead of T wide ones (no copy of the tokens)."""
        if segment_lengths is None and self.segment_lengths is None:
            return self
        return StreamDataset(self.tokens, self.batch_size, self.tokens_per_sample, self.pad, self.eos,
                             self.num_shards, self.warmup_tokens, self.start_offset, segment_lengths)

    def with_warmup(self, warmup_tokens: int) -> "StreamDataset":
        """The same tokens and layout with another warm-up (no copy)."""
        if warmup_tokens == self.warmup_tokens:
            return self
        return StreamDataset(self.tokens, self.batch_size, self.tokens_per_sample, self.pad, self.eos,
                             self.num_shards, warmup_tokens)

    def is_warmup(self, index: int) -> bool:
        """Whether item ``index`` is a warm-up segment (inputs only, every target pad)."""
        return index // self.num_shards < self.warmup_segments

    def __len__(self) -> int:
        return self.num_segments * self.num_shards

    def segment_width(self, segment: int) -> int:
        """Width of segment j: T (or its given length), except the last segment, which holds what is left of the
        longest stream; warm-up segments are T wide."""
        scored = segment - self.warmup_segments
        if scored < 0:
            return self.tokens_per_sample
        return self.segment_start(scored + 1) - self.segment_start(scored)

    def segment_start(self, scored: int) -> int:
        """Offset of scored segment ``scored`` (0 <= scored <= num_scored_segments, the last one: L) in every
        stream."""
        if self.segment_offsets is None:
            return min(scored * self.tokens_per_sample, self.max_stream_length)
        return int(self.segment_offsets[scored])

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} items")
        shard, segment = index % self.num_shards, index // self.num_shards
        width = self.segment_width(segment)
        streams = np.arange(shard * self.batch_size, (shard + 1) * self.batch_size)  # (B,)
        if segment < self.warmup_segments:
            return self._warmup_item(streams, segment)
        offset = self.segment_start(segment - self.warmup_segments)
        valid = np.clip(self.stream_lengths[streams] - offset, 0, width)  # (B,) real targets per row
        columns = np.arange(width)  # (T,)
        keep = columns[None, :] < valid[:, None]  # (B, T) False on the end padding
        positions = self.stream_starts[streams, None] + offset + columns[None, :]  # (B, T) target positions
        positions = np.where(keep, positions, 0)  # (B, T) padded slots read token 0, then get pad
        target = self.tokens[positions].astype(np.int64)  # (B, T)
        source = self.tokens[np.maximum(positions - 1, 0)].astype(np.int64)  # (B, T) x_{p-1}
        source[positions == 0] = self.eos  # the split's first target is predicted from </s>
        target[~keep] = self.pad
        source[~keep] = self.pad
        return {
            "id": torch.from_numpy(streams),  # (B,) global stream index of each row
            "segment": segment,
            "warmup": False,
            "net_input": {
                "src_tokens": torch.from_numpy(source),  # (B, T)
                "src_lengths": torch.from_numpy(valid.astype(np.int64)),  # (B,)
            },
            "target": torch.from_numpy(target),  # (B, T)
            "ntokens": int(valid.sum()),
            "nsentences": self.batch_size,
        }

    def _warmup_item(self, streams: np.ndarray, segment: int) -> Sample:
        """Warm-up segment j < W/T of ``streams``: inputs x_{(p-1) mod n} for the target positions
        p = (start_s - W + j * T + c) mod n, c < T, every target pad (scored in its own stream instead)."""
        n, width = len(self.tokens), self.tokens_per_sample
        offset = segment * width - self.warmup_tokens  # < 0: target offset from each stream's start
        columns = np.arange(width)  # (T,)
        positions = (self.stream_starts[streams, None] + offset + columns[None, :]) % n  # (B, T) cyclic
        source = self.tokens[(positions - 1) % n].astype(np.int64)  # (B, T) the text cyclically preceding
        target = np.full_like(source, self.pad)  # (B, T) nothing scored
        return {
            "id": torch.from_numpy(streams),  # (B,)
            "segment": segment,
            "warmup": True,
            "net_input": {
                "src_tokens": torch.from_numpy(source),  # (B, T)
                "src_lengths": torch.full((len(streams),), width, dtype=torch.long),  # (B,) every input is real
            },
            "target": torch.from_numpy(target),  # (B, T)
            "ntokens": 0,
            "nsentences": self.batch_size,
        }

    def collater(self, samples: List[Sample]) -> Sample:
        """Items are whole batches: a batch of one item is that item; an empty batch (shard fill) is ``{}``."""
        if len(samples) == 0:
            return {}
        if len(samples) != 1:
            raise ValueError(f"StreamDataset items are already (B, T) batches; got a batch of {len(samples)} items")
        return samples[0]

    def num_tokens(self, index: int) -> int:
        return self.batch_size * self.segment_width(index // self.num_shards)

    def size(self, index: int) -> int:
        return self.segment_width(index // self.num_shards)

    def ordered_indices(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)

    @property
    def supports_prefetch(self) -> bool:
        return False
