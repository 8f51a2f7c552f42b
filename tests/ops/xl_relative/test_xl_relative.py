"""Transformer-XL relative attention: the relative shift equals a gather of r_{i+M-j} for every visible (i, j);
the fast forms (shift, sdpa, blocked) equal the naive reference and a brute-force per-query loop in outputs and
gradients (float64, odd sizes, with and without memory, same_length windows). Spec §14 checks 1 and 5."""
import math

import pytest
import torch

from fairseq_ext.ops.xl_relative import (
    rel_shift,
    rel_shift_pad,
    same_length_window,
    xl_attention_mask,
    xl_relative_attention,
    xl_relative_attention_blocked,
)
from fairseq_ext.ops.xl_relative.blocked import block_ranges
from tests.harness import assert_close, assert_same_grads

SIZES = [(4, 0), (4, 3), (5, 7), (1, 6), (3, 0)]  # (qlen, mlen)


def _inputs(b, h, t, m, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = t + m
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=dtype) for n in (t, s, s))
    r = torch.randn(h, s, d, generator=g, dtype=dtype)
    u, w = torch.randn(h, d, generator=g, dtype=dtype), torch.randn(h, d, generator=g, dtype=dtype)
    return q, k, v, r, u, w


@pytest.mark.parametrize("t,m", SIZES)
@pytest.mark.parametrize("shift", [rel_shift, rel_shift_pad])
def test_rel_shift_equals_gather_of_distance(t, m, shift):
    s = t + m
    x = torch.randn(2, 3, t, s, dtype=torch.float64)  # x[..., i, c]: query i against encoding row c
    out = shift(x)
    for i in range(t):
        for j in range(s):
            distance = i + m - j
            if distance >= 0:  # visible: row S-1-distance of the descending encodings
                assert torch.equal(out[..., i, j], x[..., i, s - 1 - distance]), (i, j)


@pytest.mark.parametrize("t,m", SIZES)
def test_strided_shift_equals_pad_form_and_gradients_on_visible_entries(t, m):
    s = t + m
    x = torch.randn(2, t, s, dtype=torch.float64, requires_grad=True)
    visible = ~xl_attention_mask(t, s)
    weight = torch.randn(2, t, s, dtype=torch.float64) * visible
    a, b = rel_shift(x), rel_shift_pad(x)
    assert_close(a * visible, b * visible)
    ga, = torch.autograd.grad((a * weight).sum(), x)
    gb, = torch.autograd.grad((b * weight).sum(), x)
    assert_close(ga, gb)


def brute_force(q, k, v, r, u, w, window=None):
    """softmax_j(((q_i+u).k_j + (q_i+w).r_{i+M-j}) / sqrt(D)) v, one batch row, head and query at a time."""
    b, h, t, d = q.shape
    s = k.size(2)
    m = s - t
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                keys = [j for j in range(s) if j <= i + m and (window is None or j > i + m - window)]
                logits = torch.stack([((q[bi, hi, i] + u[hi]) @ k[bi, hi, j]
                                       + (q[bi, hi, i] + w[hi]) @ r[hi, s - 1 - (i + m - j)]) / math.sqrt(d)
                                      for j in keys])
                probs = torch.softmax(logits, 0)
                out[bi, hi, i] = sum(p * v[bi, hi, j] for p, j in zip(probs, keys))
    return out


@pytest.mark.parametrize("t,m", SIZES)
@pytest.mark.parametrize("window", [None, 2, 4])
def test_naive_matches_brute_force(t, m, window):
    q, k, v, r, u, w = _inputs(2, 3, t, m, 5)
    assert_close(xl_relative_attention(q, k, v, r, u, w, window=window, impl="naive"),
                 brute_force(q, k, v, r, u, w, window))


@pytest.mark.parametrize("impl", ["shift", "sdpa"])
@pytest.mark.parametrize("t,m", SIZES)
@pytest.mark.parametrize("window", [None, 3])
def test_fast_forms_match_naive_with_gradients(impl, t, m, window):
    inputs = [x.requires_grad_() for x in _inputs(2, 3, t, m, 5, seed=t * 10 + m)]
    assert_same_grads(lambda: xl_relative_attention(*inputs, window=window, impl=impl),
                      lambda: xl_relative_attention(*inputs, window=window, impl="naive"), inputs)


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("t,m", SIZES + [(11, 5), (9, 0)])
@pytest.mark.parametrize("window", [None, 1, 3, 6])
def test_blocked_matches_naive_with_gradients(rows, t, m, window):
    """Query blocks of ``rows`` (several per call, a short last one) over the keys their rows see, windows cutting
    keys off the front of later blocks."""
    inputs = [x.requires_grad_() for x in _inputs(2, 3, t, m, 5, seed=t * 10 + m)]
    assert_same_grads(lambda: xl_relative_attention_blocked(*inputs, window=window, rows=rows),
                      lambda: xl_relative_attention(*inputs, window=window, impl="naive"), inputs)


@pytest.mark.parametrize("window", [None, 3])
def test_recomputed_blocks_match_naive_with_gradients(window):
    inputs = [x.requires_grad_() for x in _inputs(2, 3, 11, 5, 5, seed=7)]
    assert_same_grads(lambda: xl_relative_attention_blocked(*inputs, window=window, rows=3, recompute=True),
                      lambda: xl_relative_attention(*inputs, window=window, impl="naive"), inputs)


def test_recomputed_blocks_redraw_the_same_dropout():
    """Checkpointing restores the RNG state: with dropout, recomputed and kept blocks give the same outputs and
    gradients from the same seed."""
    inputs = [x.requires_grad_() for x in _inputs(2, 3, 11, 5, 5, seed=3)]
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        out = xl_relative_attention_blocked(*inputs, rows=4, dropout_p=0.3, recompute=recompute)
        results.append((out, torch.autograd.grad(out.pow(2).sum(), inputs)))
    (out0, grads0), (out1, grads1) = results
    assert not torch.equal(out0, xl_relative_attention(*inputs, impl="naive"))  # dropout did apply
    assert_close(out1, out0)
    for g1, g0 in zip(grads1, grads0):
        assert_close(g1, g0)


def test_blocks_are_recomputed_only_past_the_saved_budget_with_gradients(monkeypatch):
    import fairseq_ext.ops.xl_relative.blocked as blocked

    q, k, v, r, u, w = _inputs(1, 2, 6, 3, 4)
    assert blocked.saved_bytes(q, 9, 4) == 1 * 2 * 8 * (4 * 7 + 2 * 9)  # blocks [0, 4) over 7 keys, [4, 6) over 9
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    needs_grad = [x.requires_grad_() for x in (q, k, v, r, u, w)]
    monkeypatch.setattr(blocked, "SAVED_BUDGET", blocked.saved_bytes(q, 9, 4))
    blocked.xl_relative_attention_blocked(*needs_grad, rows=4)
    assert calls == []  # at the budget: kept
    monkeypatch.setattr(blocked, "SAVED_BUDGET", blocked.saved_bytes(q, 9, 4) - 1)
    blocked.xl_relative_attention_blocked(*needs_grad, rows=4)
    assert len(calls) == 2  # past it: both blocks recomputed
    with torch.no_grad():
        blocked.xl_relative_attention_blocked(*needs_grad, rows=4)
    assert len(calls) == 2  # nothing to keep without a gradient


def test_blocked_keys_per_block_are_those_its_rows_see():
    """T 5 queries after M 4, rows of 2, window 3: keys [lo, e) of each block are the union of its rows'."""
    visible = ~xl_attention_mask(5, 9, 3)
    for a, b, lo, e in block_ranges(5, 9, 2, 3):
        seen = visible[a:b].any(0).nonzero().flatten()
        assert (lo, e) == (seen.min().item(), seen.max().item() + 1)
    assert [x[:2] for x in block_ranges(5, 9, 2)] == [(0, 2), (2, 4), (4, 5)]


def test_auto_runs_blocked_on_cpu_from_256_queries(monkeypatch):
    import fairseq_ext.ops.xl_relative as xl

    assert xl.select_impl("auto", 256) == "blocked" and xl.select_impl("auto", 255) == "sdpa"
    assert xl.select_impl("auto", 4096, torch.device("cuda")) == "sdpa"
    assert xl.select_impl("sdpa", 4096) == "sdpa"
    calls = []
    monkeypatch.setitem(xl._KERNELS, "blocked", lambda *a, **k: calls.append(a[0].size(2)) or a[0])
    q, k, v, r, u, w = _inputs(1, 1, 256, 3, 2, dtype=torch.float32)
    xl_relative_attention(q, k, v, r, u, w)
    assert calls == [256]


def test_same_length_counts_visible_keys():
    """Spec §14.5: mem_len 4, full memory, qlen 3: 4 keys per query (original), 5 (NVIDIA)."""
    for convention, expected in (("original", 4), ("nvidia", 5)):
        window = same_length_window(4, convention)
        visible = ~xl_attention_mask(3, 7, window)
        assert visible.sum(1).tolist() == [expected] * 3, convention
        assert all(visible[i, i + 4] for i in range(3))  # every query sees itself


def test_same_length_matches_original_formula():
    """The window rule equals the original triu/tril construction for every (qlen, mlen, mem_len)."""
    for qlen in range(1, 6):
        for mlen in range(0, 7):
            for mem_len in range(1, 7):
                for convention, minus in (("original", 0), ("nvidia", 1)):
                    klen = qlen + mlen
                    ones = torch.ones(qlen, klen)
                    mask_len = klen - mem_len - minus
                    shift_len = qlen - mask_len if mask_len > 0 else qlen
                    original = (torch.triu(ones, 1 + mlen) + torch.tril(ones, -shift_len)).bool()
                    ours = xl_attention_mask(qlen, klen, same_length_window(mem_len, convention))
                    assert torch.equal(ours, original), (qlen, mlen, mem_len, convention)


def test_same_length_without_memory_is_an_error():
    with pytest.raises(ValueError, match="mem_len"):
        same_length_window(0, "original")


@pytest.mark.parametrize("impl", ["shift", "sdpa", "blocked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_has_no_nan_with_narrow_windows(impl, dtype):
    """Spec §14.12: rows with the fewest visible keys (window 1: only the query itself) stay finite."""
    q, k, v, r, u, w = _inputs(1, 2, 5, 3, 8, dtype=torch.float32)
    for window in (None, 1):
        ref = xl_relative_attention(q, k, v, r, u, w, window=window, impl="naive")
        out = xl_relative_attention(*(x.to(dtype) for x in (q, k, v, r, u, w)), window=window, impl=impl)
        assert torch.isfinite(out).all()
        assert_close(out.float(), ref, atol=3e-2 if dtype == torch.bfloat16 else 5e-3)


def test_errors():
    q, k, v, r, u, w = _inputs(1, 2, 4, 2, 3)
    with pytest.raises(ValueError, match="attn_impl"):
        xl_relative_attention(q, k, v, r, u, w, impl="fast")
    with pytest.raises(ValueError, match="relative encoding"):
        xl_relative_attention(q, k, v, r[:, 1:], u, w)
    with pytest.raises(ValueError, match="keys"):
        xl_relative_attention(k, q, q, r, u, w)
    with pytest.raises(ValueError, match="block rows must be >= 1"):
        xl_relative_attention_blocked(q, k, v, r, u, w, rows=0)


@pytest.mark.parametrize("t,s", [(1, 1), (1, 4), (3, 3), (4, 7), (5, 9)])
def test_rel_shift_backward_equals_the_generic_strided_backward(t, s):
    """rel_shift's own backward (two slice copies) equals autograd's as_strided backward on the same view, junk
    entries above the diagonal included (they alias the next row's first columns), and passes gradcheck."""
    x = torch.randn(2, 3, t, s, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, t, s, dtype=torch.float64)
    view = x.as_strided((2, 3, t, s), (3 * t * s, t * s, s - 1, 1), t - 1)  # the reference: autograd's own
    (ours,) = torch.autograd.grad(rel_shift(x), x, g)
    (reference,) = torch.autograd.grad(view, x, g)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert torch.autograd.gradcheck(rel_shift, (x,))
