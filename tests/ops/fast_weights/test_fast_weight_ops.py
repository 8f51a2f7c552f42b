"""ops/fast_weights: chunked == recurrent (outputs, final states, gradients of q, k, v, beta and the initial
state; float64, odd sizes, T not a multiple of C, T < C), the spec's hand-computed steps (fast_weights.md §10
checks 4, 5, 9), carry-over == one pass for every rule and normalisation, bounded delta state with normalised keys,
refusal of unnormalised keys, fp32 accumulation under half precision."""
import math

import pytest
import torch

from fairseq_ext.ops.fast_weights import (delta_rule_chunked, delta_rule_recurrent, fast_weight_attention,
                                          sum_rule_chunked, sum_rule_recurrent)
from fairseq_ext.state import FastWeightState
from tests.harness import assert_close, single_thread

one_thread = pytest.fixture(autouse=True)(single_thread)
MODES = [("sum", "none"), ("sum", "output"), ("delta", "none"), ("delta", "output"), ("delta", "full")]


def inputs(b=2, h=3, t=37, dk=5, dv=4, seed=0, dtype=torch.float64, positive_q=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, dk, generator=g, dtype=dtype)
    if positive_q:
        q = q.abs() + 0.1
    k = torch.rand(b, h, t, dk, generator=g, dtype=dtype) + 0.05
    k = k / k.sum(-1, keepdim=True)  # sum-normalised feature-mapped keys, as the model feeds the delta rule
    v = torch.randn(b, h, t, dv, generator=g, dtype=dtype)
    beta = torch.rand(b, h, t, generator=g, dtype=dtype)
    s0 = torch.randn(b, h, dk, dv, generator=g, dtype=dtype)
    return q, k, v, beta, s0


@pytest.mark.parametrize("t,chunk", [(37, 16), (37, 64), (5, 16), (64, 32), (1, 4), (33, 1)])
@pytest.mark.parametrize("rule", ["sum", "delta"])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent_with_gradients(t, chunk, rule, with_state):
    q, k, v, beta, s0 = inputs(t=t)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, s0)]

    def run(kind):
        q_, k_, v_, b_, s_ = leaves
        state = s_ if with_state else None
        if rule == "sum":
            fn = sum_rule_recurrent if kind == "recurrent" else sum_rule_chunked
            args = (q_, k_, v_, state, 0.7) + (() if kind == "recurrent" else (chunk,))
        else:
            fn = delta_rule_recurrent if kind == "recurrent" else delta_rule_chunked
            args = (q_, k_, v_, b_, state, 0.7) + (() if kind == "recurrent" else (chunk,))
        out, final = fn(*args)
        grads = torch.autograd.grad((out * torch.cos(out)).sum() + (final ** 2).sum(), leaves, allow_unused=True)
        return out, final, grads

    out_r, final_r, grads_r = run("recurrent")
    out_c, final_c, grads_c = run("chunked")
    assert_close(out_c, out_r, atol=1e-12, rtol=0)
    assert_close(final_c, final_r, atol=1e-12, rtol=0)
    unused = {"beta"} if rule == "sum" else set()  # the sum rule has no write strength
    if not with_state:
        unused.add("s0")
    for name, gr, gc in zip("q k v beta s0".split(), grads_r, grads_c):
        if name in unused:
            assert gr is None and gc is None, name
            continue
        assert gr is not None and gc is not None, name
        assert_close(gc, gr, atol=1e-11, rtol=0)


def test_delta_rule_by_hand_spec_check_4():
    """W_1 = [[0.5, 0], [1, 0]] (value rows); same key, v = [3, 4], beta = 1 overwrites: W_2 = [[3, 0], [4, 0]]."""
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)[None, None]  # (1, 1, 2, D_k)
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)[None, None]
    beta = torch.tensor([[0.5, 1.0]], dtype=torch.float64)[None]
    q = torch.tensor([[0.25, 0.75], [0.6, 0.4]], dtype=torch.float64)[None, None]
    for fn in (delta_rule_recurrent, delta_rule_chunked):
        out, state = fn(q, k, v, beta, None, 1 / math.sqrt(2))
        assert_close(state[0, 0].T, torch.tensor([[3.0, 0.0], [4.0, 0.0]], dtype=torch.float64))
        w1 = torch.tensor([[0.5, 0.0], [1.0, 0.0]], dtype=torch.float64)
        assert_close(out[0, 0, 0], w1 @ q[0, 0, 0] / math.sqrt(2))
        assert_close(out[0, 0, 1], state[0, 0].T @ q[0, 0, 1] / math.sqrt(2))


def test_sum_rule_equals_quadratic_form_spec_check_5():
    """Normalised sum rule == the masked, row-normalised kernel matrix (lmtool codes 4/5/6) in fp64."""
    q, k, v, _, _ = inputs(t=23, positive_q=True)
    out, _ = fast_weight_attention(q, k, v, rule="sum", normalize="output", scale=0.25)
    scores = torch.matmul(q, k.transpose(-1, -2)).tril()  # (B, H, T, T)
    expected = 0.25 * torch.matmul(scores, v) / (scores.sum(-1, keepdim=True) + 1e-5)
    assert_close(out, expected, atol=1e-12, rtol=0)


def test_sum_rule_initial_state_query_gradient_spec_check_9():
    """gradcheck with a nonzero initial state: dq includes S_0 dy (lmtool's sum kernel drops this term)."""
    q, k, v, _, s0 = inputs(b=1, h=2, t=6, dk=3, dv=2)
    for fn in (sum_rule_recurrent, sum_rule_chunked):
        assert torch.autograd.gradcheck(lambda q_, s_: fn(q_, k, v, s_, 0.5)[0],
                                        (q.clone().requires_grad_(), s0.clone().requires_grad_()))
    q_ = q.clone().requires_grad_()
    out, _ = sum_rule_chunked(q_, k, v, s0, 0.5, 4)
    (dq,) = torch.autograd.grad(out.sum(), q_)
    out0, _ = sum_rule_chunked(q_, k, v, None, 0.5, 4)
    (dq0,) = torch.autograd.grad(out0.sum(), q_)
    assert_close(dq - dq0, 0.5 * s0.sum(-1)[:, :, None, :].expand_as(dq))  # the S_0 dy term


@pytest.mark.parametrize("rule,normalize", MODES)
@pytest.mark.parametrize("impl", ["recurrent", "chunked"])
def test_carry_over_equals_one_pass(rule, normalize, impl):
    q, k, v, beta, _ = inputs(t=41, positive_q=True)
    kw = dict(rule=rule, normalize=normalize, scale=0.5, impl=impl, chunk_size=8)
    whole, final = fast_weight_attention(q, k, v, beta, **kw)
    state, outs = None, []
    for lo, hi in ((0, 13), (13, 14), (14, 41)):
        out, state = fast_weight_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], beta[:, :, lo:hi], state,
                                           **kw)
        outs.append(out)
    assert_close(torch.cat(outs, 2), whole, atol=1e-12, rtol=0)
    assert_close(state.weight, final.weight, atol=1e-12, rtol=0)
    assert (state.key_sum is None) == (normalize == "none")
    if state.key_sum is not None:
        assert_close(state.key_sum, k.sum(2))
    # a smaller final batch: the state sliced to the remaining streams continues them
    part, _ = fast_weight_attention(q[:1, :, 13:], k[:1, :, 13:], v[:1, :, 13:], beta[:1, :, 13:],
                                    FastWeightState(*[None if x is None else x[:1] for x in _state_at(13, q, k, v,
                                                                                                      beta, kw)]),
                                    **kw)
    assert_close(part, whole[:1, :, 13:], atol=1e-12, rtol=0)


def _state_at(t, q, k, v, beta, kw):
    _, state = fast_weight_attention(q[:, :, :t], k[:, :, :t], v[:, :, :t], beta[:, :, :t], **kw)
    return state.weight, state.key_sum


def test_normalisation_modes_follow_the_formulas_spec_check_10():
    q, k, v, beta, _ = inputs(b=1, h=1, t=9, dk=4, dv=3, positive_q=True)
    outs = {norm: fast_weight_attention(q, k, v, beta, rule="delta", normalize=norm, scale=0.5)[0]
            for norm in ("none", "output", "full")}
    assert not torch.allclose(outs["none"], outs["output"]) and not torch.allclose(outs["output"], outs["full"])
    z = torch.cumsum(k, 2)  # (1, 1, T, D_k)
    den = (z * q).sum(-1, keepdim=True) + 1e-5
    assert_close(outs["output"], outs["none"] / den, atol=1e-12, rtol=0)
    # full (lmtool 44): the delta kernel fed k' = k / (kd + eps) and beta' = beta kd, kd_t = z_{t-1} . k_t (1 at
    # t = 1): W_t = W_{t-1} + beta' (v - W_{t-1} k') k'^T (~ beta (v - W k / kd) k^T), output / den
    w = torch.zeros(3, 4, dtype=torch.float64)  # value rows, as lmtool
    expected = []
    for t in range(9):
        kt, vt, qt = k[0, 0, t], v[0, 0, t], q[0, 0, t]
        kd = 1.0 if t == 0 else float(z[0, 0, t - 1] @ kt)
        key = kt / (kd + 1e-5)
        w = w + beta[0, 0, t] * kd * torch.outer(vt - w @ key, key)
        expected.append(0.5 * (w @ qt) / den[0, 0, t])
    assert_close(outs["full"][0, 0], torch.stack(expected), atol=1e-12, rtol=0)


def test_delta_state_bounded_with_normalised_keys_and_refused_without_spec_check_6():
    g = torch.Generator().manual_seed(3)
    raw = torch.nn.functional.elu(torch.randn(1, 1, 512, 16, generator=g, dtype=torch.float64)) + 1  # ELU+1 keys
    v = torch.randn(1, 1, 512, 16, generator=g, dtype=torch.float64)
    beta = torch.rand(1, 1, 512, generator=g, dtype=torch.float64)
    q = raw / raw.sum(-1, keepdim=True)
    _, state = delta_rule_chunked(q, raw / raw.sum(-1, keepdim=True), v, beta, None, 0.25)
    assert state.abs().max() < 3  # O(1) with sum-normalised keys (spec: ~1.7)
    eye = torch.eye(16, dtype=torch.float64)
    keys = raw[0, 0] / raw[0, 0].sum(-1, keepdim=True)  # (T, D)
    transitions = eye - beta[0, 0, :, None, None] * keys[:, :, None] * keys[:, None, :]  # (T, D, D) I - beta k k^T
    assert torch.linalg.matrix_norm(transitions, ord=2).max() <= 1 + 1e-12  # non-expansive
    _, exploded = delta_rule_recurrent(q, raw, v, beta, None, 0.25)
    assert not torch.isfinite(exploded).all() or exploded.abs().max() > 1e6  # raw ELU+1 keys diverge
    with pytest.raises(ValueError, match="unnormalised keys"):
        delta_rule_chunked(q, raw, v, beta, None, 0.25)


@pytest.mark.parametrize("dtype,out_tol,state_tol", [
    (torch.bfloat16, 1.8e-3 * 8, 1e-2),  # bf16 inputs alone are rounded to ~3 digits (measured 1.2e-2, 4.6e-3)
    (torch.float16, 1.8e-3, 1e-3),  # §10.16: below the fp16-rounded-state drift (measured 1.4e-3, 5.8e-4)
])
def test_state_accumulates_in_fp32_under_half_inputs(dtype, out_tol, state_tol):
    q, k, v, beta, _ = inputs(b=1, h=2, t=512, dk=16, dv=16, dtype=torch.float32, positive_q=True)
    ref, ref_state = fast_weight_attention(q, k, v, beta, rule="delta", normalize="none", scale=0.25)
    out, state = fast_weight_attention(q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype), rule="delta",
                                       normalize="none", scale=0.25)
    assert out.dtype == dtype and state.weight.dtype == torch.float32
    assert (out.float() - ref).abs().max() < out_tol and (state.weight - ref_state.weight).abs().max() < state_tol


def test_errors_name_the_fix():
    q, k, v, beta, _ = inputs(t=4)
    with pytest.raises(ValueError, match="sum rule has none"):
        fast_weight_attention(q, k, v, rule="sum", normalize="full", scale=1.0)
    with pytest.raises(ValueError, match="needs beta"):
        fast_weight_attention(q, k, v, rule="delta", normalize="none", scale=1.0)
    with pytest.raises(ValueError, match="running key sum"):
        state = FastWeightState(torch.zeros(2, 3, 5, 4, dtype=torch.float64))
        fast_weight_attention(q, k, v, beta, state, rule="delta", normalize="output", scale=1.0)
    with pytest.raises(ValueError, match=r"key sum must be \(B, H, D_k\) = \(2, 3, 5\), got \(1, 3, 5\)"):
        state = FastWeightState(torch.zeros(2, 3, 5, 4, dtype=torch.float64), torch.zeros(1, 3, 5, dtype=torch.float64))
        fast_weight_attention(q, k, v, beta, state, rule="delta", normalize="output", scale=1.0)
    with pytest.raises(ValueError, match="unknown attn_impl"):
        fast_weight_attention(q, k, v, beta, rule="delta", normalize="none", scale=1.0, impl="cuda")


def test_keys_normalized_skips_only_the_check():
    g = torch.Generator().manual_seed(5)
    raw = torch.rand(1, 1, 9, 4, generator=g, dtype=torch.float64) * 3  # beta ||k||^2 > 2: refused by default
    v, beta, q = (torch.rand(1, 1, 9, 4, generator=g, dtype=torch.float64), torch.full((1, 1, 9), 0.9,
                                                                                  dtype=torch.float64), raw)
    kw = dict(rule="delta", normalize="none", scale=0.5, impl="chunked", chunk_size=4)
    with pytest.raises(ValueError, match="unnormalised keys"):
        fast_weight_attention(q, raw, v, beta, **kw)
    out, _ = fast_weight_attention(q, raw, v, beta, keys_normalized=True, **kw)  # trusted: no check, same maths
    ref, _ = fast_weight_attention(q, raw, v, beta, **{**kw, "impl": "recurrent"})
    assert_close(out, ref, atol=1e-9, rtol=1e-9)
