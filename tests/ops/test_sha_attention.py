"""``ops/sha_attention``: the split and sdpa kernels equal the written-out formula (float64, odd sizes, outputs and
every input's gradient, with and without a memory, with the same dropout draws), and split forms no key or value
gradient products for a memory that carries no gradient."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fairseq_ext.ops.sha_attention import IMPLS, select_impl, sha_attention
from tests.harness import assert_close

B, T, M, D = 3, 5, 7, 6


def inputs(memory_len: int, memory_grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, D, dtype=torch.float64, generator=g).requires_grad_()
    k_gate = torch.rand(D, dtype=torch.float64, generator=g).requires_grad_()
    v_gate = (torch.rand(D, dtype=torch.float64, generator=g) - 0.5).requires_grad_()
    memory = None if memory_len == 0 else \
        torch.randn(B, memory_len, D, dtype=torch.float64, generator=g).requires_grad_(memory_grad)
    segment = torch.randn(B, T, D, dtype=torch.float64, generator=g).requires_grad_()
    return q, k_gate, v_gate, memory, segment


def run(impl: str, args, dropout_p: float, seed: int = 11):
    torch.manual_seed(seed)  # the same dropout draws for every kernel
    return sha_attention(*args, scale=1 / math.sqrt(D), dropout_p=dropout_p, impl=impl)


@pytest.mark.parametrize("impl", ["split", "sdpa"])
@pytest.mark.parametrize("memory_len, memory_grad", [(0, False), (M, False), (M, True), (1, True)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_kernel_equals_naive_outputs_and_gradients(impl, memory_len, memory_grad, dropout_p):
    args = inputs(memory_len, memory_grad)
    expected = run("naive", args, dropout_p)
    actual = run(impl, args, dropout_p)
    assert_close(actual, expected, atol=1e-12, rtol=1e-10, msg=f"{impl} output")
    wrt = [a for a in args if a is not None and a.requires_grad]
    grad = torch.randn_like(expected)
    for i, (a, e) in enumerate(zip(torch.autograd.grad(actual, wrt, grad), torch.autograd.grad(expected, wrt, grad))):
        assert_close(a, e, atol=1e-12, rtol=1e-10, msg=f"{impl} gradient {i}")


def test_dropout_applies_in_every_kernel():
    args = inputs(M, False)
    for impl in ("naive", "split", "sdpa"):
        assert (run(impl, args, 0.3) - run(impl, args, 0.0)).abs().max() > 1e-3, impl


@pytest.mark.parametrize("impl", ["naive", "split", "sdpa"])
def test_memory_fully_visible_segment_causal(impl):
    q, k_gate, v_gate, memory, segment = inputs(M, True)
    for i in range(T):
        out = sha_attention(q, k_gate, v_gate, memory, segment, scale=0.5, impl=impl)[:, i].sum()
        g_mem, g_seg = torch.autograd.grad(out, (memory, segment))
        assert torch.all(g_mem.abs().sum(dim=(0, 2)) > 0), (impl, i)
        seen = g_seg.abs().sum(dim=(0, 2))  # (T,)
        assert torch.all(seen[:i + 1] > 0) and torch.all(seen[i + 1:] == 0), (impl, i, seen)


def matmul_flops(impl: str, memory_grad: bool, t: int = 8, m: int = 24, d: int = 16) -> int:
    q = torch.randn(2, t, d, requires_grad=True)
    gates = torch.rand(d, requires_grad=True), torch.rand(d, requires_grad=True)
    memory = torch.randn(2, m, d, requires_grad=memory_grad)
    segment = torch.randn(2, t, d, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        sha_attention(q, *gates, memory, segment, scale=0.25, impl=impl).sum().backward()
    return counter.get_total_flops()


def test_split_forms_no_key_or_value_gradient_products_for_a_detached_memory():
    """Products of 2·B·T·d flops per key: naive 2 forward + 4 backward over S = M + T keys; split with a detached
    memory 2 + 2 over S and 2 over the T segment keys; with a memory that carries a gradient, naive's 6 over S."""
    per_key, s, t = 2 * 2 * 8 * 16, 24 + 8, 8
    assert matmul_flops("naive", memory_grad=False) == 6 * s * per_key
    assert matmul_flops("split", memory_grad=False) == (4 * s + 2 * t) * per_key
    assert matmul_flops("split", memory_grad=True) == 6 * s * per_key


def test_auto_on_cpu_is_split_with_a_gradient_and_naive_without(monkeypatch):
    """Evaluation keeps the written-out formula (bit for bit the frozen log-probabilities); training runs split."""
    import fairseq_ext.ops.sha_attention as ops
    called = []
    for name in ("naive", "split"):
        kernel = ops._KERNELS[name]
        monkeypatch.setitem(ops._KERNELS, name, lambda *a, _k=kernel, _n=name: called.append(_n) or _k(*a))
    q, k_gate, v_gate, memory, segment = inputs(M, False)
    sha_attention(q, k_gate, v_gate, memory, segment)
    with torch.no_grad():
        sha_attention(q, k_gate, v_gate, memory, segment)
    sha_attention(q.detach(), k_gate, v_gate, memory, segment.detach())  # only the gates: nothing to split for
    assert called == ["split", "naive", "naive"]


def test_impl_names():
    assert IMPLS == ("auto", "naive", "sdpa", "split")
    assert [select_impl("auto", torch.device("cpu"), grad) for grad in (False, True)] == ["naive", "split"]
    assert [select_impl("auto", torch.device("cuda"), grad) for grad in (False, True)] == ["sdpa", "sdpa"]
    with pytest.raises(ValueError, match="unknown attn_impl 'flash'"):
        select_impl("flash", torch.device("cpu"))
    q, k_gate, v_gate, memory, segment = inputs(M, False)
    with pytest.raises(ValueError, match=r"memory \(B, M, d\)"):
        sha_attention(q, k_gate, v_gate, memory[..., :4], segment, scale=1.0)


def test_split_is_float32_or_float64_only():
    q, k_gate, v_gate, memory, segment = (None if x is None else x.detach().to(torch.bfloat16).requires_grad_()
                                          for x in inputs(M, False))
    with pytest.raises(ValueError, match="impl 'split': its packed dropout masks are float32 / float64.*naive"):
        sha_attention(q, k_gate, v_gate, memory, segment, impl="split")
    assert select_impl("auto", torch.device("cpu"), grad=False) == "naive"  # what auto runs for bfloat16
    out = sha_attention(q, k_gate, v_gate, memory, segment, dropout_p=0.1)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_autocast_runs_naive_and_refuses_an_explicit_split():
    """Under autocast split's products would run in bf16 inside the function, its softmax too: auto runs naive
    (softmax in fp32), an explicit split says why."""
    q, k_gate, v_gate, memory, segment = (None if x is None else x.detach().float().requires_grad_()
                                          for x in inputs(M, False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sha_attention(q, k_gate, v_gate, memory, segment, dropout_p=0.1)
        with pytest.raises(ValueError, match="impl 'split': under autocast"):
            sha_attention(q, k_gate, v_gate, memory, segment, impl="split")
    out.float().sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(segment.grad).all()


@pytest.mark.parametrize("impl", ["split", "sdpa"])
def test_dropout_one_drops_everything_as_naive(impl):
    """p = 1: every value and probability dropped (zeros, no division by the zero keep rate), as ``dropout``."""
    args = inputs(M, True)
    expected = run("naive", args, 1.0)
    actual = run(impl, args, 1.0)
    assert torch.equal(expected, torch.zeros_like(expected)) and torch.equal(actual, expected)
    wrt = [a for a in args if a is not None and a.requires_grad]
    for a, e in zip(torch.autograd.grad(actual.sum(), wrt), torch.autograd.grad(expected.sum(), wrt)):
        assert_close(a, e, atol=1e-12, rtol=0)
