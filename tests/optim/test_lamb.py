"""LAMB (``lamb_torch``): steps against hand computation (NVIDIA and min-trust variants), foreach == loop, fp16 and
fairseq paths, state-dict round trips, apex errors.

``hand_step`` recomputes one LAMB step in plain Python floats from the formulas, independently of the
implementation; the expected numbers of /work/shared/specs/sha_rnn.md §8 item 8 are checked as well.
"""
import math
from typing import Dict, List, Tuple

import pytest
import torch
from omegaconf import open_dict

import fairseq_ext  # noqa: F401  (registers lamb_torch)
from fairseq_ext.optim.lamb import FairseqLamb, Lamb, LambConfig, optimizer_kwargs
from tests.harness import assert_close, training_cfg
from tests.optim.common import (assert_foreach_step_reads_nothing_on_host,
                                 assert_full_precision_step_copies_no_parameter, assert_resume_is_exact,
                                 assert_sparse_gradients_rejected, roundtrip)

NVIDIA: Dict = {}  # the defaults: eps 1e-6, wd 0, clamp 10, trust = ‖w‖ / (‖u‖ + eps)
SMERITY = dict(min_trust=0.25, trust_denominator="update_norm")  # sha-rnn adds weight_decay=1.2e-6


def hand_step(w: List[float], g: List[float], m: List[float], v: List[float], *, lr: float, beta1: float = 0.9,
              beta2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0, min_trust: float = 0.0,
              max_weight_norm: float = 10.0, trust_denominator: str = "update_norm_plus_eps",
              adam_mode: bool = False) -> Tuple[List[float], List[float], List[float], float]:
    """One LAMB step on one tensor in Python floats -> (new w, new m, new v, trust)."""
    m = [beta1 * mi + (1 - beta1) * gi for mi, gi in zip(m, g)]
    v = [beta2 * vi + (1 - beta2) * gi * gi for vi, gi in zip(v, g)]
    u = [mi / (math.sqrt(vi) + eps) + weight_decay * wi for mi, vi, wi in zip(m, v, w)]
    r_w = math.sqrt(sum(x * x for x in w))
    if max_weight_norm > 0:  # <= 0 disables the clamp
        r_w = min(r_w, max_weight_norm)
    r_u = math.sqrt(sum(x * x for x in u))
    if r_w == 0 or r_u == 0:
        trust = 1.0
    elif trust_denominator == "update_norm_plus_eps":
        trust = r_w / (r_u + eps)
    else:
        trust = r_w / r_u
    if min_trust > 0:
        trust = max(trust, min_trust)
    if adam_mode:
        trust = 1.0
    return [wi - lr * trust * ui for wi, ui in zip(w, u)], m, v, trust


def torch_step(w: List[float], g: List[float], *, lr: float, impl: str = "foreach", **kwargs) -> List[float]:
    p = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))
    p.grad = torch.tensor(g, dtype=torch.float64)
    Lamb([p], lr=lr, impl=impl, **kwargs).step()
    return p.detach().tolist()


def assert_floats(actual: List[float], expected: List[float], tol: float = 1e-13) -> None:
    assert actual == pytest.approx(expected, abs=tol, rel=0), (actual, expected)


# ======================================================================================================================
# single steps against hand computation
# ======================================================================================================================


@pytest.mark.parametrize("impl", ["foreach", "loop"])
@pytest.mark.parametrize("w, g, lr, weight_decay, printed", [
    ([0.0, 0.0], [0.5, -0.5], 1e-3, 0.0, [-0.003162078, 0.003162078]),  # ‖w‖ = 0: trust 1
    ([0.01, 0.01], [1.0, 1.0], 1e-3, 0.0, [0.009209455, 0.009209455]),  # raw trust 0.0031624 floored to 0.25
    ([30.0, 40.0], [1.0, 1.0], 1e-3, 0.0, [29.992929, 39.992929]),  # ‖w‖ = 50 clamped to 10
    ([3.0, 4.0], [1.0, 1.0], 1e-2, 1.2e-6, [2.9646447, 3.9646447]),  # weight decay in the direction
])
def test_min_trust_variant_matches_spec_examples(impl, w, g, lr, weight_decay, printed):
    expected, _, _, _ = hand_step(w, g, [0.0, 0.0], [0.0, 0.0], lr=lr, weight_decay=weight_decay, **SMERITY)
    actual = torch_step(w, g, lr=lr, impl=impl, weight_decay=weight_decay, **SMERITY)
    assert_floats(actual, expected)
    assert_floats(actual, printed, tol=5e-7)  # the spec prints 7-8 significant digits


@pytest.mark.parametrize("impl", ["foreach", "loop"])
def test_nvidia_variant_single_steps(impl):
    cases = [([0.0, 0.0, 0.0], [0.5, -0.5, 2.0], 1e-3, 0.0),  # zero weight: trust 1
             ([30.0, 40.0], [1.0, -2.0], 1e-3, 0.0),  # ‖w‖ = 50 clamped to 10
             ([0.3, -0.1, 0.2], [0.05, 0.2, -1.0], 1e-2, 0.0),  # plain ratio ‖w‖ / (‖u‖ + eps)
             ([3.0, 4.0], [1.0, 0.5], 1e-2, 0.01)]  # weight decay
    trusts = []
    for w, g, lr, wd in cases:
        expected, _, _, trust = hand_step(w, g, [0.0] * len(w), [0.0] * len(w), lr=lr, weight_decay=wd)
        assert_floats(torch_step(w, g, lr=lr, impl=impl, weight_decay=wd), expected)
        trusts.append(trust)
    assert trusts[0] == 1.0  # ‖w‖ = 0
    u = [0.1 * g / (math.sqrt(0.001) * abs(g) + 1e-6) for g in (1.0, -2.0)]  # first step from zero moments
    assert trusts[1] == pytest.approx(10 / (math.hypot(*u) + 1e-6), rel=1e-14)  # clamped ‖w‖ = 10


def test_trust_denominators_differ_by_eps():
    """NVIDIA divides by ‖u‖ + eps, cybertronai/Smerity by ‖u‖: about 2e-7 relative on the step."""
    w, g, lr = [0.3, -0.1, 0.2], [0.05, 0.2, -1.0], 1e-2
    plus_eps = torch_step(w, g, lr=lr)
    plain = torch_step(w, g, lr=lr, trust_denominator="update_norm")
    assert_floats(plain, hand_step(w, g, [0.0] * 3, [0.0] * 3, lr=lr, trust_denominator="update_norm")[0])
    assert max(abs(a - b) for a, b in zip(plus_eps, plain)) > 1e-11


@pytest.mark.parametrize("impl", ["foreach", "loop"])
def test_zero_norm_cases(impl):
    # zero gradient and no weight decay: u = 0, ‖u‖ = 0 -> trust 1, the weights do not move
    assert torch_step([1.0, 2.0], [0.0, 0.0], lr=1e-2, impl=impl) == [1.0, 2.0]
    # zero gradient with weight decay: u = λ·w, trust = ‖w‖ / (‖λ·w‖ + eps)
    expected, _, _, _ = hand_step([1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], lr=1e-2, weight_decay=0.1)
    assert_floats(torch_step([1.0, 2.0], [0.0, 0.0], lr=1e-2, impl=impl, weight_decay=0.1), expected)
    # min_trust floors only a computed ratio: a zero tensor keeps trust 1 (a full lr·u step), not 0.25
    expected, _, _, trust = hand_step([0.0, 0.0], [0.5, -0.5], [0.0, 0.0], [0.0, 0.0], lr=1e-3, **SMERITY)
    assert trust == 1.0
    assert_floats(torch_step([0.0, 0.0], [0.5, -0.5], lr=1e-3, impl=impl, **SMERITY), expected)
    # ... the floor is applied after the zero rule, so a floor above 1 lifts it too
    expected, _, _, trust = hand_step([0.0, 0.0], [0.5, -0.5], [0.0, 0.0], [0.0, 0.0], lr=1e-3, min_trust=2.0)
    assert trust == 2.0
    assert_floats(torch_step([0.0, 0.0], [0.5, -0.5], lr=1e-3, impl=impl, min_trust=2.0), expected)


@pytest.mark.parametrize("impl", ["foreach", "loop"])
def test_min_trust_activation_and_adam_mode(impl):
    w, g, lr = [0.01, 0.01], [1.0, 1.0], 1e-3
    floored, _, _, trust = hand_step(w, g, [0.0, 0.0], [0.0, 0.0], lr=lr, **SMERITY)
    raw, _, _, raw_trust = hand_step(w, g, [0.0, 0.0], [0.0, 0.0], lr=lr, trust_denominator="update_norm")
    assert trust == 0.25 and raw_trust == pytest.approx(0.0031624, abs=1e-7)
    assert_floats(torch_step(w, g, lr=lr, impl=impl, **SMERITY), floored)
    assert_floats(torch_step(w, g, lr=lr, impl=impl, trust_denominator="update_norm"), raw)
    assert_floats(raw, [0.00999, 0.00999], tol=1e-10)
    # adam_mode: trust 1 even where the clamp and the ratio would act
    expected, _, _, trust = hand_step([30.0, 40.0], g, [0.0, 0.0], [0.0, 0.0], lr=lr, adam_mode=True)
    assert trust == 1.0
    assert_floats(torch_step([30.0, 40.0], g, lr=lr, impl=impl, adam_mode=True), expected)


@pytest.mark.parametrize("impl", ["foreach", "loop"])
@pytest.mark.parametrize("variant", [NVIDIA, dict(SMERITY, weight_decay=1.2e-6), dict(max_weight_norm=0.0)])
def test_several_steps_accumulate_moments(impl, variant):
    """Three steps on two tensors (one above the clamp): m and v carry over, the trust ratio is per tensor."""
    ws = [[0.5, -0.2, 0.1], [6.0, -8.0, 3.0, 1.0]]
    grads = [[[0.3, -1.0, 0.2], [1.0, 2.0, -3.0, 0.5]], [[-0.5, 0.4, 0.0], [0.1, 0.1, 0.1, 0.1]],
             [[1.5, 1.5, -0.2], [-2.0, 0.0, 1.0, 0.3]]]
    lrs = [1e-2, 2e-2, 5e-3]  # the rate may change between steps (scheduler)
    params = [torch.nn.Parameter(torch.tensor(w, dtype=torch.float64)) for w in ws]
    opt = Lamb(params, lr=lrs[0], impl=impl, **variant)
    hand = [(list(w), [0.0] * len(w), [0.0] * len(w)) for w in ws]
    for step_grads, lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        hand = [hand_step(w, g, m, v, lr=lr, **variant)[:3] for (w, m, v), g in zip(hand, step_grads)]
    for p, (w, m, v) in zip(params, hand):
        assert_floats(p.detach().tolist(), w)
        assert_floats(opt.state[p]["exp_avg"].tolist(), m)
        assert_floats(opt.state[p]["exp_avg_sq"].tolist(), v)
        assert opt.state[p]["step"] == 3


# ======================================================================================================================
# foreach == loop
# ======================================================================================================================

SHAPES = [(3, 5), (7,), (2, 3, 4), (1,), (5, 1, 3), (0, 4)]


def make_params(dtype: torch.dtype, seed: int = 0) -> List[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64).to(dtype)) for s in SHAPES]
    params[1].data.zero_()  # a zero tensor (trust 1)
    params[2].data.mul_(10)  # ‖w‖ > 10 (clamped)
    return params


def run_steps(params: List[torch.nn.Parameter], impl: str, steps: int = 5, seed: int = 1) -> Lamb:
    """Two param groups with different hyperparameters; tensor 3 never has a gradient, tensor 4 a zero one."""
    generator = torch.Generator().manual_seed(seed)
    opt = Lamb([{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.01, "min_trust": 0.25,
                                         "trust_denominator": "update_norm"}], lr=0.02, impl=impl)
    for _ in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
            p.grad = None if i == 3 else grad * 0 if i == 4 else grad
        opt.step()
    return opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_foreach_equals_loop(dtype):
    fast, ref = make_params(dtype), make_params(dtype)
    opt_fast, opt_ref = run_steps(fast, "foreach"), run_steps(ref, "loop")
    tol = dict(atol=1e-13, rtol=0) if dtype == torch.float64 else {}
    for i, (a, b) in enumerate(zip(fast, ref)):
        assert a.dtype == dtype
        assert_close(a.detach(), b.detach(), msg=f"param {i}", **tol)
        if i != 3:
            for key in ("exp_avg", "exp_avg_sq"):
                assert opt_fast.state[a][key].dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
                assert_close(opt_fast.state[a][key], opt_ref.state[b][key], msg=f"{key} {i}", **tol)
    assert 3 not in [i for i, p in enumerate(fast) if p in opt_fast.state]


def test_foreach_step_never_reads_tensors_on_the_host(monkeypatch):
    """No .item() / bool / float of a tensor inside the foreach step (each would be a device sync on GPU)."""
    params = make_params(torch.float32)
    opt = run_steps(params, "foreach", steps=1)
    assert_foreach_step_reads_nothing_on_host(monkeypatch, params, opt)


@pytest.mark.parametrize("impl", ["foreach", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_step_updates_parameters_in_place(impl, dtype):
    params = make_params(dtype)
    assert_full_precision_step_copies_no_parameter(params, run_steps(params, impl, steps=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_foreach_step_has_no_cuda_sync():
    params = [p.cuda() for p in make_params(torch.float32)]
    params = [torch.nn.Parameter(p) for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = Lamb(params, lr=0.01)
    opt.step()  # state creation outside the checked step
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ======================================================================================================================
# precision, errors, state dicts
# ======================================================================================================================


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_params_update_through_fp32(dtype):
    """A half parameter gets the fp32 update rounded once; moments stay fp32, also across load_state_dict."""
    half = torch.nn.Parameter(torch.randn(4, 6).to(dtype))
    full = torch.nn.Parameter(half.detach().float())
    grad = torch.randn(4, 6).to(dtype)
    half.grad, full.grad = grad, grad.float()
    opt_half, opt_full = Lamb([half], lr=0.01), Lamb([full], lr=0.01)
    opt_half.step()
    opt_full.step()
    assert torch.equal(half.detach(), full.detach().to(dtype))
    assert opt_half.state[half]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt_half.state[half]["exp_avg_sq"], opt_full.state[full]["exp_avg_sq"])
    restored = Lamb([half], lr=0.01)
    restored.load_state_dict(roundtrip(opt_half.state_dict()))
    assert torch.equal(restored.state[half]["exp_avg_sq"], opt_full.state[full]["exp_avg_sq"])  # not rounded


def test_sparse_gradients_are_rejected():
    assert_sparse_gradients_rejected(Lamb, ["foreach", "loop"])


def test_bad_hyperparameters_are_rejected():
    param = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="trust_denominator"):
        Lamb(param, trust_denominator="norm")
    with pytest.raises(ValueError, match="impl"):
        Lamb(param, impl="apex")
    with pytest.raises(ValueError, match="betas"):
        Lamb(param, betas=(0.9, 1.0))



@pytest.mark.parametrize("impl", ["foreach", "loop"])
def test_state_dict_roundtrip_resumes_exactly(impl):
    original, resumed = make_params(torch.float32), make_params(torch.float32)
    opt = run_steps(original, impl, steps=2)
    for p, q in zip(original, resumed):
        q.data.copy_(p.data)
    opt_resumed = Lamb([{"params": resumed[:3]}, {"params": resumed[3:]}], lr=0.5, impl=impl)
    opt_resumed.load_state_dict(roundtrip(opt.state_dict()))
    assert opt_resumed.param_groups[1]["min_trust"] == 0.25  # saved hyperparameters come back
    assert_resume_is_exact(original, resumed, opt, opt_resumed)


# ======================================================================================================================
# through fairseq
# ======================================================================================================================


@pytest.fixture(scope="module")
def fairseq_cfg():
    """The config fairseq-train builds for the sha-rnn LAMB flags."""
    return training_cfg("transformer_lm", ["--optimizer", "lamb_torch", "--lr", "0.002", "--lamb-betas", "(0.9, 0.99)",
                                           "--weight-decay", "1.2e-6", "--min-trust", "0.25",
                                           "--trust-denominator", "update_norm", "--fp16-init-scale", "128"])


def test_build_through_fairseq_and_step(fairseq_cfg):
    from fairseq import optim

    assert fairseq_cfg.optimizer._name == "lamb_torch"
    params, reference = make_params(torch.float32), make_params(torch.float32)
    opt = optim.build_optimizer(fairseq_cfg.optimizer, params)
    assert isinstance(opt, FairseqLamb) and isinstance(opt.optimizer, Lamb)
    assert not opt.supports_flat_params and opt.supports_memory_efficient_fp16
    assert opt.optimizer_config == dict(lr=0.002, betas=(0.9, 0.99), eps=1e-6, weight_decay=1.2e-6, min_trust=0.25,
                                        max_weight_norm=10.0, trust_denominator="update_norm", adam_mode=False,
                                        impl="foreach")
    ref_opt = Lamb(reference, lr=0.002, betas=(0.9, 0.99), weight_decay=1.2e-6, min_trust=0.25,
                   trust_denominator="update_norm", impl="loop")
    for p, q in zip(params, reference):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    ref_opt.step()
    for p, q in zip(params, reference):
        assert_close(p.detach(), q.detach())
    # fairseq's checkpoint path: state_dict -> load_state_dict (with --optimizer-overrides)
    fresh = optim.build_optimizer(fairseq_cfg.optimizer, params)
    fresh.load_state_dict(roundtrip(opt.state_dict()), {"lr": 1e-4})
    assert fresh.get_lr() == 1e-4 and fresh.param_groups[0]["min_trust"] == 0.25
    assert torch.equal(fresh.optimizer.state[params[0]]["exp_avg"], opt.optimizer.state[params[0]]["exp_avg"])


def fp16_params_and_grads() -> Tuple[List[torch.nn.Parameter], List[torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator).half()) for s in [(3, 5), (7,), (2, 3, 4)]]
    grads = [torch.randn(p.shape, generator=generator).half() for p in params]
    return params, grads


def fp32_reference(params: List[torch.nn.Parameter], grads: List[torch.Tensor]) -> List[torch.Tensor]:
    reference = [torch.nn.Parameter(p.detach().float()) for p in params]
    for q, g in zip(reference, grads):
        q.grad = g.float()
    Lamb(reference, lr=0.002, betas=(0.9, 0.99), weight_decay=1.2e-6, min_trust=0.25,
         trust_denominator="update_norm").step()
    return [q.detach() for q in reference]


def fp16_step(opt, params: List[torch.nn.Parameter], grads: List[torch.Tensor]) -> None:
    """What the trainer does: zero_grad, backward of the loss (scaled by the optimizer), step."""
    opt.zero_grad()
    opt.backward(sum((p * g).sum() for p, g in zip(params, grads)))  # d loss / d p = g, times the loss scale
    opt.step()


def test_fairseq_fp16_master_params_need_no_flatten(fairseq_cfg, monkeypatch):
    from fairseq.optim import FP16Optimizer

    cfg = fairseq_cfg.copy()
    with open_dict(cfg):
        cfg.common.fp16 = True
    params, grads = fp16_params_and_grads()
    if not torch.cuda.is_available():  # fairseq's flat buffer asks for the CUDA device index only
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(RuntimeError, match="--fp16-no-flatten-grads"):
        FP16Optimizer.build_optimizer(cfg, params)  # one flat master tensor would mean one trust ratio
    with open_dict(cfg):
        cfg.common.fp16_no_flatten_grads = True
    opt = FP16Optimizer.build_optimizer(cfg, params)
    expected = fp32_reference(params, grads)
    fp16_step(opt, params, grads)
    for p, p32, q in zip(params, opt.fp32_params, expected):
        assert torch.equal(p32.detach(), q)  # the fp32 master weights got the fp32 update
        assert torch.equal(p.detach(), q.half())


def test_fairseq_memory_efficient_fp16(fairseq_cfg):
    from fairseq.optim import MemoryEfficientFP16Optimizer

    cfg = fairseq_cfg.copy()
    with open_dict(cfg):
        cfg.common.fp16 = cfg.common.memory_efficient_fp16 = True
    params, grads = fp16_params_and_grads()
    opt = MemoryEfficientFP16Optimizer.build_optimizer(cfg, params)
    expected = fp32_reference(params, grads)
    fp16_step(opt, params, grads)
    for p, q in zip(params, expected):
        assert torch.equal(p.detach(), q.half())
        assert opt.wrapped_optimizer.optimizer.state[p]["exp_avg"].dtype == torch.float32


# ======================================================================================================================
# apex
# ======================================================================================================================

APEX_READY = dict(lamb_impl="apex", max_weight_norm=0.0, trust_denominator="update_norm")


def lamb_cfg(**overrides) -> LambConfig:
    return LambConfig(lr=[0.01], **overrides)


def test_apex_without_apex_names_the_fix(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "apex", None)  # as if apex were not installed
    with pytest.raises(ImportError, match="NVIDIA/apex.*never `pip install apex`.*--lamb-impl foreach"):
        FairseqLamb(lamb_cfg(**APEX_READY), [torch.nn.Parameter(torch.zeros(2))])


def test_apex_rejects_what_fused_lamb_cannot_do():
    param = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="--max-weight-norm 0(.|\n)*--trust-denominator update_norm"):
        FairseqLamb(lamb_cfg(lamb_impl="apex"), param)  # NVIDIA defaults: clamp 10 and eps in the denominator
    with pytest.raises(ValueError, match="minimum trust"):
        FairseqLamb(lamb_cfg(min_trust=0.25, **APEX_READY), param)
    with pytest.raises(ValueError, match="--adam-mode"):
        FairseqLamb(lamb_cfg(adam_mode=True, weight_decay=0.01, **APEX_READY), param)


def test_apex_config_matches_the_nvidia_update():
    assert optimizer_kwargs(lamb_cfg(**APEX_READY)) == dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction=False,
                           grad_averaging=True, adam_w_mode=True, max_grad_norm=math.inf, use_nvlamb=True)
