"""The state contract (fairseq_ext/state.py): detach, reorder, batch_size, device moves and KV-cache growth, on
flat and nested states, including per-layer tuples with empty (None) entries."""
import pytest
import torch

from fairseq_ext.state import DecoderState, HiddenCache, KVCache


def kv(b=3, h=2, s=4, d=5, requires_grad=False):
    return KVCache(torch.randn(b, h, s, d, requires_grad=requires_grad), torch.randn(b, h, s, d))


def test_states_are_frozen():
    cache = kv()
    with pytest.raises(AttributeError):
        cache.key = cache.value


def test_kv_cache_append_grows_keys_values_and_padding_mask():
    cache = kv(s=4)
    assert cache.length == 4 and cache.key_padding_mask is None
    grown = cache.append(torch.randn(3, 2, 2, 5), torch.randn(3, 2, 2, 5), torch.tensor([[True, False]] * 3))
    assert grown.length == 6
    assert grown.key_padding_mask.tolist() == [[False] * 4 + [True, False]] * 3  # old keys were not padding
    assert torch.equal(grown.key[:, :, :4], cache.key)
    no_mask = cache.append(torch.randn(3, 2, 1, 5), torch.randn(3, 2, 1, 5), None)
    assert no_mask.key_padding_mask is None and no_mask.length == 5


def test_reorder_selects_batch_rows_everywhere_including_nested_states():
    layers = DecoderState((None, kv(), HiddenCache(torch.arange(3.0)[:, None, None].expand(3, 2, 4))))
    order = torch.tensor([2, 2, 0, 1])
    out = layers.reorder(order)
    assert out.layers[0] is None
    assert torch.equal(out.layers[1].key, layers.layers[1].key[order])
    assert out.layers[2].hidden[:, 0, 0].tolist() == [2.0, 2.0, 0.0, 1.0]
    assert out.batch_size == 4 and layers.batch_size == 3


def test_detach_cuts_the_graph_and_keeps_values():
    cache = kv(requires_grad=True)
    scaled = KVCache(cache.key * 2, cache.value)
    detached = DecoderState((scaled,)).detach()
    assert not detached.layers[0].key.requires_grad
    assert torch.equal(detached.layers[0].key, scaled.key.detach())


def test_batch_size_of_an_empty_state_is_an_error():
    with pytest.raises(ValueError, match="holds no tensor"):
        _ = DecoderState((None, None)).batch_size


def test_hidden_cache_length_and_device_move():
    memory = DecoderState((HiddenCache(torch.zeros(2, 7, 3)), HiddenCache(torch.zeros(2, 5, 3))))
    assert [layer.length for layer in memory.layers] == [7, 5]
    assert memory.to("cpu").layers[1].hidden.shape == (2, 5, 3)


def test_plain_round_trip_for_checkpoints(tmp_path):
    """state_to_plain gives dicts/lists of tensors that torch's weights-only loader accepts; state_from_plain
    rebuilds the same nested states (tuples, None entries and int fields included)."""
    from fairseq_ext.state import state_from_plain, state_to_plain

    memory = DecoderState((HiddenCache(torch.randn(2, 3, 4)), HiddenCache(torch.randn(2, 3, 4))), offset=2)
    nested = DecoderState((memory, None, KVCache(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4))))
    path = str(tmp_path / "state.pt")
    torch.save(state_to_plain(nested), path)
    back = state_from_plain(torch.load(path, weights_only=True))
    assert isinstance(back, DecoderState) and back.layers[1] is None and back.offset == 0
    assert back.layers[0].offset == 2 and torch.equal(back.layers[0].layers[1].hidden, memory.layers[1].hidden)
    assert torch.equal(back.layers[2].value, nested.layers[2].value) and back.layers[2].key_padding_mask is None
    assert state_from_plain(None) is None and state_to_plain(None) is None
    with pytest.raises(ValueError, match="unknown state class"):
        state_from_plain({"__state__": "NoSuchState"})


def test_rows_and_cat_states_split_and_join_batch_rows_of_nested_states():
    """--batch-split: rows(start, stop) cuts every tensor's batch dimension (non-tensor fields kept); cat_states
    joins the slices back in row order, and refuses slices whose non-tensor fields or structure differ."""
    from fairseq_ext.state import cat_states

    mask = torch.tensor([[False, True, False, False]] * 5)
    nested = DecoderState((None, KVCache(torch.randn(5, 2, 4, 3), torch.randn(5, 2, 4, 3), mask),
                           HiddenCache(torch.randn(5, 6, 4))), offset=2)
    slices = [nested.rows(0, 2), nested.rows(2, 4), nested.rows(4, 5)]
    assert [s.batch_size for s in slices] == [2, 2, 1] and slices[1].offset == 2
    assert slices[1].layers[0] is None and torch.equal(slices[1].layers[1].key, nested.layers[1].key[2:4])
    joined = cat_states(slices)
    assert joined.layers[0] is None and joined.offset == 2
    for a, b in zip(joined.tensors(), nested.tensors(), strict=True):
        assert torch.equal(a, b)
    assert cat_states([None, None]) is None
    with pytest.raises(ValueError, match=r"out of range"):
        nested.rows(3, 6)
    with pytest.raises(ValueError, match=r"state.offset differs"):
        cat_states([slices[0], DecoderState(slices[1].layers, 0)])
    with pytest.raises(ValueError, match="some slices have a state"):
        cat_states([slices[0], None])
    with pytest.raises(ValueError, match="tuple of different lengths"):
        cat_states([slices[0], DecoderState(slices[1].layers[:2], 2)])


def test_train_streams_saved_in_the_old_state_classes_decode_as_decoder_states():
    """Checkpoints written before every decoder held one DecoderState saved Transformer-XL / adaptive span memory as
    HiddenMemory(layers, pending), fast weights and SHA-RNN as LayerStates(layers), SHA-RNN blocks with a pending
    field (always 0 at a saved segment boundary); they decode into today's classes."""
    from fairseq_ext.state import SHARNNBlockState, state_from_plain

    a, b = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    memory = state_from_plain({"__state__": "HiddenMemory", "layers": {"__tuple__": [a, b]}, "pending": 0})
    assert isinstance(memory, DecoderState) and memory.offset == 0
    assert [type(s) for s in memory.layers] == [HiddenCache] * 2 and torch.equal(memory.layers[1].hidden, b)
    h, c = torch.randn(2, 4), torch.randn(2, 4)
    block = {"__state__": "SHARNNBlockState", "h": h, "c": c, "memory": None, "pending": 0}
    blocks = state_from_plain({"__state__": "LayerStates", "layers": {"__tuple__": [block, None]}})
    assert isinstance(blocks, DecoderState) and blocks.offset == 0 and blocks.layers[1] is None
    assert isinstance(blocks.layers[0], SHARNNBlockState) and torch.equal(blocks.layers[0].c, c)
    with pytest.raises(ValueError, match="pending != 0"):
        state_from_plain({**block, "pending": 3})
