"""Adaptive-span attention through FlexAttention (ops/adaptive_span/flex.py) == the naive reference with eps = 0
(the renormalisation softmax(s + log m) computes): outputs on CPU in float64 at odd sizes, with and without a span
mask (spans that zero whole key blocks), persistent memory and per-head position embeddings; outputs and gradients
on CUDA (skipped without one); and the clear errors of what it cannot do."""
import pytest
import torch

from fairseq_ext.ops.adaptive_span import adaptive_span_attention, adaptive_span_mask
from tests.harness import assert_close
from tests.ops.adaptive_span.test_adaptive_span_ops import _inputs

CUDA = torch.cuda.is_available()
CASES = [  # (M queries, L window, persistent slots N, span mask, per-head key_pe)
    (5, 7, 0, True, False),
    (3, 4, 2, True, True),
    (6, 9, 0, False, False),
    (1, 3, 3, True, False),
    (131, 200, 0, True, True),  # several 128-blocks: small spans leave whole key blocks masked
]


def _args(m, span, n, masked, per_head, dtype, device):
    q, k, v, key_pe, z, pers_k, pers_v = _inputs(2, 3, m, span, 8, n=n, dtype=dtype, seed=m + span,
                                                 pe_per_head=per_head)
    mask = adaptive_span_mask(z, span, 2) if masked else None
    return [x.to(device) if x is not None else None for x in (q, k, v, key_pe, mask, pers_k, pers_v)]


@pytest.mark.parametrize("m, span, n, masked, per_head", CASES)
def test_flex_forward_equals_naive_on_cpu(m, span, n, masked, per_head):
    q, k, v, key_pe, mask, pers_k, pers_v = _args(m, span, n, masked, per_head, torch.float64, "cpu")
    with torch.no_grad():
        expected = adaptive_span_attention(q, k, v, key_pe, mask, pers_k, pers_v, eps=0.0, impl="naive")
        actual = adaptive_span_attention(q, k, v, key_pe, mask, pers_k, pers_v, impl="flex")
    assert_close(actual, expected, atol=1e-10, msg=f"flex vs naive (M={m}, L={span}, N={n}, mask={masked})")


@pytest.mark.skipif(not CUDA, reason="FlexAttention's backward runs on CUDA only in this torch version")
@pytest.mark.parametrize("m, span, n, masked, per_head", CASES)
def test_flex_outputs_and_gradients_equal_naive_on_cuda(m, span, n, masked, per_head):
    args = _args(m, span, n, masked, per_head, torch.float32, "cuda")
    leaves = [a.detach().requires_grad_() if a is not None else None for a in args]
    grads = []
    for impl in ("naive", "flex"):
        inputs = [a.detach().clone().requires_grad_() if a is not None else None for a in leaves]
        out = adaptive_span_attention(*inputs, eps=0.0, impl=impl)
        out.pow(2).sum().backward()
        grads.append([out.detach()] + [a.grad for a in inputs if a is not None and a.grad is not None])
    for i, (a, e) in enumerate(zip(grads[1], grads[0])):
        assert_close(a, e, atol=1e-4, rtol=1e-4, msg=f"flex vs naive, output / gradient {i}")


def test_flex_refuses_what_it_cannot_compute():
    q, k, v, key_pe, mask, _, _ = _args(4, 5, 0, True, False, torch.float64, "cpu")
    with torch.no_grad():
        with pytest.raises(ValueError, match="no attention dropout"):
            adaptive_span_attention(q, k, v, key_pe, mask, dropout_p=0.1, impl="flex")
        with pytest.raises(ValueError, match="--no-span-renorm needs attn_impl='skew'"):
            adaptive_span_attention(q, k, v, key_pe, mask, renorm=False, impl="flex")
    if not CUDA:
        with pytest.raises(ValueError, match="no backward pass on CPU"):
            adaptive_span_attention(q.requires_grad_(), k, v, key_pe, mask, impl="flex")


def test_reference_eps_changes_the_result_by_eps_over_the_mass():
    """The model's eps = 1e-8 against flex (eps = 0): relative differences of order 1e-8 / (unmasked mass)."""
    q, k, v, key_pe, mask, _, _ = _args(5, 7, 0, True, False, torch.float64, "cpu")
    with torch.no_grad():
        flex = adaptive_span_attention(q, k, v, key_pe, mask, impl="flex")
        naive = adaptive_span_attention(q, k, v, key_pe, mask, eps=1e-8, impl="naive")
    assert_close(flex, naive, atol=1e-6)


def test_small_spans_leave_key_blocks_empty():
    """The paper's saving in FlexAttention's terms: the smaller the spans, the more (query block, key block) pairs of
    the block mask are empty and not computed."""
    from fairseq_ext.ops.adaptive_span.flex import span_block_mask

    m, span = 256, 1024  # 2 query blocks over 10 key blocks of 128
    sparsity = []
    for z in (0.05, 0.5, 1.0):
        log_m = adaptive_span_mask(torch.full((2,), z), span, 32).log()  # (H, L)
        sparsity.append(span_block_mask(log_m, m, span + m, span + m).sparsity())
    assert sparsity[0] > sparsity[1] > sparsity[2] > 0, sparsity
