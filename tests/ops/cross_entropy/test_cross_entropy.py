"""Summed cross-entropy: the blockwise op equals the log-softmax reference and ``F.cross_entropy`` (values and
gradients, float64, odd sizes, several blocks, ignored rows), writes its gradient over consumed logits (never over a
leaf), keeps half logits' dtype, and refuses a second backward after consuming."""
import pytest
import torch
import torch.nn.functional as F

import fairseq_ext.ops.cross_entropy as ce
from fairseq_ext.ops.cross_entropy import chunked, cross_entropy_sum, cross_entropy_sum_chunked, cross_entropy_sum_naive


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(chunked, "CPU_BLOCK_ELEMENTS", 40)  # blocks of 40 // V rows (at least one): many blocks


def make(n: int, v: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, v, dtype=torch.float64, generator=gen)).to(dtype)
    target = torch.randint(0, v, (n,), generator=gen)
    return logits, target


@pytest.mark.parametrize("n,v", [(1, 1), (7, 13), (23, 5), (4, 97)])
@pytest.mark.parametrize("ignore", [None, 2])
@pytest.mark.parametrize("consume", [False, True])
def test_chunked_equals_reference_values_and_grads(small_blocks, n, v, ignore, consume):
    logits, target = make(n, v)
    if ignore is not None and n > 2:
        target[::3] = ignore
    source = logits.clone().requires_grad_()
    produced = source * 1.0  # non-leaf: what a model's output layer hands over
    fast = cross_entropy_sum_chunked(produced, target, ignore, consume_logits=consume)
    ref_in = logits.clone().requires_grad_()
    ref = cross_entropy_sum_naive(ref_in, target, ignore)
    torch.testing.assert_close(fast, ref, rtol=1e-13, atol=1e-13)
    kw = {} if ignore is None else {"ignore_index": ignore}
    torch.testing.assert_close(ref, F.cross_entropy(logits, target, reduction="sum", **kw), rtol=1e-13, atol=1e-13)
    g = torch.tensor(0.7, dtype=torch.float64)
    fast.backward(g)
    ref.backward(g)
    torch.testing.assert_close(source.grad, ref_in.grad, rtol=1e-12, atol=1e-14)
    ignored = target.eq(ignore) if ignore is not None else torch.zeros_like(target, dtype=torch.bool)
    assert source.grad[ignored].abs().sum().item() == 0


def test_consumed_logits_hold_their_gradient_and_a_leaf_is_never_overwritten():
    logits, target = make(6, 11)
    source = logits.clone().requires_grad_()
    produced = source * 1.0
    kept = produced.detach().clone()
    cross_entropy_sum(produced, target, impl="chunked", consume_logits=True).backward()
    torch.testing.assert_close(produced.detach(), source.grad, rtol=0, atol=0)  # the same storage
    assert not torch.equal(produced.detach(), kept)
    leaf = logits.clone().requires_grad_()
    cross_entropy_sum(leaf, target, impl="chunked", consume_logits=True).backward()
    assert torch.equal(leaf.detach(), logits)  # a leaf is the caller's: a fresh gradient tensor instead
    not_consumed = source.detach().clone().requires_grad_() * 1.0
    before = not_consumed.detach().clone()
    cross_entropy_sum(not_consumed, target, impl="chunked").backward()
    assert torch.equal(not_consumed.detach(), before)


def test_second_backward_after_consuming_is_an_error():
    logits, target = make(3, 4)
    produced = logits.clone().requires_grad_() * 1.0
    loss = cross_entropy_sum(produced, target, impl="chunked", consume_logits=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run backward twice"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_logits_are_scored_in_float32_and_get_their_dtype_back(small_blocks, dtype):
    logits, target = make(9, 17, dtype=dtype)
    for consume in (False, True):
        x = logits.clone().requires_grad_()
        produced = x * 1.0
        loss = cross_entropy_sum(produced, target, impl="chunked", consume_logits=consume)
        assert loss.dtype == torch.float32
        ref_x = logits.clone().requires_grad_()
        ref = F.cross_entropy(ref_x.float(), target, reduction="sum")
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
        loss.backward()
        ref.backward()
        assert x.grad.dtype == dtype
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0)  # computed in fp32, rounded once


def test_every_row_ignored_gives_zero_loss_and_gradient():
    logits, target = make(4, 6)
    x = logits.clone().requires_grad_()
    loss = cross_entropy_sum(x, torch.full_like(target, 1), ignore_index=1, impl="chunked")
    loss.backward()
    assert loss.item() == 0 and x.grad.abs().max().item() == 0


def test_bad_shapes_and_impl_are_errors():
    logits, target = make(4, 6)
    with pytest.raises(ValueError, match=r"logits \(N, V\) and target \(N,\)"):
        cross_entropy_sum(logits[None], target)
    with pytest.raises(ValueError, match=r"logits \(N, V\) and target \(N,\)"):
        cross_entropy_sum(logits, target[:3])
    with pytest.raises(ValueError, match="unknown impl 'fused'"):
        cross_entropy_sum(logits, target, impl="fused")
    torch.testing.assert_close(cross_entropy_sum(logits, target, impl="naive"),
                               cross_entropy_sum(logits, target, impl="chunked"), rtol=1e-13, atol=1e-13)


def test_auto_is_chunked_from_the_size_threshold_on(monkeypatch):
    """auto: F.cross_entropy (naive) below CHUNKED_MIN_ELEMENTS logits, chunked from it on (consumed logits then hold
    their gradient)."""
    logits, target = make(5, 8)
    for threshold, chunked_expected in ((41, False), (40, True)):
        monkeypatch.setattr(ce, "CHUNKED_MIN_ELEMENTS", threshold)
        source = logits.clone().requires_grad_()
        produced = source * 1.0
        cross_entropy_sum(produced, target, consume_logits=True).backward()
        assert torch.equal(produced.detach(), source.grad) == chunked_expected
