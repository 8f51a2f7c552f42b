"""ops/sdpa.py: CPU training with attention dropout runs the written-out formula with a packed-bits mask; its output
and gradients equal the formula with the same draws (float64, odd sizes, every mask kind, rows with no visible key);
everywhere else it is scaled_dot_product_attention itself."""
import math

import pytest
import torch
import torch.nn.functional as F

from fairseq_ext.ops.dropout import dropout_from_bits, random_bits16
from fairseq_ext.ops.sdpa import sdpa
from tests.harness import assert_close

B, H, T, S, D, DV = 2, 3, 5, 7, 4, 6


def inputs(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, n, D, generator=gen, dtype=dtype, requires_grad=True) for n in (T, S))
    v = torch.randn(B, H, S, DV, generator=gen, dtype=dtype, requires_grad=True)
    return q, k, v


def masks():
    gen = torch.Generator().manual_seed(1)
    visible = torch.rand(B, 1, T, S, generator=gen) > 0.3
    visible[0, 0, 2] = False  # a query with no visible key
    bias = torch.randn(1, H, T, S, generator=gen, dtype=torch.float64)
    causal_bias = bias.masked_fill(torch.ones(T, S, dtype=torch.bool).tril(S - T).logical_not(), float("-inf"))
    return {"none": (None, False), "bool": (visible, False), "float": (causal_bias, False), "causal": (None, True)}


def reference(q, k, v, mask, causal, p, bits, scale=None):
    """The formula with the given draws: dropout(softmax(q k^T scale + M)) v, zeros for rows with no visible key."""
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale  # (B, H, T, S)
    visible = torch.ones_like(scores, dtype=torch.bool)
    if causal:
        visible = visible & torch.ones(T, S, dtype=torch.bool).tril()
    if mask is not None and mask.dtype == torch.bool:
        visible = visible & mask
    elif mask is not None:
        scores = scores + mask
        visible = visible & ~torch.isneginf(mask)
    empty = ~visible.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")).masked_fill(empty, 0.0), -1)
    probs = probs.masked_fill(empty, 0.0)
    return dropout_from_bits(probs, bits, p) @ v


@pytest.mark.parametrize("kind", ["none", "bool", "float", "causal"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_cpu_training_dropout_equals_the_formula_with_the_same_draws(kind, scale):
    mask, causal = masks()[kind]
    p = 0.37
    q, k, v = inputs()
    torch.manual_seed(5)
    out = sdpa(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, scale=scale)
    torch.manual_seed(5)
    bits = random_bits16(B * H * T * S, torch.device("cpu"))  # the one draw the op makes
    q2, k2, v2 = inputs()
    want = reference(q2, k2, v2, mask, causal, p, bits, scale)
    assert_close(out, want, atol=1e-12, msg=f"output ({kind})")
    grad = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, (q, k, v), grad)
    want_grads = torch.autograd.grad(want, (q2, k2, v2), grad)
    for name, a, b in zip("qkv", got_grads, want_grads):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, atol=1e-12, msg=f"d{name} ({kind})")
    if kind == "bool":
        assert torch.equal(out[0, :, 2], torch.zeros(H, DV, dtype=out.dtype))  # no visible key: zeros


def test_a_float_mask_with_a_gradient_receives_it():
    q, k, v = inputs()
    bias = torch.randn(1, H, T, S, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(2)
    out = sdpa(q, k, v, attn_mask=bias, dropout_p=0.25)
    torch.manual_seed(2)
    bits = random_bits16(B * H * T * S, torch.device("cpu"))
    bias2 = bias.detach().clone().requires_grad_(True)
    want = reference(*(t.detach() for t in (q, k, v)), bias2, False, 0.25, bits)
    grad = torch.randn_like(out)
    assert_close(torch.autograd.grad(out, bias, grad)[0], torch.autograd.grad(want, bias2, grad)[0], atol=1e-12)


def test_dropout_keeps_the_expected_output():
    q, k, v = (t.detach() for t in inputs(dtype=torch.float32))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mean = torch.stack([sdpa(q, k, v, dropout_p=0.5, is_causal=True) for _ in range(3000)]).mean(0)
    assert (mean - exact).abs().max() < 0.1 * exact.abs().max()


def test_without_packed_dropout_it_is_scaled_dot_product_attention():
    q, k, v = (t.detach() for t in inputs(dtype=torch.float32))
    mask = masks()["float"][0].float()
    assert torch.equal(sdpa(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.manual_seed(3)
    ours = sdpa(q, k, v, dropout_p=0.0, is_causal=True)
    assert torch.equal(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        sdpa(q, k, v, attn_mask=mask, dropout_p=0.1, is_causal=True)


def test_bf16_softmax_runs_in_fp32():
    q, k, v = (t.detach().to(torch.bfloat16) for t in inputs(dtype=torch.float32))
    torch.manual_seed(4)
    out = sdpa(q, k, v, dropout_p=0.2, is_causal=True)
    torch.manual_seed(4)
    bits = random_bits16(B * H * T * S, torch.device("cpu"))
    want = reference(*(t.double() for t in (q, k, v)), None, True, 0.2, bits)
    assert out.dtype == torch.bfloat16
    assert_close(out.double(), want, atol=3e-2)


def test_a_mask_with_more_batch_rows_than_the_queries_broadcasts_them():
    q, k, v = (t[:1].detach().requires_grad_(True) for t in inputs())  # (1, H, ·, ·)
    mask = masks()["bool"][0]  # (B, 1, T, S)
    torch.manual_seed(6)
    out = sdpa(q, k, v, attn_mask=mask, dropout_p=0.3)
    torch.manual_seed(6)
    bits = random_bits16(B * H * T * S, torch.device("cpu"))
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    want = reference(q2, k2, v2, mask, False, 0.3, bits)
    assert out.shape == (B, H, T, DV)
    assert_close(out, want, atol=1e-12)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(want, (q2, k2, v2), grad)):
        assert_close(a, b, atol=1e-12)
