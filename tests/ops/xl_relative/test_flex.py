"""Transformer-XL relative attention through FlexAttention (ops/xl_relative/flex.py: the unshifted position scores
read by index) == the naive reference: outputs on CPU in float64 at odd sizes, with and without a memory and a
same-length window; outputs and gradients on CUDA (skipped without one); the clear errors of what it cannot do."""
import pytest
import torch

from fairseq_ext.ops.xl_relative import xl_relative_attention
from tests.harness import assert_close
from tests.ops.xl_relative.test_xl_relative import _inputs

CUDA = torch.cuda.is_available()
CASES = [(5, 0, None), (3, 4, None), (7, 5, 6), (1, 9, None), (130, 70, 150)]  # (T, M, same-length window W)


@pytest.mark.parametrize("t, m, window", CASES)
def test_flex_forward_equals_naive_on_cpu(t, m, window):
    q, k, v, r, u, w = _inputs(2, 3, t, m, 8, seed=t + m)
    with torch.no_grad():
        expected = xl_relative_attention(q, k, v, r, u, w, window=window, impl="naive")
        actual = xl_relative_attention(q, k, v, r, u, w, window=window, impl="flex")
    assert_close(actual, expected, atol=1e-10, msg=f"flex vs naive (T={t}, M={m}, W={window})")


@pytest.mark.skipif(not CUDA, reason="FlexAttention's backward runs on CUDA only in this torch version")
@pytest.mark.parametrize("t, m, window", CASES)
def test_flex_outputs_and_gradients_equal_naive_on_cuda(t, m, window):
    base = [x.float().cuda() for x in _inputs(2, 3, t, m, 8, seed=t + m)]
    results = []
    for impl in ("naive", "flex"):
        inputs = [x.detach().clone().requires_grad_() for x in base]
        out = xl_relative_attention(*inputs, window=window, impl=impl)
        out.pow(2).sum().backward()
        results.append([out.detach()] + [x.grad for x in inputs])
    for i, (a, e) in enumerate(zip(results[1], results[0])):
        assert_close(a, e, atol=1e-4, rtol=1e-4, msg=f"flex vs naive, output / gradient {i}")


def test_flex_refuses_what_it_cannot_compute():
    q, k, v, r, u, w = _inputs(1, 2, 4, 3, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="no attention dropout"):
        xl_relative_attention(q, k, v, r, u, w, dropout_p=0.1, impl="flex")
    if not CUDA:
        with pytest.raises(ValueError, match="no backward pass on CPU"):
            xl_relative_attention(q.requires_grad_(), k, v, r, u, w, impl="flex")
