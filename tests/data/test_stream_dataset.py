"""StreamDataset layout: every target once, contiguous streams per shard, inputs shifted by one, end padding."""
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
    """Non-padded (input, target) pieces of every stream, in item order."""
    pieces: Dict[int, List[Dict[str, torch.Tensor]]] = {}
    for index in range(len(dataset)):
        item = dataset[index]
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
