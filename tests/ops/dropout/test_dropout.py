"""Packed-bits dropout: the fast path equals the written-out reference on the same draws (outputs and gradients,
float64, odd sizes, non-contiguous input), its drop rate and mean match inverted dropout's, and the dispatcher uses
it only for CPU training (F.dropout elsewhere; p = 0 / 1 and bad p as F.dropout)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fairseq_ext.ops.dropout import (
    dropout,
    dropout_from_bits,
    packed_dropout,
    packed_relu_dropout,
    quantized_drop_count,
    random_bits16,
    relu_dropout,
)

PROBS = [0.1, 0.25, 1 / 3, 0.5, 0.9]


@pytest.mark.parametrize("p", PROBS)
@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (2, 1, 9, 13)])
def test_packed_equals_reference_outputs_and_grads(p, shape):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    fast = packed_dropout(x, p, torch.Generator().manual_seed(5))
    bits = random_bits16(x.numel(), x.device, torch.Generator().manual_seed(5))
    ref = dropout_from_bits(x, bits, p)
    torch.testing.assert_close(fast, ref, rtol=1e-14, atol=0)  # the scale rounds differently: within an ulp
    g = torch.randn(*shape, dtype=torch.float64)
    (grad_fast,) = torch.autograd.grad(fast, x, g)
    (grad_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-14, atol=0)


def test_non_contiguous_input_uses_its_own_shape():
    base = torch.randn(6, 5, dtype=torch.float64)
    x = base.t()  # (5, 6), not contiguous
    fast = packed_dropout(x, 0.3, torch.Generator().manual_seed(1))
    ref = dropout_from_bits(x, random_bits16(x.numel(), x.device, torch.Generator().manual_seed(1)), 0.3)
    assert fast.shape == (5, 6)
    torch.testing.assert_close(fast, ref, rtol=1e-14, atol=0)


@pytest.mark.parametrize("p", PROBS)
def test_drop_rate_and_mean_match_inverted_dropout(p):
    n = 1 << 20
    out = packed_dropout(torch.ones(n), p, torch.Generator().manual_seed(2))
    drop_p = quantized_drop_count(p) / 65536
    assert abs(drop_p - p) <= 2 ** -17
    dropped = (out == 0).double().mean().item()
    sigma = math.sqrt(drop_p * (1 - drop_p) / n)
    assert abs(dropped - drop_p) < 5 * sigma
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - drop_p)))
    assert abs(out.double().mean().item() - 1.0) < 5 * sigma / (1 - drop_p)


def test_bits_are_uniform_in_every_lane():
    """All four 16-bit lanes of a 64-bit draw are uniform (plain random_() would leave one lane's top bit 0)."""
    bits = random_bits16(1 << 20, torch.device("cpu"), torch.Generator().manual_seed(0)).view(-1, 4)
    top = (bits < 0).double().mean(0)  # the sign bit of each lane
    assert torch.all((top - 0.5).abs() < 0.005), top


def test_dispatch_cpu_training_is_packed_and_seeded():
    x = torch.randn(4, 33)
    torch.manual_seed(7)
    a = dropout(x, 0.2, True)
    torch.manual_seed(7)
    b = packed_dropout(x, 0.2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(8)
    assert not torch.equal(dropout(x, 0.2, True), a)


def test_dispatch_identity_and_edges():
    x = torch.randn(3, 10, dtype=torch.bfloat16)
    assert dropout(x, 0.5, False) is x or torch.equal(dropout(x, 0.5, False), x)
    assert torch.equal(dropout(x, 0.0, True), x)
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))
    assert dropout(x, 0.3, True).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5, True)
    with pytest.raises(ValueError, match="between 0 and 1"):
        F.dropout(x, 1.5, True)  # the same refusal as torch's


def test_tiny_probability_is_no_dropout_not_a_silent_shift():
    """p below 2^-17 rounds to k = 0: nothing dropped, no rescaling (F.dropout's scale would be 1/(1-p) ~ 1)."""
    x = torch.randn(100, dtype=torch.float64)
    assert torch.equal(packed_dropout(x, 1e-6), x)


def test_double_backward_matches_reference():
    """The mask-and-scale backward is itself differentiable (as F.dropout's): second derivatives equal the
    reference's on the same draws."""
    x = torch.randn(3, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)

    def second(fn):
        (g,) = torch.autograd.grad((fn(x) ** 3).sum(), x, create_graph=True)
        return torch.autograd.grad(g.sum(), x)[0]

    fast = second(lambda t: packed_dropout(t, 0.4, torch.Generator().manual_seed(9)))
    bits = random_bits16(x.numel(), x.device, torch.Generator().manual_seed(9))
    ref = second(lambda t: dropout_from_bits(t, bits, 0.4))
    torch.testing.assert_close(fast, ref, rtol=1e-13, atol=0)


def test_inside_torch_compile_it_is_torch_dropout():
    """torch.compile cannot trace the int64 -> int16 view of the packed bits (its alias replay reads past the int64
    storage): compiled code draws F.dropout's mask, an unbiased inverted dropout with the exact p."""
    n, p = 1 << 18, 0.25
    compiled = torch.compile(lambda x: dropout(x, p, True), backend="aot_eager", fullgraph=True)
    out = compiled(torch.ones(n, requires_grad=True))
    out.sum().backward()
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n)
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_dtype_equals_the_reference_on_the_same_draws(dtype):
    """float32 builds a float mask from the draws, bfloat16 / float16 a bool one (they cannot hold the draws
    exactly): each equals the reference computed in float64 and rounded to the dtype, within one rounding of the
    scale."""
    x = torch.randn(5, 37, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_()
    fast = packed_dropout(x, 0.3, torch.Generator().manual_seed(6))
    bits = random_bits16(x.numel(), x.device, torch.Generator().manual_seed(6))
    ref = dropout_from_bits(x.detach().double(), bits, 0.3).to(dtype)
    assert fast.dtype == dtype
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(fast, ref, rtol=ulp, atol=0)
    g = torch.randn(5, 37).to(dtype)
    (grad,) = torch.autograd.grad(fast, x, g)
    torch.testing.assert_close(grad, dropout_from_bits(g.double(), bits, 0.3).to(dtype), rtol=ulp, atol=0)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 11)])
def test_relu_dropout_equals_dropout_of_relu_on_the_same_draws(p, inplace, shape):
    """ReLU folded into the mask: the reference dropout(relu(x)) on the same bits, outputs and gradients (zeros of
    x included: ReLU's gradient there is 0, as torch's)."""
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x.view(-1)[::4] = 0.0
    leaf = x.clone().requires_grad_()
    produced = leaf * 1.0  # a caller's temporary (in place is refused on a leaf)
    fast = packed_relu_dropout(produced, p, torch.Generator().manual_seed(2), inplace=inplace)
    assert (fast.data_ptr() == produced.data_ptr()) == inplace
    ref_leaf = x.clone().requires_grad_()
    bits = random_bits16(x.numel(), x.device, torch.Generator().manual_seed(2))
    ref = dropout_from_bits(torch.relu(ref_leaf), bits, p)
    torch.testing.assert_close(fast, ref, rtol=1e-14, atol=0)
    g = torch.randn(*shape, dtype=torch.float64)
    fast.backward(g)
    ref.backward(g)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-14, atol=0)


def test_relu_dropout_dispatch_and_other_dtypes():
    x = torch.randn(4, 33)
    torch.manual_seed(7)
    a = relu_dropout(x, 0.2, True)
    torch.manual_seed(7)
    torch.testing.assert_close(a, dropout(torch.relu(x), 0.2, True), rtol=1e-7, atol=0)  # the same draws
    assert torch.equal(relu_dropout(x, 0.2, False), torch.relu(x))
    assert torch.equal(relu_dropout(x, 0.0, True), torch.relu(x))
    half = x.to(torch.bfloat16)
    torch.manual_seed(3)
    b = relu_dropout(half, 0.3, True)
    torch.manual_seed(3)
    assert b.dtype == torch.bfloat16 and torch.equal(b, dropout(torch.relu(half), 0.3, True))
    with pytest.raises(ValueError, match="between 0 and 1"):
        relu_dropout(x, -0.1, True)


def test_relu_dropout_on_a_view_is_not_written_in_place():
    """In place on a view would make autograd copy the whole base's gradient back: the product is a new tensor."""
    base = torch.randn(6, 8, dtype=torch.float64).requires_grad_() * 1.0
    view = base.view(3, 16)
    before = view.detach().clone()
    out = packed_relu_dropout(view, 0.3, torch.Generator().manual_seed(0), inplace=True)
    assert out.data_ptr() != view.data_ptr() and torch.equal(view.detach(), before)


@pytest.mark.parametrize("p, training", [(0.0, True), (0.3, False)])
def test_relu_dropout_without_draws_is_in_place_on_a_tensor_and_not_on_a_view(p, training):
    """The F.relu path (no dropout draws) follows the same rule: over x when it is its own tensor, never over a view
    (a 3-D linear output is a view of its 2-D product)."""
    own = torch.randn(6, 8)
    assert relu_dropout(own, p, training, inplace=True).data_ptr() == own.data_ptr()
    assert torch.equal(own, own.clamp_min(0))
    view = torch.randn(6, 8).view(3, 16)
    before = view.clone()
    out = relu_dropout(view, p, training, inplace=True)
    assert torch.equal(view, before) and torch.equal(out, torch.relu(before))
