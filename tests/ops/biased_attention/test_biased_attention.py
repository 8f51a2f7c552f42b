"""ops/biased_attention: sdpa (one additive mask, log m for the span) == naive (softmax, then m · a renormalised):
outputs and gradients w.r.t. q, k, v, the bias and the span parameters, float64, odd sizes, windows, empty rows."""
import pytest
import torch

from fairseq_ext.ops.adaptive_span.mask import span_mask_at
from fairseq_ext.ops.biased_attention import biased_attention
from tests.harness import assert_close, assert_same_grads

B, H, T, D = 2, 3, 7, 5


def inputs(s: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, s, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, s, D, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, H, T, s, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v, bias


def distances(s: int):
    return (s - T + torch.arange(T))[:, None] - torch.arange(s)[None]  # (T, S): the segment is the last T keys


@pytest.mark.parametrize("s,window", [(7, None), (11, None), (11, 4), (13, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sdpa_equals_naive_with_bias_and_window(s, window, with_bias):
    q, k, v, bias = inputs(s)
    d = distances(s)
    visible = (d >= 0) & (d <= (window if window is not None else s))
    b = bias if with_bias else None

    def run(impl):
        return lambda: biased_attention(q, k, v, b, visible, scale=0.37, impl=impl)

    assert_same_grads(run("sdpa"), run("naive"), [q, k, v, bias] if with_bias else [q, k, v])


def test_plain_causal_attention_takes_the_causal_kernel(monkeypatch):
    """No bias, no span, the square lower triangle: SDPA's is_causal path (the case above with s = T, window None
    and no bias compares it with naive); any other visibility takes the additive mask."""
    import fairseq_ext.ops.biased_attention.sdpa as kernel

    calls = []
    real = kernel.sdpa  # ops/sdpa.py: scaled_dot_product_attention (packed dropout in CPU training)
    monkeypatch.setattr(kernel, "sdpa", lambda *a, **kw: calls.append(kw.get("is_causal", False)) or real(*a, **kw))
    q, k, v, _ = inputs(T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    biased_attention(q, k, v, None, causal, scale=0.5, impl="sdpa")
    biased_attention(q, k, v, None, causal & ~torch.eye(T, dtype=torch.bool), scale=0.5, impl="sdpa")
    assert calls == [True, False]


@pytest.mark.parametrize("z0", [0.3, 0.55, 1.0])
def test_span_mask_as_log_term_equals_renormalised_probabilities(z0):
    """z values whose ramp reaches zero inside the keys (m = 0 there, between two key distances) and z = 1."""
    s, L, R = 12, 9, 3
    q, k, v, bias = inputs(s, seed=1)
    z = torch.tensor([z0, 0.5, 0.8], dtype=torch.float64)[:H].requires_grad_()
    d = distances(s)
    visible = (d >= 0) & (d <= L)

    def run(impl):
        def fn():
            mask = span_mask_at(z[:, None, None], d.clamp(min=1), L, R)[None]  # (1, H, T, S)
            return biased_attention(q, k, v, bias, visible, mask, scale=0.5, impl=impl)
        return fn

    assert_same_grads(run("sdpa"), run("naive"), [q, k, v, bias, z])


def test_rows_without_a_visible_key_are_zero_in_both():
    q, k, v, _ = inputs(T)
    visible = torch.zeros(T, T, dtype=torch.bool)
    visible[3:] = torch.tril(torch.ones(T - 3, T, dtype=torch.bool), diagonal=3)
    naive = biased_attention(q, k, v, None, visible, scale=1.0, impl="naive")
    sdpa = biased_attention(q, k, v, None, visible, scale=1.0, impl="sdpa")
    assert torch.all(naive[:, :, :3] == 0) and torch.all(sdpa[:, :, :3] == 0)
    assert_close(sdpa, naive)


def test_bad_shapes_and_impls_are_errors():
    q, k, v, _ = inputs(T)
    visible = torch.ones(T, T, dtype=torch.bool)
    with pytest.raises(ValueError, match="choose one of"):
        biased_attention(q, k, v, None, visible, scale=1.0, impl="flash")
    with pytest.raises(ValueError, match=r"\(B, H, T, D\)"):
        biased_attention(q[0], k, v, None, visible, scale=1.0)


def test_auto_takes_the_reference_while_a_gradient_reaches_the_span():
    """At z = 0 the ramp ends exactly on the key at distance R + 1 (m = 0): sdpa drops it, so its z-gradient misses
    that key's one-sided derivative; auto then runs naive (the paper's form) and outputs stay equal."""
    s, L, R = 12, 9, 3
    q, k, v, bias = inputs(s, seed=2)
    z = torch.zeros(H, dtype=torch.float64, requires_grad=True)
    d = distances(s)
    visible = (d >= 0) & (d <= L)

    def grad_z(impl):
        mask = span_mask_at(z[:, None, None], d.clamp(min=1), L, R)[None]
        out = biased_attention(q, k, v, bias, visible, mask, scale=0.5, impl=impl)
        return out, torch.autograd.grad(out.square().sum(), z)[0]

    (auto, g_auto), (naive, g_naive), (sdpa, g_sdpa) = grad_z("auto"), grad_z("naive"), grad_z("sdpa")
    assert_close(auto, naive)
    assert_close(sdpa, naive)
    assert torch.equal(g_auto, g_naive) and not torch.allclose(g_sdpa, g_naive)
