"""ops/boom.py: the fused Boom activation (GELU -> dropout -> chunk sum, one autograd function in CPU float training)
equals the step-by-step reference on the same dropout draws: outputs bitwise, gradients to rounding (float64, odd
sizes, non-contiguous input); every other case is the reference itself."""
import pytest
import torch

from fairseq_ext.ops.boom import boom_activation, boom_reference, gelu_1702
from tests.harness import assert_close


@pytest.mark.parametrize("shape,dim", [((3, 7, 15), 5), ((2, 1, 4), 4), ((11, 6), 2)])
@pytest.mark.parametrize("p", [0.1, 0.37])
def test_fused_equals_reference_outputs_and_gradients(shape, dim, p):
    a = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    fused = boom_activation(a, dim, p, True, torch.Generator().manual_seed(7))
    ref = boom_reference(a, dim, p, True, torch.Generator().manual_seed(7))
    assert fused.shape == (*shape[:-1], dim)
    assert torch.equal(fused, ref)  # the same draws and the same forward ops
    assert fused.grad_fn is not None and "GeluDropoutChunkSum" in type(fused.grad_fn).__name__  # the fused path ran
    g = torch.randn_like(ref)
    (grad_fused,) = torch.autograd.grad(fused, a, g)
    (grad_ref,) = torch.autograd.grad(ref, a, g)
    assert_close(grad_fused, grad_ref, atol=1e-13, rtol=1e-12, msg="gradient of a")


def test_non_contiguous_input_and_float32():
    base = torch.randn(8, 6, 3, generator=torch.Generator().manual_seed(1))
    a = base.transpose(0, 1).requires_grad_()  # (6, 8, 3), not contiguous
    fused = boom_activation(a, 3, 0.2, True, torch.Generator().manual_seed(2))
    ref = boom_reference(a, 3, 0.2, True, torch.Generator().manual_seed(2))
    assert torch.equal(fused, ref)
    g = torch.randn_like(ref)
    assert_close(torch.autograd.grad(fused, a, g)[0], torch.autograd.grad(ref, a, g)[0], atol=1e-6, rtol=1e-5,
                 msg="float32 gradient")


def test_without_dropout_it_is_gelu_then_chunk_sum():
    a = torch.randn(2, 3, 12, dtype=torch.float64)
    expected = gelu_1702(a).view(2, 3, 3, 4).sum(-2)
    for training, p in ((False, 0.5), (True, 0.0)):
        assert torch.equal(boom_activation(a, 4, p, training), expected)
    assert torch.equal(boom_activation(a.to(torch.bfloat16), 4, 0.0, True), boom_reference(a.to(torch.bfloat16), 4, 0.0,
                                                                                           True))


def test_half_precision_training_takes_the_reference():
    a = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).requires_grad_()
    out = boom_activation(a, 4, 0.3, True, torch.Generator().manual_seed(4))
    assert out.dtype == torch.bfloat16 and "GeluDropoutChunkSum" not in type(out.grad_fn).__name__
    assert torch.equal(out, boom_reference(a, 4, 0.3, True, torch.Generator().manual_seed(4)))


def test_inner_width_must_be_a_multiple():
    with pytest.raises(ValueError, match="inner width 10 must be a multiple of the model width 4"):
        boom_activation(torch.randn(2, 10), 4, 0.1, True)
