"""StreamDataset layout: every target once, contiguous streams per shard, inputs shifted by one, end padding;
the evaluation warm-up (unscored prefixes of the preceding text) keeps every target scored once."""
import itertools
from typing import Dict, List

import numpy as np
import pytest
import torch

from fairseq_ext.data import StreamDataset, concat_lines

PAD, EOS = 1, 2


def unique_tokens(n: int) -> np.ndarray:
    """Token p has value p + 4, so every value names its position (and none is a special symbol)."""
    return (np.arange(n) + 4).astype(np.int32)


def rows_by_stream(dataset: StreamDataset) -> Dict[int, List[Dict[str, torch.Tensor]]]:
    """Non-padded (input, target) pieces of every stream, in item order (warm-up items skipped)."""
    pieces: Dict[int, List[Dict[str, torch.Tensor]]] = {}
    for index in range(len(dataset)):
        item = dataset[index]
        if item["warmup"]:
            continue
        source, target = item["net_input"]["src_tokens"], item["target"]
        assert source.shape == target.shape and source.size(0) == dataset.batch_size
        for row, stream in enumerate(item["id"].tolist()):
            length = int(item["net_input"]["src_lengths"][row])
            assert torch.all(target[row, length:] == PAD) and torch.all(source[row, length:] == PAD)  # end only
            assert torch.all(target[row, :length] != PAD)
            pieces.setdefault(stream, []).append({"source": source[row, :length], "target": target[row, :length]})
    return pieces


@pytest.mark.parametrize("n,batch,length,shards", [
    (100, 1, 7, 1), (100, 4, 5, 1), (101, 3, 4, 1), (97, 2, 64, 1), (7, 3, 2, 1), (5, 4, 3, 2),
    (250, 3, 8, 2), (251, 2, 5, 3), (64, 2, 8, 2),
])
def test_every_target_exactly_once_in_contiguous_streams(n, batch, length, shards):
    tokens = unique_tokens(n)
    dataset = StreamDataset(tokens, batch, length, pad=PAD, eos=EOS, num_shards=shards)
    pieces = rows_by_stream(dataset)
    assert sorted(pieces) == list(range(batch * shards))
    scored = []
    for stream in range(batch * shards):  # streams in order tile the split
        target = torch.cat([p["target"] for p in pieces[stream]])
        source = torch.cat([p["source"] for p in pieces[stream]])
        scored.append(target)
        if len(target):
            assert torch.equal(source[1:], target[:-1])  # segment j + 1 continues segment j
            assert int(source[0]) == (EOS if int(target[0]) == 4 else int(target[0]) - 1)  # x_{p-1}, </s> at p=0
    assert torch.equal(torch.cat(scored), torch.from_numpy(tokens).long())
    assert sum(dataset[i]["ntokens"] for i in range(len(dataset))) == n
    lengths = [len(torch.cat([p["target"] for p in pieces[s]])) for s in range(batch * shards)]
    assert max(lengths) - min(lengths) <= 1  # balanced: the remainder goes to the first streams


@pytest.mark.parametrize("n,batch,length", [(100, 3, 7), (96, 4, 8)])
def test_segment_widths(n, batch, length):
    dataset = StreamDataset(unique_tokens(n), batch, length, pad=PAD, eos=EOS)
    widths = [dataset[i]["target"].size(1) for i in range(len(dataset))]
    longest = -(-n // batch)
    assert widths[:-1] == [length] * (len(widths) - 1) and sum(widths) == longest
    assert [dataset.size(i) for i in range(len(dataset))] == widths
    assert dataset.num_tokens(0) == batch * length


def test_shards_read_their_own_streams_in_order():
    """Item k goes to shard k % N (fairseq's ShardedIterator); each shard's items are segments 0, 1, ... of its
    B streams, and the shards' streams are disjoint."""
    batch, shards = 2, 3
    dataset = StreamDataset(unique_tokens(200), batch, 6, pad=PAD, eos=EOS, num_shards=shards)
    for shard in range(shards):
        items = [dataset[k] for k in range(shard, len(dataset), shards)]
        assert [item["segment"] for item in items] == list(range(len(items)))
        for item in items:
            assert item["id"].tolist() == list(range(shard * batch, (shard + 1) * batch))
        for previous, current in itertools.pairwise(items):
            assert torch.equal(current["net_input"]["src_tokens"][:, 0], previous["target"][:, -1])


def test_with_layout_shares_tokens():
    dataset = StreamDataset(unique_tokens(50), 2, 4, pad=PAD, eos=EOS)
    assert dataset.with_layout(2, 1) is dataset
    other = dataset.with_layout(3, 2)
    assert other.tokens is dataset.tokens and other.batch_size == 3 and other.num_shards == 2
    assert len(other) == 2 * other.num_segments


def test_collater_and_errors():
    dataset = StreamDataset(unique_tokens(20), 2, 4, pad=PAD, eos=EOS)
    item = dataset[0]
    assert dataset.collater([item]) is item
    assert dataset.collater([]) == {}
    with pytest.raises(ValueError, match="already"):
        dataset.collater([item, item])
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    with pytest.raises(ValueError, match="batch_size"):
        StreamDataset(unique_tokens(20), 0, 4, pad=PAD, eos=EOS)
    with pytest.raises(ValueError, match="flat"):
        StreamDataset(unique_tokens(20).reshape(4, 5), 1, 4, pad=PAD, eos=EOS)


# ======================================================================================================================
# evaluation warm-up (NVIDIA's Transformer-XL protocol)
# ======================================================================================================================


WARMUP_LAYOUTS = [  # n, B, T, warm-up segments, shards
    (100, 4, 5, 2, 1), (101, 3, 4, 3, 1), (97, 2, 8, 1, 2), (250, 3, 8, 2, 2), (251, 2, 5, 4, 3),
    (64, 2, 8, 8, 1),  # W = n: the longest warm-up allowed
    (100, 1, 7, 3, 1),  # one stream: its warm-up is its own end (NVIDIA's roll does the same)
    (7, 3, 2, 1, 1), (5, 4, 3, 1, 2),  # short and empty streams
]


@pytest.mark.parametrize("n,batch,length,warm,shards", WARMUP_LAYOUTS)
def test_warmup_scores_every_target_exactly_once(n, batch, length, warm, shards):
    """Across all items and shards: every position of the split is a non-pad target exactly once, with the input
    x_{p-1} (</s> for p = 0), at the position its value names; warm-up items score nothing."""
    tokens = unique_tokens(n)
    dataset = StreamDataset(tokens, batch, length, pad=PAD, eos=EOS, num_shards=shards, warmup_tokens=warm * length)
    times_scored = np.zeros(n, dtype=np.int64)  # (n,)
    for index in range(len(dataset)):
        item = dataset[index]
        source, target = item["net_input"]["src_tokens"], item["target"]  # (B, T)
        keep = target != PAD  # (B, T)
        assert item["warmup"] == (index // shards < warm) and item["segment"] == index // shards
        assert item["ntokens"] == int(keep.sum())
        if item["warmup"]:
            assert not keep.any() and (source != PAD).all()  # real inputs, nothing scored
            assert item["net_input"]["src_lengths"].tolist() == [length] * batch
            continue
        for value, previous in zip(target[keep].tolist(), source[keep].tolist()):
            position = value - 4
            times_scored[position] += 1
            assert previous == (EOS if position == 0 else int(tokens[position - 1]))
    assert times_scored.tolist() == [1] * n
    assert sum(dataset[i]["ntokens"] for i in range(len(dataset))) == n


@pytest.mark.parametrize("n,batch,length,warm,shards", WARMUP_LAYOUTS)
def test_warmup_inputs_are_the_text_cyclically_preceding_each_stream(n, batch, length, warm, shards):
    """Stream s reads x_{start_s - W - 1} .. x_{start_s - 2} (indices mod n) in its warm-up, then continues exactly
    as in the cold layout: warm-up + scored inputs are contiguous text; stream 0 takes the end of the split."""
    tokens, width = unique_tokens(n), warm * length
    dataset = StreamDataset(tokens, batch, length, pad=PAD, eos=EOS, num_shards=shards, warmup_tokens=width)
    cold = StreamDataset(tokens, batch, length, pad=PAD, eos=EOS, num_shards=shards)
    assert len(dataset) == len(cold) + warm * shards
    warmup_inputs: Dict[int, List[int]] = {}
    for index in range(warm * shards):
        item = dataset[index]
        for row, stream in enumerate(item["id"].tolist()):
            warmup_inputs.setdefault(stream, []).extend(item["net_input"]["src_tokens"][row].tolist())
    assert sorted(warmup_inputs) == list(range(batch * shards))
    for stream, inputs in warmup_inputs.items():
        start = int(cold.stream_starts[stream])
        assert inputs == [int(tokens[(start - width - 1 + i) % n]) for i in range(width)]
    for index in range(len(cold)):  # after the warm-up: the cold layout, item for item
        item, expected = dataset[index + warm * shards], cold[index]
        assert item["segment"] == expected["segment"] + warm and item["id"].tolist() == expected["id"].tolist()
        assert not item["warmup"] and item["ntokens"] == expected["ntokens"]
        for key in ("src_tokens", "src_lengths"):
            assert torch.equal(item["net_input"][key], expected["net_input"][key])
        assert torch.equal(item["target"], expected["target"])
        assert dataset.size(index + warm * shards) == cold.size(index)


def test_warmup_then_first_scored_inputs_continue_the_text():
    """The first scored input of stream s > 0 is x_{start_s - 1}, right after its warm-up; stream 0 keeps </s>."""
    tokens = unique_tokens(40)
    dataset = StreamDataset(tokens, 4, 5, pad=PAD, eos=EOS, warmup_tokens=10)  # streams of 10, warm-up 2 segments
    last_warmup, first_scored = dataset[1], dataset[2]
    assert last_warmup["warmup"] and not first_scored["warmup"]
    assert first_scored["net_input"]["src_tokens"][:, 0].tolist() == [EOS, 13, 23, 33]  # x_9, x_19, x_29
    assert last_warmup["net_input"]["src_tokens"][:, -1].tolist() == [42, 12, 22, 32]  # x_38, x_8, x_18, x_28
    assert dataset[0]["net_input"]["src_tokens"][0].tolist() == [33, 34, 35, 36, 37]  # stream 0: x_29 .. x_33


def test_warmup_with_layout_and_shards():
    dataset = StreamDataset(unique_tokens(60), 2, 4, pad=PAD, eos=EOS, warmup_tokens=8)
    other = dataset.with_layout(3, 2)
    assert other.warmup_tokens == 8 and other.warmup_segments == 2 and other.tokens is dataset.tokens
    assert len(other) == 2 * (2 + other.num_scored_segments)
    for shard in range(2):  # every shard: warm-up segments 0, 1, then its scored segments, numbered on
        items = [other[k] for k in range(shard, len(other), 2)]
        assert [item["segment"] for item in items] == list(range(len(items)))
        assert [item["warmup"] for item in items] == [True, True] + [False] * (len(items) - 2)
        assert all(item["id"].tolist() == [3 * shard, 3 * shard + 1, 3 * shard + 2] for item in items)
    assert dataset.with_warmup(8) is dataset
    cold = dataset.with_warmup(0)
    assert cold.warmup_tokens == 0 and len(cold) == dataset.num_scored_segments and cold.tokens is dataset.tokens
    assert [dataset.is_warmup(i) for i in range(3)] == [True, True, False]
    assert [dataset.size(i) for i in range(2)] == [4, 4] and dataset.num_tokens(0) == 2 * 4


def test_warmup_errors_name_the_fix():
    with pytest.raises(ValueError, match="multiple of tokens_per_sample.*round it up to 8"):
        StreamDataset(unique_tokens(20), 2, 4, pad=PAD, eos=EOS, warmup_tokens=6)
    with pytest.raises(ValueError, match="non-negative"):
        StreamDataset(unique_tokens(20), 2, 4, pad=PAD, eos=EOS, warmup_tokens=-4)
    with pytest.raises(ValueError, match="exceeds the split.*at most 20 tokens"):
        StreamDataset(unique_tokens(20), 2, 4, pad=PAD, eos=EOS, warmup_tokens=24)
    with pytest.raises(ValueError, match="exceeds the split"):
        StreamDataset(unique_tokens(20), 2, 4, pad=PAD, eos=EOS).with_warmup(24)


class Lines(torch.utils.data.Dataset):
    """The two things concat_lines reads from a fairseq indexed dataset: ``sizes`` and ``__getitem__``."""

    def __init__(self, lines: List[List[int]]) -> None:
        self.lines = [torch.tensor(line) for line in lines]
        self.sizes = np.array([len(line) for line in lines])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.lines[index]

    def __len__(self) -> int:
        return len(self.lines)


def test_concat_lines_keeps_order_and_narrows_dtype():
    lines = Lines([[5, 6, EOS], [EOS], [70000, EOS]])
    tokens = concat_lines(lines, vocab_size=70001)
    assert tokens.dtype == np.int32 and tokens.tolist() == [5, 6, EOS, EOS, 70000, EOS]
    small = concat_lines(Lines([[5, EOS], [7, EOS]]), vocab_size=100)
    assert small.dtype == np.uint16 and small.tolist() == [5, EOS, 7, EOS]


@pytest.mark.parametrize("n,batch,length,offset,shards", [(100, 4, 5, 3, 1), (101, 3, 8, 7, 2), (9, 3, 4, 3, 1)])
def test_start_offset_skips_the_first_targets_of_every_stream(n, batch, length, offset, shards):
    tokens = unique_tokens(n)
    base = StreamDataset(tokens, batch, length, pad=PAD, eos=EOS, num_shards=shards)
    shifted = base.with_start_offset(offset)
    assert shifted.tokens is base.tokens and shifted.with_start_offset(0).start_offset == 0
    cold, moved = rows_by_stream(base), rows_by_stream(shifted)
    for stream in range(batch * shards):
        whole = torch.cat([p["target"] for p in cold[stream]])
        expected = whole[offset:]  # the stream minus its first ``offset`` targets, inputs still x_{p-1}
        got = torch.cat([p["target"] for p in moved.get(stream, [])]) if stream in moved else whole[:0]
        assert torch.equal(got, expected)
        if len(got):
            assert int(torch.cat([p["source"] for p in moved[stream]])[0]) == int(got[0]) - 1
    assert shifted.with_layout(batch + 1, shards).start_offset == offset
    with pytest.raises(ValueError, match="start_offset"):
        base.with_start_offset(length)


@pytest.mark.parametrize("n,batch,length,shards,offset", [
    (100, 1, 7, 1, 0), (101, 3, 8, 1, 0), (251, 2, 9, 3, 0), (250, 3, 8, 2, 5), (7, 3, 4, 1, 0),
])
def test_variable_segment_lengths_keep_every_target_once_in_contiguous_streams(n, batch, length, shards, offset):
    tokens = unique_tokens(n)
    base = StreamDataset(tokens, batch, length, pad=PAD, eos=EOS, num_shards=shards).with_start_offset(offset)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, length + 1, size=base.max_stream_length + 1)  # (m,) covers the longest stream
    varied = base.with_segment_lengths(lengths)
    assert varied.tokens is base.tokens and varied.start_offset == offset
    widths = [varied.segment_width(j) for j in range(varied.num_segments)]
    assert widths[:-1] == lengths[:len(widths) - 1].tolist()  # the given lengths, the last one what is left
    assert 1 <= widths[-1] <= lengths[len(widths) - 1] and sum(widths) == base.max_stream_length
    for index in range(len(varied)):
        item = varied[index]
        assert item["target"].shape == (batch, widths[index // shards]) == item["net_input"]["src_tokens"].shape
    cold, moved = rows_by_stream(base), rows_by_stream(varied)
    assert sorted(moved) == sorted(cold)
    for stream in cold:  # the same targets and inputs per stream, in order, only cut elsewhere
        for key in ("source", "target"):
            assert torch.equal(torch.cat([p[key] for p in moved[stream]]), torch.cat([p[key] for p in cold[stream]]))
    assert sum(varied[i]["ntokens"] for i in range(len(varied))) == sum(base[i]["ntokens"] for i in range(len(base)))
    if offset == 0:
        scored = torch.cat([torch.cat([p["target"] for p in moved[s]]) for s in range(batch * shards)])
        assert torch.equal(scored, torch.from_numpy(tokens).long())  # every target exactly once
    relaid = varied.with_layout(batch, shards + 1)  # the lengths travel with the layout
    assert relaid.segment_lengths is lengths
    assert varied.with_segment_lengths(None).segment_width(0) == min(length, base.max_stream_length)


def test_variable_segment_lengths_are_checked():
    base = StreamDataset(unique_tokens(100), 2, 8, pad=PAD, eos=EOS)  # streams of 50 targets
    with pytest.raises(ValueError, match="fewer than the longest stream"):
        base.with_segment_lengths(np.full(6, 8))  # 48 < 50
    with pytest.raises(ValueError, match=r"in \[1, tokens_per_sample=8\]"):
        base.with_segment_lengths(np.full(10, 9))
    with pytest.raises(ValueError, match=r"in \[1, tokens_per_sample=8\]"):
        base.with_segment_lengths(np.array([0] + [8] * 7))
    with pytest.raises(ValueError, match="warm-up"):
        StreamDataset(unique_tokens(100), 2, 8, pad=PAD, eos=EOS, warmup_tokens=8, segment_lengths=np.full(7, 8))
    assert base.with_segment_lengths(np.full(7, 8)).num_segments == base.num_segments  # fixed T is the default
    assert base.with_segment_lengths(None) is base
