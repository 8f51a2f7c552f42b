"""ALiBi fast paths (sdpa, flex) == the naive reference == a brute-force per-head loop: outputs and gradients in
float64 at odd sizes, with query offsets (cached keys) and key padding. Spec acceptance checks 3, 4 and 9."""
import math

import pytest
import torch

from fairseq_ext.ops.alibi import alibi_attention, alibi_slopes
from tests.harness import assert_close, assert_same_grads

FAST = ["sdpa", "flex"]
CUDA = torch.cuda.is_available()


def _compare(impl, q, k, v, slopes, **kw):
    """Outputs and gradients vs naive; flex has no CPU backward, so on CPU only its outputs are compared."""
    if impl == "flex" and not CUDA:
        with torch.no_grad():
            assert_close(alibi_attention(q, k, v, slopes, impl=impl, **kw),
                         alibi_attention(q, k, v, slopes, impl="naive", **kw))
        return
    dev = "cuda" if impl == "flex" else "cpu"
    q, k, v = (x.detach().to(dev).requires_grad_() for x in (q, k, v))
    assert_same_grads(lambda: alibi_attention(q, k, v, slopes, impl=impl, **kw),
                      lambda: alibi_attention(q, k, v, slopes, impl="naive", **kw), [q, k, v])


def brute_force(q, k, v, slopes, q_offset=0, key_padding_mask=None):
    """softmax(q.k/sqrt(d) - m (i - j)) v, one query and one head at a time."""
    b, h, t, d = q.shape
    s = k.size(2)
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                pos = q_offset + i
                keys = [j for j in range(s) if j <= pos and (key_padding_mask is None or not key_padding_mask[bi, j])]
                if not keys:
                    continue
                logits = torch.stack([q[bi, hi, i] @ k[bi, hi, j] / math.sqrt(d) - slopes[hi] * (pos - j)
                                      for j in keys])
                p = torch.softmax(logits, 0)
                out[bi, hi, i] = sum(p[n] * v[bi, hi, j] for n, j in enumerate(keys))
    return out


def _inputs(b=2, h=3, t=5, s=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return mk(b, h, t, d), mk(b, h, s, d), mk(b, h, s, d)


@pytest.mark.parametrize("heads", [3, 6])
def test_naive_equals_brute_force(heads):
    q, k, v = _inputs(h=heads)
    pad = torch.tensor([[True, True, False, False, False, False, False], [False] * 7])
    slopes = alibi_slopes(heads)
    for mask in (None, pad):
        ref = brute_force(q.detach(), k.detach(), v.detach(), slopes.double(), q_offset=2, key_padding_mask=mask)
        out = alibi_attention(q, k, v, slopes, q_offset=2, key_padding_mask=mask, impl="naive")
        assert_close(out, ref)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("form", ["relative", "key_index"])
@pytest.mark.parametrize("q_offset,t,s", [(0, 7, 7), (2, 5, 7), (6, 1, 7), (0, 13, 13)])
def test_fast_equals_naive_outputs_and_gradients(impl, form, q_offset, t, s):
    q, k, v = _inputs(t=t, s=s)
    slopes = alibi_slopes(3)
    _compare(impl, q, k, v, slopes, q_offset=q_offset, form=form)


@pytest.mark.parametrize("impl", FAST)
def test_fast_equals_naive_with_left_padding_and_fully_masked_rows(impl):
    q, k, v = _inputs(t=7, s=7)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, :3] = True  # rows 0..2 of sequence 0 see only padding: their output is zero, not NaN
    slopes = alibi_slopes(3)
    with torch.no_grad():
        out = alibi_attention(q, k, v, slopes, key_padding_mask=pad, impl=impl)
    assert torch.isfinite(out).all() and torch.all(out[0, :, :3] == 0)
    _compare(impl, q, k, v, slopes, key_padding_mask=pad)


def test_key_index_equals_relative_in_fp32():
    """Softmax shift invariance: under the causal mask m*j and -m*(i-j) give the same probabilities."""
    t, h = 64, 8
    q, k = torch.randn(1, h, t, 16), torch.randn(1, h, t, 16)
    v = torch.eye(t).expand(1, h, t, t)
    rel = alibi_attention(q, k, v, alibi_slopes(h), form="relative", impl="naive")
    key = alibi_attention(q, k, v, alibi_slopes(h), form="key_index", impl="naive")
    assert (rel - key).abs().max().item() <= 1e-6


def test_relative_form_is_precise_in_fp16_where_key_index_is_not():
    """Spec §1.4: at T=3072 with 8 heads, fp16 relative-form probabilities are within 1e-3 of fp32 while the
    fork's key-index form is off by O(0.1) (m*j reaches 1536, where the fp16 spacing is 1)."""
    t, h, d = 3072, 8, 8
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, h, t, d, generator=g), torch.randn(1, h, t, d, generator=g)
    slopes = alibi_slopes(h)
    q = q[:, :, t - 64:]  # only the last 64 queries (q_offset t - 64): they see the largest key indices
    v = torch.eye(t).expand(1, h, t, t)  # identity values: the outputs are the probabilities
    ref = alibi_attention(q, k, v, slopes, q_offset=t - 64, impl="sdpa")[0]  # fp32 relative reference
    errs = {}
    for form in ("relative", "key_index"):
        out = alibi_attention(q.half(), k.half(), v.half(), slopes, q_offset=t - 64, form=form, impl="sdpa")[0]
        errs[form] = (out.float() - ref).abs().max().item()
    assert errs["relative"] <= 1e-3, errs
    assert errs["key_index"] >= 0.05, errs


def test_dispatcher_errors_are_explicit():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="unknown attn_impl"):
        alibi_attention(q, k, v, alibi_slopes(3), impl="flash9")
    with pytest.raises(ValueError, match="unknown ALiBi bias form"):
        alibi_attention(q, k, v, alibi_slopes(3), form="absolute")
    with pytest.raises(ValueError, match="causal"):
        alibi_attention(q, k, v, alibi_slopes(3), form="key_index", causal=False)
    with pytest.raises(ValueError, match="dropout"):
        alibi_attention(q, k, v, alibi_slopes(3), impl="flex", dropout_p=0.1)
    if not CUDA:
        with pytest.raises(ValueError, match="no backward pass on CPU"):
            alibi_attention(q, k, v, alibi_slopes(3), impl="flex")


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("impl", FAST)
def test_fast_paths_match_fp32_reference_in_half_precision(impl, dtype, atol):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 37, 16, generator=g) for _ in range(3))
    slopes = alibi_slopes(4)
    ref = alibi_attention(q, k, v, slopes, impl="naive", q_offset=5)
    out = alibi_attention(q.to(dtype), k.to(dtype), v.to(dtype), slopes, impl=impl, q_offset=5)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max().item() <= atol
