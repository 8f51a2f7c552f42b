"""The state contract (fairseq_ext/state.py): detach, reorder, batch_size, device moves and KV-cache growth, on
flat and nested states, including per-layer tuples with empty (None) entries."""
import pytest
import torch

from fairseq_ext.state import HiddenMemory, KVCache, LayerStates


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
    layers = LayerStates((None, kv(), HiddenMemory((torch.arange(3.0)[:, None, None].expand(3, 2, 4),))))
    order = torch.tensor([2, 2, 0, 1])
    out = layers.reorder(order)
    assert out.layers[0] is None
    assert torch.equal(out.layers[1].key, layers.layers[1].key[order])
    assert out.layers[2].layers[0][:, 0, 0].tolist() == [2.0, 2.0, 0.0, 1.0]
    assert out.batch_size == 4 and layers.batch_size == 3


def test_detach_cuts_the_graph_and_keeps_values():
    cache = kv(requires_grad=True)
    scaled = KVCache(cache.key * 2, cache.value)
    detached = LayerStates((scaled,)).detach()
    assert not detached.layers[0].key.requires_grad
    assert torch.equal(detached.layers[0].key, scaled.key.detach())


def test_batch_size_of_an_empty_state_is_an_error():
    with pytest.raises(ValueError, match="holds no tensor"):
        _ = LayerStates((None, None)).batch_size


def test_hidden_memory_length_and_device_move():
    memory = HiddenMemory((torch.zeros(2, 7, 3), torch.zeros(2, 7, 3)))
    assert memory.length == 7 and HiddenMemory(()).length == 0
    assert memory.to("cpu").layers[1].shape == (2, 7, 3)
