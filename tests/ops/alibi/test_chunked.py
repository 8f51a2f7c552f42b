"""Query-chunked ALiBi attention (issue 11 part G): the same numbers as the naive reference and the full-bias sdpa
kernel (outputs and gradients, float64, odd sizes, KV-cache offsets, key padding, keys cut at the 512-key tiles),
bitwise equal to sdpa in fp32 on CPU for 8-row-aligned chunks, the bias only ever built per chunk, and the ``auto``
rule (chunked only without gradients once T exceeds one chunk, logged once)."""
import logging

import pytest
import torch

import fairseq_ext.ops.alibi as alibi_ops
from fairseq_ext.ops.alibi import (BIAS_BUDGET, alibi_attention, alibi_attention_chunked, alibi_slopes, chunk_rows,
                                   select_impl)
from fairseq_ext.ops.alibi.chunked import KEY_BLOCK, ROW_BLOCK, key_end
from tests.harness import assert_close, assert_same_grads


def _inputs(b=2, h=3, t=5, s=7, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)  # noqa: E731
    return mk(b, h, t, d), mk(b, h, s, d), mk(b, h, s, d)


# (q_offset, T, S, chunk): T not a multiple of the chunk, chunk 1, chunk > T, cached keys (q_offset = S - T),
# one decoding step, and S > KEY_BLOCK so that the keys of early chunks are cut at 512.
SIZES = [(0, 13, 13, 4), (0, 13, 13, 1), (0, 7, 7, 20), (4, 5, 9, 2), (8, 1, 9, 3), (0, 11, 11, 11),
         (0, 600, 600, 97), (70, 530, 600, 256)]


@pytest.mark.parametrize("form", ["relative", "key_index"])
@pytest.mark.parametrize("q_offset,t,s,chunk", SIZES)
@pytest.mark.parametrize("reference", ["naive", "sdpa"])
def test_chunked_equals_reference_outputs_and_gradients(reference, q_offset, t, s, chunk, form):
    big = s > KEY_BLOCK
    q, k, v = _inputs(b=1 if big else 2, h=2 if big else 3, t=t, s=s, d=4 if big else 5)
    slopes = alibi_slopes(q.size(1))
    kw = dict(q_offset=q_offset, form=form)
    assert_same_grads(lambda: alibi_attention(q, k, v, slopes, impl="chunked", chunk_size=chunk, **kw),
                      lambda: alibi_attention(q, k, v, slopes, impl=reference, **kw), [q, k, v])


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunked_with_left_padding_and_fully_masked_rows(chunk):
    q, k, v = _inputs(t=7, s=7)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, :3] = True  # rows 0..2 of sequence 0 see only padding: zeros, not NaN
    slopes = alibi_slopes(3)
    with torch.no_grad():
        out = alibi_attention(q, k, v, slopes, key_padding_mask=pad, impl="chunked", chunk_size=chunk)
    assert torch.isfinite(out).all() and torch.all(out[0, :, :3] == 0)
    assert_same_grads(lambda: alibi_attention(q, k, v, slopes, key_padding_mask=pad, impl="chunked",
                                              chunk_size=chunk),
                      lambda: alibi_attention(q, k, v, slopes, key_padding_mask=pad, impl="naive"), [q, k, v])


def test_chunked_with_padding_and_a_kv_cache_offset():
    """Incremental decoding shape: 3 new queries after 6 cached keys, padded keys inside the cache."""
    q, k, v = _inputs(t=3, s=9)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, :4] = True
    slopes = alibi_slopes(3)
    assert_same_grads(lambda: alibi_attention(q, k, v, slopes, q_offset=6, key_padding_mask=pad, impl="chunked",
                                              chunk_size=2),
                      lambda: alibi_attention(q, k, v, slopes, q_offset=6, key_padding_mask=pad, impl="naive"),
                      [q, k, v])


def test_chunked_without_causal_mask_sees_all_keys():
    q, k, v = _inputs(t=6, s=6)
    slopes = alibi_slopes(3)
    assert_close(alibi_attention(q, k, v, slopes, causal=False, impl="chunked", chunk_size=4),
                 alibi_attention(q, k, v, slopes, causal=False, impl="naive"))


@pytest.mark.parametrize("q_offset,t,s,chunk", [(0, 1100, 1100, 64), (0, 1100, 1100, 200), (37, 700, 737, 8),
                                                (0, 300, 300, 16)])
def test_chunked_is_bitwise_sdpa_in_fp32_on_cpu(q_offset, t, s, chunk):
    """Keys cut at 512-key tiles and 8-row-aligned chunks: bitwise the full-bias kernel's numbers (torch 2.13 CPU)."""
    q, k, v = (x.detach() for x in _inputs(b=1, h=4, t=t, s=s, d=16, dtype=torch.float32))
    slopes = alibi_slopes(4)
    with torch.no_grad():
        full = alibi_attention(q, k, v, slopes, q_offset=q_offset, impl="sdpa")
        chunked = alibi_attention(q, k, v, slopes, q_offset=q_offset, impl="chunked", chunk_size=chunk)
    assert torch.equal(chunked, full), (chunked - full).abs().max().item()


def _largest_allocation(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")


def test_chunked_never_allocates_the_full_bias():
    h, t, chunk = 4, 1024, 128
    q, k, v = (torch.randn(1, h, t, 8) for _ in range(3))
    slopes = alibi_slopes(h)
    full_bias = h * t * t * 4  # (1, H, T, S) fp32
    with torch.no_grad():
        sdpa_peak = _largest_allocation(lambda: alibi_attention(q, k, v, slopes, impl="sdpa"))
        chunked_peak = _largest_allocation(lambda: alibi_attention(q, k, v, slopes, impl="chunked",
                                                                   chunk_size=chunk))
    assert sdpa_peak >= full_bias  # the measurement sees the full bias when it exists
    assert chunked_peak <= h * chunk * t * 4, chunked_peak  # one chunk's (1, H, rows, S) bias at most


def test_chunk_rows_fit_the_budget_in_multiples_of_the_row_block():
    for heads, k_len in [(4, 16384), (8, 32768), (16, 1000), (1, 7)]:
        rows = chunk_rows(heads, k_len)
        assert rows % ROW_BLOCK == 0 and heads * rows * k_len <= BIAS_BUDGET, (heads, k_len, rows)
        assert heads * (rows + ROW_BLOCK) * k_len > BIAS_BUDGET  # the largest such multiple
    assert chunk_rows(4, 16384) == 256
    assert chunk_rows(16, BIAS_BUDGET // 16 // 5) == 5  # fewer than ROW_BLOCK rows fit: as many as fit
    assert chunk_rows(64, BIAS_BUDGET) == 1  # not even one row fits: still one row


def test_key_end_rounds_up_to_key_tiles():
    assert key_end(1, 300, causal=True) == 300  # S <= KEY_BLOCK: never cut
    assert key_end(1, 2000, causal=True) == KEY_BLOCK
    assert key_end(513, 2000, causal=True) == 2 * KEY_BLOCK
    assert key_end(1900, 2000, causal=True) == 2000
    assert key_end(1, 2000, causal=False) == 2000


def test_auto_picks_chunked_only_without_gradients_beyond_one_chunk(caplog, monkeypatch):
    monkeypatch.setattr(alibi_ops._resolve_long_eval, "_logged", False)
    with caplog.at_level(logging.INFO, logger="fairseq_ext.ops"):
        with torch.no_grad():
            assert select_impl("auto", 4, 100, 100, chunk_size=99) == "chunked"
            assert select_impl("auto", 4, 100, 100, chunk_size=100) == "sdpa"  # one chunk: the shared-bias path
            cuda = torch.device("cuda")  # where blocked is not auto's choice (on CPU: test_blocked.py)
            assert select_impl("auto", 4, 1024, 1024, device=cuda) == "sdpa"  # 4 x 1024 x 1024 fits the budget
            assert select_impl("auto", 4, 4096, 4096, device=cuda) == "chunked"
            assert select_impl("auto", 4, 4096, 4096, chunk_size=1000) == "chunked"  # a given chunk size, CPU
            assert select_impl("auto", 4, 1, 40000) == "sdpa"  # a decoding step is one chunk
            assert select_impl("sdpa", 4, 4096, 4096) == "sdpa"  # explicit choices are kept
        assert select_impl("auto", 4, 4096, 4096, device=cuda) == "sdpa"  # gradients recorded (training)
        assert select_impl("chunked", 4, 8, 8) == "chunked"
    chosen = [r.getMessage() for r in caplog.records if "-> chunked" in r.getMessage()]
    assert len(chosen) == 1, chosen  # logged once


def test_auto_without_gradients_runs_the_chunked_kernel(monkeypatch):
    calls = []
    monkeypatch.setitem(alibi_ops._KERNELS, "chunked",
                        lambda *a, **kw: calls.append(kw["chunk_size"]) or alibi_attention_chunked(*a, **kw))
    q, k, v = (x.detach() for x in _inputs(t=9, s=9))
    with torch.no_grad():
        out = alibi_attention(q, k, v, alibi_slopes(3), chunk_size=4)
    assert calls == [4]
    assert_close(out, alibi_attention(q, k, v, alibi_slopes(3), impl="naive"))


def test_chunk_size_must_be_positive():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        alibi_attention(q, k, v, alibi_slopes(3), impl="chunked", chunk_size=0)
