"""Causal-query-block ALiBi kernel (``ops/alibi/blocked.py``): outputs and gradients equal the naive reference in
float64 at odd sizes (left-over rows, one-row blocks, cached keys, keys past the last query, key padding with empty
rows, both bias forms), every block's bias is a view of the one strip with the full bias's values, the shared strip
is checked, bad calls are refused, and ``auto`` picks it only for causal training passes on CPU."""
import logging

import pytest
import torch

import fairseq_ext.ops.alibi as alibi_ops
from fairseq_ext.ops.alibi import (alibi_attention, alibi_sdpa_bias, alibi_shared_bias, alibi_slopes, alibi_strip,
                                   block_rows, select_impl)
from fairseq_ext.ops.alibi.blocked import alibi_attention_blocked
from tests.harness import assert_close, assert_same_grads


def _inputs(b=2, h=3, t=13, s=13, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)  # noqa: E731
    return mk(b, h, t, d), mk(b, h, s, d), mk(b, h, s, d)


# (q_offset, T, S, rows): left-over rows (13 = 1 + 3 x 4), one-row blocks, rows > T, rows == T, cached keys
# (q_offset = S - T), keys after the last query (S > q_offset + T), and T 300 at the default rows (128).
SIZES = [(0, 13, 13, 4), (0, 13, 13, 1), (0, 7, 7, 20), (0, 11, 11, 11), (4, 5, 9, 2), (3, 10, 16, 3),
         (0, 300, 300, None)]


@pytest.mark.parametrize("form", ["relative", "key_index"])
@pytest.mark.parametrize("q_offset,t,s,rows", SIZES)
def test_blocked_equals_naive_outputs_and_gradients(q_offset, t, s, rows, form):
    big = t >= 256
    q, k, v = _inputs(b=1 if big else 2, h=2 if big else 3, t=t, s=s, d=4 if big else 5)
    slopes = alibi_slopes(q.size(1))
    kw = dict(q_offset=q_offset, form=form)
    assert_same_grads(lambda: alibi_attention_blocked(q, k, v, slopes, rows=rows, **kw),
                      lambda: alibi_attention(q, k, v, slopes, impl="naive", **kw), [q, k, v])


@pytest.mark.parametrize("rows", [1, 3, 5])
def test_blocked_with_left_padding_and_fully_masked_rows(rows):
    q, k, v = _inputs(t=9, s=9)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, :4] = True  # rows 0..3 of sequence 0 see only padding: zeros, not NaN
    pad[1, 6] = True
    slopes = alibi_slopes(3)
    with torch.no_grad():
        out = alibi_attention_blocked(q, k, v, slopes, key_padding_mask=pad, rows=rows)
    assert torch.isfinite(out).all() and torch.all(out[0, :, :4] == 0)
    assert_same_grads(lambda: alibi_attention_blocked(q, k, v, slopes, key_padding_mask=pad, rows=rows),
                      lambda: alibi_attention(q, k, v, slopes, key_padding_mask=pad, impl="naive"), [q, k, v])


@pytest.mark.parametrize("q_offset,t,rows", [(0, 13, 4), (5, 10, 3), (0, 8, 8)])
def test_every_block_bias_is_a_view_of_the_strip_with_the_full_bias_values(q_offset, t, rows, monkeypatch):
    """The bias each block hands to sdpa is a slice of one strip (no copy) and equals the full (1, H, T, S) bias's
    rows and visible keys exactly, causal -inf included."""
    import fairseq_ext.ops.alibi.blocked as blocked

    slopes = alibi_slopes(3)
    s = q_offset + t
    strip = alibi_strip(slopes, rows, t, q_offset=q_offset, dtype=torch.float64)
    full = alibi_sdpa_bias(slopes, t, s, q_offset=q_offset, dtype=torch.float64)  # (1, H, T, S)
    seen = []

    def spy(q, k, v, slopes, *, q_offset, key_padding_mask, causal, form, dropout_p, bias):
        seen.append((q_offset, q.size(2), k.size(2), bias))
        return q.new_zeros(q.shape)

    monkeypatch.setattr(blocked, "alibi_attention_sdpa", spy)
    q, k, v = (x.detach() for x in _inputs(b=1, t=t, s=s))
    alibi_attention_blocked(q, k, v, slopes, q_offset=q_offset, rows=rows, strip=strip)
    assert sum(n for _, n, _, _ in seen) == t and len(seen) == -(-t // rows)
    for pos, n, e, bias in seen:
        assert bias.untyped_storage().data_ptr() == strip.untyped_storage().data_ptr()
        assert e == pos + n  # keys after the block's last query are not read
        assert torch.equal(bias, full[:, :, pos - q_offset:pos - q_offset + n, :e])


def test_blocked_dropout_is_random_and_keeps_the_mean():
    """With dropout the output varies between calls and its mean over many draws approaches the reference's
    dropout-free output (inverted dropout)."""
    q, k, v = (x.detach() for x in _inputs(b=1, h=2, t=12, s=12, d=4))
    slopes = alibi_slopes(2)
    torch.manual_seed(0)
    a = alibi_attention_blocked(q, k, v, slopes, rows=5, dropout_p=0.3)
    b = alibi_attention_blocked(q, k, v, slopes, rows=5, dropout_p=0.3)
    assert not torch.equal(a, b)
    mean = torch.stack([alibi_attention_blocked(q, k, v, slopes, rows=5, dropout_p=0.3) for _ in range(3000)]).mean(0)
    ref = alibi_attention(q, k, v, slopes, impl="naive")
    assert (mean - ref).abs().max() < 0.08


def test_blocked_refuses_what_it_cannot_compute():
    q, k, v = _inputs(t=6, s=6)
    slopes = alibi_slopes(3)
    with pytest.raises(ValueError, match="needs the causal mask"):
        alibi_attention_blocked(q, k, v, slopes, causal=False)
    with pytest.raises(ValueError, match=r"q_offset \(2\) \+ T \(6\) > S \(6\)"):
        alibi_attention_blocked(q, k, v, slopes, q_offset=2)
    with pytest.raises(ValueError, match="block rows must be >= 1"):
        alibi_attention_blocked(q, k, v, slopes, rows=0)
    with pytest.raises(ValueError, match=r"strip is \(4, 6\).*not \(3, 6\)"):
        alibi_attention_blocked(q, k, v, slopes, rows=3, strip=alibi_strip(slopes, 4, 6))
    with pytest.raises(ValueError, match="only defined for the relative bias form"):
        alibi_attention_blocked(q, k, v, slopes, rows=3, form="key_index", strip=alibi_strip(slopes, 3, 6))


def test_block_rows_rule():
    assert [block_rows(t) for t in (1, 255, 256, 511, 512, 4096)] == [1, 255, 128, 128, 256, 256]
    # the (H, rows, S) strip stays within the bias budget (16M values): fewer rows, multiples of 8, 0 if < 8 fit
    assert block_rows(32768, 4, 32768) == 128 and block_rows(4096, 16, 5000) == 208
    assert block_rows(512, 8, 2 ** 20) == 0 and block_rows(512, 4, 2 ** 16, budget=3 * 2 ** 18) == 0


def test_auto_picks_blocked_for_causal_passes_on_cpu_only(caplog, monkeypatch):
    monkeypatch.setattr(alibi_ops._resolve_blocked, "_logged", False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level(logging.INFO, logger="fairseq_ext.ops"):
        assert select_impl("auto", 4, 512, 512, device=cpu) == "blocked"
        assert select_impl("auto", 4, 256, 256) == "blocked"  # no device: CPU
        assert select_impl("auto", 4, 255, 255, device=cpu) == "sdpa"  # fewer than two blocks of 128 rows
        assert select_impl("auto", 4, 512, 512, device=cuda) == "sdpa"  # unmeasured on GPUs: opt-in there
        assert select_impl("auto", 4, 512, 512, causal=False) == "sdpa"
        assert select_impl("auto", 4, 512, 600, q_offset=88) == "blocked"  # cached keys
        assert select_impl("auto", 4, 512, 512, q_offset=1) == "sdpa"  # some query has no own key
        assert select_impl("auto", 4, 512, 600000, q_offset=599488) == "sdpa"  # not 8 strip rows in the budget
        assert select_impl("sdpa", 4, 4096, 4096) == "sdpa"  # explicit choices are kept
        with torch.no_grad():  # evaluation: blocked too, unless a chunk size is given or the strip does not fit
            assert select_impl("auto", 4, 512, 512) == "blocked"
            assert select_impl("auto", 4, 32768, 32768) == "blocked"  # 128-row strip: 64 MiB
            assert select_impl("auto", 4, 4096, 4096, chunk_size=64) == "chunked"
            assert select_impl("auto", 4, 512, 600000, q_offset=599488) == "chunked"
            assert select_impl("auto", 4, 255, 255) == "sdpa"
    chosen = [r.getMessage() for r in caplog.records if "-> blocked" in r.getMessage()]
    assert len(chosen) == 1, chosen  # logged once


def test_auto_training_pass_runs_blocked_with_a_shared_strip(monkeypatch):
    """``alibi_attention(impl="auto")`` with gradients hands the decoder's shared strip to the blocked kernel and
    matches naive; ``alibi_shared_bias`` builds the strip for blocked (relative form), none for key_index."""
    calls = []
    kernel = alibi_ops._KERNELS["blocked"]
    monkeypatch.setitem(alibi_ops._KERNELS, "blocked", lambda *a, **kw: calls.append(kw["strip"]) or kernel(*a, **kw))
    q, k, v = _inputs(b=1, h=2, t=260, s=260, d=3)
    slopes = alibi_slopes(2)
    strip = alibi_shared_bias("blocked", slopes, 260, 260, dtype=torch.float64)
    assert strip.shape == (1, 2, 128, 260) and alibi_shared_bias("blocked", slopes, 260, 260, form="key_index") is None
    assert_same_grads(lambda: alibi_attention(q, k, v, slopes, shared_bias=strip),
                      lambda: alibi_attention(q, k, v, slopes, impl="naive"), [q, k, v])
    assert len(calls) == 1 and calls[0] is strip


def test_half_precision_blocked_is_as_close_as_sdpa():
    q, k, v = (x.detach().to(torch.bfloat16) for x in _inputs(b=2, h=4, t=300, s=300, d=16, dtype=torch.float32))
    slopes = alibi_slopes(4)
    ref = alibi_attention(q.double(), k.double(), v.double(), slopes, impl="naive")
    err_blocked = (alibi_attention_blocked(q, k, v, slopes).double() - ref).abs().max()
    err_sdpa = (alibi_attention(q, k, v, slopes, impl="sdpa").double() - ref).abs().max()
    assert err_blocked <= 2 * err_sdpa + 1e-3, (err_blocked, err_sdpa)
    assert_close(alibi_attention_blocked(q.float(), k.float(), v.float(), slopes).double(), ref, atol=1e-5,
                 rtol=1e-5)
