"""Adaptive-span attention ops: the soft span mask and trimming arithmetic (spec adaptive_span.md §10 checks 2, 4,
5, 6), the window orientation (check 1), renormalisation (checks 3, 10), and the fast skew form == the naive
gather == a brute-force per-query loop in outputs and gradients (float64, odd sizes, with and without persistent
memory); the blocked form over several query blocks == naive, with skew's dropout draws."""
import math

import pytest
import torch

from fairseq_ext.ops.adaptive_span import (
    adaptive_span_attention,
    adaptive_span_attention_blocked,
    block_rows,
    adaptive_span_mask,
    fit_keys,
    needed_keys,
    select_impl,
    skew,
    skew_pad,
    span_mask_at,
    span_trim,
    trim_length,
    unskew,
    unskew_pad,
)
from tests.harness import assert_close, assert_same_grads

SIZES = [(3, 4), (5, 7), (4, 9), (1, 3), (6, 2)]  # (M queries, L window)
F64 = torch.float64


def _inputs(b, h, m, span, d, n=0, dtype=F64, seed=0, pe_per_head=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, m, d, generator=g, dtype=dtype)
    k, v = (torch.randn(b, h, span + m, d, generator=g, dtype=dtype) for _ in range(2))
    key_pe = torch.randn(*((h,) if pe_per_head else ()), d, span, generator=g, dtype=dtype)
    z = torch.rand(h, generator=g, dtype=dtype) * 0.6  # spans of 0..0.6 L: some columns masked, some in the ramp
    pers_k = torch.randn(h, d, n, generator=g, dtype=dtype) / math.sqrt(d) if n else None
    pers_v = torch.randn(h, n, d, generator=g, dtype=dtype) / math.sqrt(n) if n else None
    return q, k, v, key_pe, z, pers_k, pers_v


# --- mask --------------------------------------------------------------------------------------------------------

def test_mask_values_spec_check_2():
    """L = 8192, R = 32; column j is distance L - j (the last column is distance 1)."""
    z = torch.tensor([0.0, 0.5])
    mask = adaptive_span_mask(z, 8192, 32)  # (2, 8192)
    at = lambda h, delta: mask[h, 8192 - delta].item()  # noqa: E731
    assert [at(0, dd) for dd in (1, 2, 32, 33, 100)] == [1.0, 0.96875, 0.03125, 0.0, 0.0]
    assert [at(1, dd) for dd in (1, 4097, 4098, 4128, 4129)] == [1.0, 1.0, 0.96875, 0.03125, 0.0]
    assert mask.dtype == torch.float32


def test_mask_values_hand_computed_small():
    """L = 10, R = 4, z = 0.3 (z L = 3): m(delta) = clamp((3 + 5 - delta) / 4, 0, 1)."""
    mask = adaptive_span_mask(torch.tensor([0.3], dtype=F64), 10, 4)[0]  # (10,) distances 10..1
    expected = [min(1.0, max(0.0, (8 - dd) / 4)) for dd in range(10, 0, -1)]
    assert_close(mask, torch.tensor(expected, dtype=F64))
    assert mask.tolist()[-5:] == pytest.approx([0.75, 1, 1, 1, 1])  # distances 5, 4, 3, 2, 1
    distances = torch.tensor([1.0, 4.0, 5.0, 7.0, 8.0], dtype=F64)
    assert_close(span_mask_at(torch.tensor(0.3, dtype=F64), distances, 10, 4),
                 torch.tensor([1.0, 1.0, 0.75, 0.25, 0.0], dtype=F64))


def test_trimmed_mask_is_last_columns():
    z = torch.tensor([0.1, 0.7])
    assert torch.equal(adaptive_span_mask(z, 50, 5, length=12), adaptive_span_mask(z, 50, 5)[:, -12:])


def test_mask_gradient_is_L_over_R_inside_ramp_and_zero_outside():
    """Spec check 4: dm/dz = L / R strictly inside the ramp, 0 outside (L = 8192, R = 32)."""
    for z0 in (0.0, 0.5):
        z = torch.tensor([z0], dtype=F64, requires_grad=True)
        mask = adaptive_span_mask(z, 8192, 32)[0]  # (8192,)
        weight = torch.zeros(8192, dtype=F64)
        zl = int(z0 * 8192)
        inside, below, above = zl + 10, zl, zl + 40  # distances: in the ramp, in the flat 1 part, past the ramp
        for delta in (inside, below, above):
            if delta < 1:
                continue
            weight.zero_()
            weight[8192 - delta] = 1.0
            grad, = torch.autograd.grad((mask * weight).sum(), z, retain_graph=True)
            assert grad.item() == (256.0 if delta == inside else 0.0), (z0, delta)


def test_mask_gradient_matches_finite_differences():
    """Away from the ramp's kinks (z L not an integer) autograd equals central differences."""
    z = torch.tensor([0.0137, 0.3371, 0.7137], dtype=F64, requires_grad=True)
    weight = torch.randn(3, 100, dtype=F64)
    assert torch.autograd.gradcheck(lambda zz: (adaptive_span_mask(zz, 100, 8) * weight).sum(), (z,))


# --- trimming ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_span,z,expected", [
    (8192, 0.0, (32, 8128, 64, 128)),
    (8192, 0.001, (41, 8128, 64, 128)),
    (8192, 0.5, (4128, 4032, 4160, 4224)),
    (8192, 0.99, (8143, 0, 8192, 8192)),
    (8192, 1.0, (8192, 0, 8192, 8192)),
    (1024, 0.0, (32, 960, 64, 128)),
    (1024, 0.5, (544, 448, 576, 640)),
])
def test_trim_arithmetic_spec_check_5(max_span, z, expected):
    zt = torch.tensor([0.0, z, z / 2], dtype=torch.float32)  # the max over heads decides
    assert tuple(span_trim(zt, max_span, 32)) == expected
    assert needed_keys(zt, max_span, 32) == expected[2]
    assert trim_length(zt, max_span, 32) == expected[1]


def test_trim_edge_cases():
    assert span_trim(1.5, 8192, 32) == (8192, 0, 8192, 8192)  # unclamped z: the size is clamped to L
    assert span_trim(-0.5, 8192, 32).max_size == 0  # ceil(-4096) + 32 < 0 -> 0, trim L - 1 rounded down
    assert span_trim(0.0, 8192, 32, adapt_cache=False).cache == 8192
    assert span_trim(0.0, 100, 32) == (32, 64, 36, 100)  # trim 68 -> 64


def test_fit_keys_cuts_and_zero_pads():
    x = torch.arange(2 * 5 * 3.0).view(2, 5, 3)
    assert torch.equal(fit_keys(x, 3), x[:, 2:])
    padded = fit_keys(x, 7)
    assert torch.equal(padded[:, 2:], x) and not padded[:, :2].any()


# --- skew layout -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,span", SIZES)
def test_unskew_and_skew_equal_original_pad_forms(m, span):
    x = torch.randn(2, 3, m, span + m, dtype=F64)
    p = torch.randn(2, 3, m, span, dtype=F64)
    assert torch.equal(unskew(x, span), unskew_pad(x))
    assert torch.equal(skew(p, span + m), skew_pad(p))
    # skew is the adjoint of unskew
    assert_close((unskew(x, span) * p).sum(), (x * skew(p, span + m)).sum())


def test_window_orientation_spec_check_1():
    """M = 3, L = 4 (C = 4): unskewed column j of row i is the key at index i + j, distance L - j = [4, 3, 2, 1]."""
    m, span = 3, 4
    key_index = torch.arange(span + m, dtype=F64).expand(m, span + m)  # x[i, c] = c
    window = unskew(key_index, span)
    for i in range(m):
        assert window[i].tolist() == [i + j for j in range(span)]
        assert [(span + i) - c for c in window[i].tolist()] == [4, 3, 2, 1]  # never distance 0 (itself)


@pytest.mark.parametrize("impl", ["naive", "skew", "blocked"])
def test_no_query_sees_itself_or_the_future(impl):
    """d out_i / d v_t is zero for t = own index L + i and later; nonzero for the L previous positions."""
    m, span = 3, 4
    q, k, v, key_pe, z, _, _ = _inputs(1, 2, m, span, 5)
    v.requires_grad_()
    mask = adaptive_span_mask(torch.ones(2, dtype=F64), span, 2)  # full span: every window key has weight
    out = adaptive_span_attention(q, k, v, key_pe, mask, impl=impl)
    for i in range(m):
        grad, = torch.autograd.grad(out[:, :, i].sum(), v, retain_graph=True)
        touched = grad.abs().sum((0, 1, 3)) > 0  # (L + M,)
        assert touched.nonzero().flatten().tolist() == list(range(i, i + span)), i


def brute_force(stream_q, stream_k, stream_v, key_pe, z, max_span, ramp, pers_k=None, pers_v=None):
    """For every position t of a stream starting cold: attend to positions t-L..t-1 (zero vectors before the start)
    with logits (q.k + q.p_delta)/sqrt(D), p_delta = key_pe[:, L - delta]; joint softmax with the persistent
    slots; span mask m(delta) by the formula on the context part; joint renormalisation (eps 1e-8).
    stream_*: (H, T, D). Returns (H, T, D)."""
    h, t_len, d = stream_q.shape
    out = torch.zeros_like(stream_q)
    for hi in range(h):
        for t in range(t_len):
            logits, weights_m, values = [], [], []
            for delta in range(max_span, 0, -1):
                pos = t - delta
                key = stream_k[hi, pos] if pos >= 0 else torch.zeros(d, dtype=stream_k.dtype)
                val = stream_v[hi, pos] if pos >= 0 else torch.zeros(d, dtype=stream_v.dtype)
                logits.append((stream_q[hi, t] @ key + stream_q[hi, t] @ key_pe[:, max_span - delta]) / math.sqrt(d))
                weights_m.append(min(1.0, max(0.0, (z[hi].item() * max_span + ramp + 1 - delta) / ramp)))
                values.append(val)
            if pers_k is not None:
                for n in range(pers_k.size(-1)):
                    logits.append(stream_q[hi, t] @ (pers_k[hi, :, n] * math.sqrt(d)) / math.sqrt(d))
                    weights_m.append(1.0)
                    values.append(pers_v[hi, n] * math.sqrt(pers_v.size(1)))
            a = torch.softmax(torch.stack(logits), 0) * torch.tensor(weights_m, dtype=stream_q.dtype)
            a = a / (a.sum() + 1e-8)
            out[hi, t] = sum(w * val for w, val in zip(a, values))
    return out


@pytest.mark.parametrize("impl,n", [(impl, n) for impl in ("naive", "skew", "blocked", "fused") for n in (0, 3)])
def test_blocks_with_carried_cache_equal_brute_force_stream(impl, n):
    """Spec check 1: a stream of 10 positions in blocks of M = 3 (last block 1), cache = the previous L = 4 keys
    (zeros at the stream start), equals the per-position brute force to 1e-10 in fp64."""
    h, d, span, ramp, t_len = 2, 5, 4, 2, 10
    g = torch.Generator().manual_seed(3)
    sq, sk, sv = (torch.randn(h, t_len, d, generator=g, dtype=F64) for _ in range(3))
    key_pe = torch.randn(d, span, generator=g, dtype=F64)
    z = torch.tensor([0.0, 0.4], dtype=F64)  # head 0: min span R; head 1: span 1.6 + ramp
    pers_k = torch.randn(h, d, n, generator=g, dtype=F64) if n else None
    pers_v = torch.randn(h, n, d, generator=g, dtype=F64) if n else None
    mask = adaptive_span_mask(z, span, ramp)
    zeros = torch.zeros(h, span, d, dtype=F64)
    k_all, v_all = torch.cat([zeros, sk], 1), torch.cat([zeros, sv], 1)  # (H, L + T, D) cold start
    outs = []
    for start in range(0, t_len, 3):
        m = min(3, t_len - start)
        q = sq[None, :, start:start + m]  # (1, H, M, D)
        k = k_all[None, :, start:start + span + m]  # (1, H, L + M, D) = [cache of L ; block]
        v = v_all[None, :, start:start + span + m]
        outs.append(adaptive_span_attention(q, k, v, key_pe, mask, pers_k, pers_v, impl=impl)[0])
    assert_close(torch.cat(outs, 1), brute_force(sq, sk, sv, key_pe, z, span, ramp, pers_k, pers_v))


# --- fast == naive -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,span", SIZES)
@pytest.mark.parametrize("n", [0, 5])
@pytest.mark.parametrize("masked", [True, False])
def test_skew_matches_naive_with_gradients(m, span, n, masked):
    q, k, v, key_pe, z, pers_k, pers_v = _inputs(2, 3, m, span, 4, n, seed=m * 10 + span)
    inputs = [x.requires_grad_() for x in (q, k, v, key_pe, z, pers_k, pers_v) if x is not None]

    def run(impl):
        mask = adaptive_span_mask(z, span, 2) if masked else None
        return adaptive_span_attention(q, k, v, key_pe, mask, pers_k, pers_v, impl=impl)

    assert_same_grads(lambda: run("skew"), lambda: run("naive"), inputs)
    if masked:  # the span parameter receives a gradient (some heads have columns inside the ramp)
        grad_z, = torch.autograd.grad((run("skew") * torch.randn(2, 3, m, 4, dtype=F64)).sum(), z)
        assert grad_z.abs().sum() > 0


@pytest.mark.parametrize("m,span", [(5, 7), (4, 9)])
def test_per_head_key_pe_and_broadcast_mask(m, span):
    q, k, v, key_pe, z, pers_k, pers_v = _inputs(2, 3, m, span, 4, 2, seed=7, pe_per_head=True)
    inputs = [x.requires_grad_() for x in (q, k, v, key_pe, z)]
    layer_z = z[:1]  # one span for the whole layer: mask (1, L)
    assert_same_grads(
        lambda: adaptive_span_attention(q, k, v, key_pe, adaptive_span_mask(layer_z, span, 3), pers_k, pers_v,
                                        impl="skew"),
        lambda: adaptive_span_attention(q, k, v, key_pe, adaptive_span_mask(layer_z, span, 3), pers_k, pers_v,
                                        impl="naive"), inputs)


def test_dropout_draws_the_same_mask_in_both_forms():
    q, k, v, key_pe, z, pers_k, pers_v = _inputs(2, 3, 5, 7, 4, 3)
    mask = adaptive_span_mask(z, 7, 2)
    outs = []
    for impl in ("naive", "skew"):
        torch.manual_seed(11)
        outs.append(adaptive_span_attention(q, k, v, key_pe, mask, pers_k, pers_v, dropout_p=0.3, impl=impl))
    assert_close(outs[0], outs[1])
    torch.manual_seed(11)
    assert not torch.allclose(outs[0], adaptive_span_attention(q, k, v, key_pe, mask, pers_k, pers_v))


# --- blocked == naive ---------------------------------------------------------------------------------------------

def test_block_rows_are_the_largest_divisor_in_range_else_one_block():
    assert [block_rows(m) for m in (256, 512, 96, 100, 60, 37, 8, 64)] == [64, 64, 48, 50, 60, 37, 8, 64]
    assert block_rows(48, block=16) == 16 and block_rows(17, block=16) == 17 and block_rows(45, block=16) == 45


def test_auto_is_blocked_only_when_the_window_is_shorter_than_the_segment():
    """Where ``fused`` does not apply (CUDA, small scores; CPU fp32 at 8 MiB is test_fused.py's)."""
    assert select_impl("auto", 64, 256, device_type="cuda") == "blocked"
    assert select_impl("auto", 64, 256) == "blocked"
    assert select_impl("auto", 256, 256, device_type="cuda") == "skew"
    assert select_impl("auto", 1024, 256) == "skew"
    assert select_impl("skew", 64, 256) == "skew" and select_impl("blocked", 1024, 256) == "blocked"


@pytest.mark.parametrize("m,span,block", [(48, 5, 16), (64, 20, 16), (60, 7, 20), (37, 4, 16), (33, 40, 11)])
@pytest.mark.parametrize("n", [0, 3])
def test_blocked_matches_naive_with_gradients(m, span, block, n):
    """Several query blocks (3, 4, 3 of them; 37 rows: one block; 3 blocks of 11 rows under a longer window), each
    over its own R + L keys: outputs and the gradients of q, k, v, key_pe, z and the persistent vectors."""
    q, k, v, key_pe, z, pers_k, pers_v = _inputs(2, 3, m, span, 4, n, seed=m + span)
    inputs = [x.requires_grad_() for x in (q, k, v, key_pe, z, pers_k, pers_v) if x is not None]
    rows = block_rows(m, block, min_rows=1 if block < 16 else 16)
    assert (m // rows) == {48: 3, 64: 4, 60: 3, 37: 1, 33: 3}[m]

    def blocked():
        mask = adaptive_span_mask(z, span, 2)
        return adaptive_span_attention_blocked(q, k, v, key_pe, mask, pers_k, pers_v, rows=rows)

    assert_same_grads(blocked, lambda: adaptive_span_attention(q, k, v, key_pe, adaptive_span_mask(z, span, 2),
                                                               pers_k, pers_v, impl="naive"), inputs)


@pytest.mark.parametrize("s,width,step", [(13, 7, 3), (12, 4, 4), (9, 9, 2), (20, 5, 6)])
def test_windows_equal_unfold_with_gradients(s, width, step):
    """Overlapping, adjacent, single and gapped windows (rows past the last window get no gradient)."""
    from fairseq_ext.ops.adaptive_span.blocked import windows
    x = torch.randn(2, 3, s, 5, dtype=F64, requires_grad=True)
    assert_same_grads(lambda: windows(x, width, step), lambda: x.unfold(2, width, step).transpose(-1, -2), [x])
    assert windows(x, width, step).is_contiguous()


def test_blocked_draws_skews_dropout_mask():
    q, k, v, key_pe, z, pers_k, pers_v = _inputs(2, 3, 48, 5, 4, 2)
    mask = adaptive_span_mask(z, 5, 2)
    outs = []
    for run in (lambda: adaptive_span_attention(q, k, v, key_pe, mask, pers_k, pers_v, dropout_p=0.3, impl="skew"),
                lambda: adaptive_span_attention_blocked(q, k, v, key_pe, mask, pers_k, pers_v, dropout_p=0.3,
                                                        rows=16)):
        torch.manual_seed(11)
        outs.append(run())
    assert_close(outs[1], outs[0])
    with pytest.raises(ValueError, match="5 rows per block do not divide the 48 queries"):
        adaptive_span_attention_blocked(q, k, v, key_pe, mask, rows=5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_blocked_half_precision_over_several_blocks_is_as_close_as_skew(dtype):
    m, span, d = 96, 7, 16  # 2 blocks of 48 queries
    q, k, v, key_pe, z, pers_k, pers_v = _inputs(2, 3, m, span, d, 4, dtype=torch.float32, seed=4)
    mask = adaptive_span_mask(z, span, 2)
    ref = adaptive_span_attention(q * 8, k, v, key_pe, mask, pers_k, pers_v, impl="naive")
    lo = [x.to(dtype).requires_grad_() for x in (q * 8, k, v, key_pe, z, pers_k, pers_v)]
    errors = {}
    for impl in ("skew", "blocked"):
        out = adaptive_span_attention(lo[0], lo[1], lo[2], lo[3], adaptive_span_mask(lo[4], span, 2), lo[5], lo[6],
                                      impl=impl)
        assert out.dtype == dtype and torch.isfinite(out).all()
        errors[impl] = (out.float() - ref).abs().mean().item()
        grads = torch.autograd.grad(out.float().sum(), lo)
        assert all(torch.isfinite(g).all() for g in grads)
    assert errors["blocked"] <= 1.5 * errors["skew"] + 1e-4, errors


# --- renormalisation ---------------------------------------------------------------------------------------------

def _row_sums(impl, m, span, n, renorm=True):
    """Values of ones (and effective persistent values of ones) make every output entry the row's weight sum."""
    q, k, v, key_pe, z, pers_k, pers_v = _inputs(2, 3, m, span, 4, n, seed=5)
    v = torch.ones_like(v)
    if n:
        pers_v = torch.ones_like(pers_v) / math.sqrt(n)
    mask = adaptive_span_mask(z, span, 2)
    return adaptive_span_attention(q, k, v, key_pe, mask, pers_k, pers_v, renorm=renorm, impl=impl)


@pytest.mark.parametrize("impl", ["naive", "skew", "blocked"])
@pytest.mark.parametrize("n", [0, 4])
def test_masked_rows_sum_to_one(impl, n):
    assert_close(_row_sums(impl, 5, 7, n), torch.ones(2, 3, 5, 4, dtype=F64), atol=1e-6)
    without = _row_sums(impl, 5, 7, n, renorm=False)  # fairseq example compatibility: rows lose mass
    assert (without < 1 - 1e-3).any() and (without <= 1 + 1e-12).all()


@pytest.mark.parametrize("impl", ["naive", "skew", "blocked"])
@pytest.mark.parametrize("n", [0, 4])
def test_masked_renormalised_equals_log_mask_bias(impl, n):
    """Spec checks 3 and 10: softmax(s)·m / sum == softmax([s + log m ; s^p]) within 1e-7, the persistent slots
    unmasked and normalised jointly."""
    m, span, d = 5, 7, 4
    q, k, v, key_pe, z, pers_k, pers_v = _inputs(2, 3, m, span, d, n, seed=9)
    mask = adaptive_span_mask(z, span, 2)  # (H, L)
    out = adaptive_span_attention(q, k, v, key_pe, mask, pers_k, pers_v, impl=impl)
    exact = adaptive_span_attention(q, k, v, key_pe, mask, pers_k, pers_v, eps=0.0, impl=impl)
    idx = torch.arange(m)[:, None] + torch.arange(span)[None, :]  # (M, L) key index i + j
    logits = (torch.einsum("bhmd,bhmld->bhml", q, k[:, :, idx]) + q @ key_pe) / math.sqrt(d)
    logits = logits + mask.log()[:, None, :]  # -inf where m = 0
    if n:
        logits = torch.cat([logits, q @ pers_k], -1)  # (q . sqrt(D) k^p) / sqrt(D)
    a = torch.softmax(logits, -1)
    ref = torch.einsum("bhml,bhmld->bhmd", a[..., :span], v[:, :, idx])
    if n:
        ref = ref + a[..., span:] @ (pers_v * math.sqrt(n))
    assert_close(exact, ref)  # eps = 0: the same function (1e-10)
    # eps = 1e-8 shifts the result by ~ eps / (unmasked softmax mass), relative: ~1e-7 when masking keeps ~10%
    assert_close(out, ref, atol=1e-6)


# --- trimming is exact, cache-too-short --------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["naive", "skew", "blocked"])
def test_trimmed_window_equals_full_window(impl):
    """Spec check 5/6: computing only the last L_pos distances (keys cut, key_pe and mask sliced) gives the full
    result; a cache shorter than L_pos is zero-padded and equals the full computation with zero cache entries.
    Exact (1e-10) with eps = 0; with the original's eps = 1e-8 the two differ by ~ eps / (unmasked softmax mass)
    relative, because the softmax over fewer columns leaves more mass for eps to be compared with."""
    span, ramp, m, d = 200, 8, 5, 4
    z = torch.tensor([0.1, 0.02], dtype=F64)
    keep = needed_keys(z, span, ramp)
    assert keep == 72  # S_max = ceil(20) + 8 = 28, trim = 64 floor(172 / 64) = 128
    q, k, v, key_pe, _, pers_k, pers_v = _inputs(1, 2, m, span, d, 3, seed=2)
    full_mask = adaptive_span_mask(z, span, ramp)
    trim_mask = adaptive_span_mask(z, span, ramp, length=keep)
    for eps, atol in ((0.0, 1e-10), (1e-8, 1e-6)):
        full = adaptive_span_attention(q, k, v, key_pe, full_mask, pers_k, pers_v, eps=eps, impl=impl)
        trimmed = adaptive_span_attention(q, fit_keys(k, keep + m), fit_keys(v, keep + m), key_pe[:, -keep:],
                                          trim_mask, pers_k, pers_v, eps=eps, impl=impl)
        assert_close(trimmed, full, atol=atol)
    short = 50  # cached positions actually available
    k_short, v_short = k[:, :, -(short + m):], v[:, :, -(short + m):]
    padded = adaptive_span_attention(q, fit_keys(k_short, keep + m), fit_keys(v_short, keep + m), key_pe[:, -keep:],
                                     trim_mask, pers_k, pers_v, eps=0.0, impl=impl)
    k_zero, v_zero = k.clone(), v.clone()
    k_zero[:, :, :span - short] = 0
    v_zero[:, :, :span - short] = 0
    assert_close(padded, adaptive_span_attention(q, k_zero, v_zero, key_pe, full_mask, pers_k, pers_v, eps=0.0,
                                                 impl=impl))


# --- half precision, errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["naive", "skew", "blocked"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 6])
def test_half_precision_is_finite_and_close(impl, dtype, n):
    m, span, d = 5, 7, 16
    q, k, v, key_pe, z, pers_k, pers_v = _inputs(2, 3, m, span, d, n, dtype=torch.float32, seed=4)
    q = q * 8  # large logits: |q.k| ~ 8 sqrt(D) before the 1/sqrt(D)
    mask = adaptive_span_mask(z, span, 2)
    ref = adaptive_span_attention(q, k, v, key_pe, mask, pers_k, pers_v, impl="naive")
    lo = [x.to(dtype) if x is not None else None for x in (q, k, v, key_pe, z, pers_k, pers_v)]
    lo = [x.requires_grad_() if x is not None else None for x in lo]
    out = adaptive_span_attention(lo[0], lo[1], lo[2], lo[3], adaptive_span_mask(lo[4], span, 2), lo[5], lo[6],
                                  impl=impl)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out.float(), ref, atol=1e-1 if dtype == torch.bfloat16 else 2e-2, rtol=0.0)
    out.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in lo if x is not None)


def test_errors():
    q, k, v, key_pe, z, pers_k, pers_v = _inputs(1, 2, 3, 4, 5, 2)
    with pytest.raises(ValueError, match="attn_impl"):
        adaptive_span_attention(q, k, v, key_pe, impl="fast")
    with pytest.raises(ValueError, match="fit_keys"):
        adaptive_span_attention(q, k[:, :, 1:], v[:, :, 1:], key_pe)
    with pytest.raises(ValueError, match="columns"):
        adaptive_span_attention(q, k, v, key_pe, adaptive_span_mask(z, 8, 2))
    with pytest.raises(ValueError, match="both"):
        adaptive_span_attention(q, k, v, key_pe, None, pers_k, None)
    with pytest.raises(ValueError, match="length"):
        adaptive_span_mask(z, 4, 2, length=5)
