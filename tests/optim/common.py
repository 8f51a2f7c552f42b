"""Checks every per-tensor optimizer (fairseq_ext.optim.per_tensor) must pass: weights-only state-dict round trip
that resumes bit for bit, no host reads of tensors in the foreach step, sparse gradients rejected."""
import io
from typing import Callable, List

import pytest
import torch


def roundtrip(state_dict: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as a fairseq checkpoint is."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_resume_is_exact(original: List[torch.nn.Parameter], resumed: List[torch.nn.Parameter],
                           opt: torch.optim.Optimizer, opt_resumed: torch.optim.Optimizer, steps: int = 2) -> None:
    """``resumed`` (a copy of ``original``'s values) with ``opt_resumed`` (loaded from ``opt``'s state) follows
    ``original`` exactly for ``steps`` further steps on the same random gradients."""
    generator = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p, q in zip(original, resumed):
            if p.grad is not None:
                p.grad = torch.randn(p.shape, generator=generator)
                q.grad = p.grad.clone()
        opt.step()
        opt_resumed.step()
    for p, q in zip(original, resumed):
        assert torch.equal(p, q)


def assert_foreach_step_reads_nothing_on_host(monkeypatch, params: List[torch.nn.Parameter],
                                              opt: torch.optim.Optimizer) -> None:
    """No .item() / bool / float of a tensor inside the step (each would be a device sync on GPU)."""
    def host_read(*args):
        raise AssertionError(f"host read of a tensor inside {type(opt).__name__}.step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    with pytest.raises(AssertionError, match="host read"):
        bool(torch.ones(()))  # the patch is live
    for p in params:
        if p.grad is not None:
            p.grad.normal_()
    opt.step()


def assert_full_precision_step_copies_no_parameter(params: List[torch.nn.Parameter],
                                                  opt: torch.optim.Optimizer) -> None:
    """In fp32 / fp64 the step updates the parameters in place: no ``copy_`` onto a parameter. (The step used to write
    each parameter's working view back onto itself; ATen returns early from such a copy, so that cost one dispatch
    per tensor, not a pass over the data.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    storages = {p.untyped_storage().data_ptr() for p in params}
    copies: List[str] = []

    class CopyWatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.copy_ and args[0].untyped_storage().data_ptr() in storages:
                copies.append(str(tuple(args[0].shape)))
            return func(*args, **(kwargs or {}))

    for p in params:
        if p.grad is not None:
            p.grad.normal_()
    before = [p.detach().clone() for p in params]
    with CopyWatch():
        opt.step()
    assert not copies, f"{type(opt).__name__}.step copied onto parameters of shapes {copies}"
    assert any(not torch.equal(b, p) for b, p in zip(before, params)), "the step changed no parameter"


def assert_sparse_gradients_rejected(build: Callable[..., torch.optim.Optimizer], impls: List[str]) -> None:
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    for impl in impls:
        with pytest.raises(RuntimeError, match="sparse gradients"):
            build(embedding.parameters(), impl=impl).step()
