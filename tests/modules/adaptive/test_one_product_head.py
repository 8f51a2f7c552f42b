"""The tied adaptive softmax head as one product: the same head/tail logits, targets and parameter gradients as
fairseq's ``AdaptiveSoftmax`` (float64, odd sizes, dropout included by seeding), the same state dict and
``get_log_prob``; a head it cannot take in one product (untied, quant-noise hooks) is fairseq's own."""
import pytest
import torch
from fairseq.modules import AdaptiveInput, AdaptiveSoftmax

from fairseq_ext.modules.adaptive.one_product_head import OneProductHeadAdaptiveSoftmax

V, C, CUTOFF = 41, 12, [9, 20]


def pair(tied: bool, dropout: float = 0.0):
    torch.manual_seed(0)
    inputs = AdaptiveInput(V, 1, C, 2.0, C, CUTOFF, q_noise=0, qn_block_size=8).double() if tied else None
    args = (V, C, CUTOFF, dropout)
    ours = OneProductHeadAdaptiveSoftmax(*args, adaptive_inputs=inputs, factor=2.0, tie_proj=tied).double()
    theirs = AdaptiveSoftmax(*args, adaptive_inputs=inputs, factor=2.0, tie_proj=tied).double()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs, inputs


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_same_logits_targets_and_grads_as_fairseq(tied, dropout):
    ours, theirs, _ = pair(tied, dropout)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, C, dtype=torch.float64, generator=gen)
    target = torch.randint(1, V, (3, 7), generator=gen)
    results = []
    for module in (ours, theirs):
        module.train()
        torch.manual_seed(5)  # the same dropout mask on both sides
        xin = x.clone().requires_grad_()
        logits, targets = module(xin, target)
        loss = sum((out * torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(i))).sum()
                   for i, out in enumerate(logits) if out is not None)
        module.zero_grad()
        loss.backward()
        results.append((logits, targets, xin.grad, {n: p.grad.clone() for n, p in module.named_parameters()
                                                   if p.grad is not None}))
    (lo, to, go, po), (lt, tt, gt, pt) = results
    assert len(lo) == len(lt) == 3 and all(o is not None for o in lo)
    for a, b in zip(lo, lt):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(to, tt):
        assert torch.equal(a, b)
    torch.testing.assert_close(go, gt, rtol=1e-12, atol=1e-12)
    assert po.keys() == pt.keys() and po
    for name in po:
        torch.testing.assert_close(po[name], pt[name], rtol=1e-12, atol=1e-12)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.eval(), theirs.eval()
    assert torch.equal(ours.get_log_prob(x, None), theirs.get_log_prob(x, None))


def test_one_product_only_for_a_plain_tied_head():
    ours, _, _ = pair(tied=True)
    x = torch.randn(5, C, dtype=torch.float64)
    calls = []
    ours.head.register_forward_hook(lambda *_: calls.append("head"))
    ours.head_logits(x)
    assert calls == []  # one product, the module is not called
    ours.head.class_proj.register_forward_pre_hook(lambda *_: None)  # quant-noise style hook: call the module
    ours.head_logits(x)
    assert calls == ["head"]
    untied, _, _ = pair(tied=False)
    untied.head.register_forward_hook(lambda *_: calls.append("untied"))
    untied.head_logits(x)
    assert calls == ["head", "untied"]
