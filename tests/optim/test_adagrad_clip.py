"""Adagrad with per-tensor clipping (``adagrad_clip``): steps against hand computation (spec
/work/shared/specs/adaptive_span.md §2 and §10 check 12), the unclipped accumulator, foreach == loop, fairseq build,
state-dict round trips, errors, and the warmup schedule (fairseq's ``fixed`` == the original's LambdaLR, §1.7 and §10
check 13).

``hand_step`` recomputes one step in plain Python floats from the formula, independently of the implementation.
"""
import math
import warnings
from typing import Dict, List, Tuple

import pytest
import torch
from omegaconf import open_dict

import fairseq_ext  # noqa: F401  (registers adagrad_clip)
from fairseq_ext.optim.adagrad_clip import AdagradClip, AdagradClipConfig, FairseqAdagradClip
from tests.harness import assert_close, training_cfg
from tests.optim.common import (assert_foreach_step_reads_nothing_on_host,
                                 assert_full_precision_step_copies_no_parameter, assert_resume_is_exact,
                                 assert_sparse_gradients_rejected, roundtrip)

IMPLS = ["foreach", "loop"]


def hand_step(w: List[float], g: List[float], s: List[float], step: int, *, lr: float, grad_clip: float = 0.0,
              lr_decay: float = 0.0, weight_decay: float = 0.0, eps: float = 1e-10
              ) -> Tuple[List[float], List[float], float]:
    """One step on one tensor in Python floats -> (new w, new sum, clr actually used). ``step`` includes this step."""
    g = [gi + weight_decay * wi for gi, wi in zip(g, w)]
    clr = lr / (1 + (step - 1) * lr_decay)
    norm = math.sqrt(sum(x * x for x in g))
    if grad_clip > 0 and norm > grad_clip:
        clr *= grad_clip / (norm + 1e-10)
    s = [si + gi * gi for si, gi in zip(s, g)]  # unclipped
    return [wi - clr * gi / (math.sqrt(si) + eps) for wi, gi, si in zip(w, g, s)], s, clr


def params64(*values: List[float]) -> List[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in values]


def set_grads(params: List[torch.nn.Parameter], grads: List[List[float]]) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else torch.tensor(g, dtype=torch.float64)


def assert_floats(actual: List[float], expected: List[float], tol: float = 1e-14) -> None:
    assert actual == pytest.approx(expected, abs=tol, rel=0), (actual, expected)


# ======================================================================================================================
# steps against hand computation
# ======================================================================================================================


@pytest.mark.parametrize("impl", IMPLS)
def test_spec_example_one_clipped_one_not_in_the_same_step(impl):
    """§10 check 12: lr 0.07, c 0.03; p = [1, 2], g = [0.3, 0.4] (‖g‖ = 0.5, clipped) beside p = [1], g = [0.01]
    (‖g‖ = 0.01, not clipped), two steps."""
    clipped, free = params64([1.0, 2.0], [1.0])
    opt = AdagradClip([clipped, free], lr=0.07, grad_clip=0.03, impl=impl)
    set_grads([clipped, free], [[0.3, 0.4], [0.01]])
    opt.step()
    assert_floats(clipped.tolist(), [0.9958, 1.9958], tol=1e-10)  # clr = 0.07 · 0.03 / 0.5 = 0.0042 (+ eps terms)
    assert_floats(opt.state[clipped]["sum"].tolist(), [0.09, 0.16])  # the unclipped g²
    assert_floats(free.tolist(), [0.93], tol=1e-9)  # clr = 0.07: a step of lr·g/(|g| + 1e-10)
    assert_floats(free.tolist(), hand_step([1.0], [0.01], [0.0], 1, lr=0.07, grad_clip=0.03)[0])
    w1, s1, clr = hand_step([1.0, 2.0], [0.3, 0.4], [0.0, 0.0], 1, lr=0.07, grad_clip=0.03)
    assert clr == pytest.approx(0.0042, rel=1e-9)
    assert_floats(clipped.tolist(), w1)
    opt.step()  # the same gradients again
    assert_floats(clipped.tolist(), [0.99283015, 1.99283015], tol=5e-9)  # the spec prints 8 decimals
    assert_floats(clipped.tolist(), hand_step(w1, [0.3, 0.4], s1, 2, lr=0.07, grad_clip=0.03)[0])
    assert_floats(opt.state[clipped]["sum"].tolist(), [0.18, 0.32])
    free1, free_sum, _ = hand_step([1.0], [0.01], [0.0], 1, lr=0.07, grad_clip=0.03)
    assert_floats(free.tolist(), hand_step(free1, [0.01], free_sum, 2, lr=0.07, grad_clip=0.03)[0])
    assert_floats(free.tolist(), [0.93 - 0.07 * 0.01 / math.sqrt(2e-4)], tol=5e-9)
    assert opt.state[clipped]["step"] == opt.state[free]["step"] == 2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hyper", [dict(grad_clip=0.03), dict(grad_clip=0.0), dict(grad_clip=1.0, weight_decay=0.1),
                                   dict(grad_clip=0.5, lr_decay=0.3, initial_accumulator_value=0.2, eps=1e-6)])
def test_several_steps_against_hand_computation(impl, hyper):
    """Three tensors over four steps with a changing lr (the schedule); the clip switches on and off per tensor and
    per step; tensor 2 misses a gradient once (its step count lags)."""
    ws = [[0.5, -0.2, 0.1], [6.0, -8.0, 3.0, 1.0], [0.0]]
    grads = [[[0.3, -1.0, 0.2], [0.01, 0.02, -0.03, 0.005], [2.0]],
             [[-0.05, 0.04, 0.0], [1.0, 0.1, 0.1, 0.1], None],
             [[1.5, 1.5, -0.2], [0.0, 0.0, 0.0, 0.0], [-0.001]],
             [[0.2, 0.0, -0.1], [-2.0, 0.0, 1.0, 0.3], [0.5]]]
    lrs = [0.07 / 4, 0.07 / 2, 0.07, 0.007]
    init = hyper.get("initial_accumulator_value", 0.0)
    hand_kwargs = {k: v for k, v in hyper.items() if k != "initial_accumulator_value"}
    params = params64(*ws)
    opt = AdagradClip(params, lr=lrs[0], impl=impl, **hyper)
    hand = [(list(w), [init] * len(w), 0) for w in ws]
    clipped = set()
    for step_grads, lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        set_grads(params, step_grads)
        opt.step()
        new = []
        for i, ((w, s, n), g) in enumerate(zip(hand, step_grads)):
            if g is None:
                new.append((w, s, n))
                continue
            w, s, clr = hand_step(w, g, s, n + 1, lr=lr, **hand_kwargs)
            if clr < lr / (1 + n * hyper.get("lr_decay", 0.0)) * (1 - 1e-12):
                clipped.add((i, n))
            new.append((w, s, n + 1))
        hand = new
    for p, (w, s, n) in zip(params, hand):
        assert_floats(p.tolist(), w)
        assert_floats(opt.state[p]["sum"].tolist(), s)
        assert opt.state[p]["step"] == n
    assert opt.state[params[2]]["step"] == 3
    if hyper["grad_clip"] > 0:  # the cases exercise both branches
        assert clipped and len(clipped) < 11


@pytest.mark.parametrize("impl", IMPLS)
def test_accumulator_gets_the_unclipped_gradient(impl):
    """A strongly clipped step (‖g‖ = 50 vs c = 0.03): sum = g² exactly, and the step is clr·g/(|g| + eps)."""
    (p,) = params64([1.0, -1.0, 2.0])
    g = [30.0, -40.0, 0.0]
    opt = AdagradClip([p], lr=0.07, grad_clip=0.03, impl=impl)
    set_grads([p], [g])
    opt.step()
    assert opt.state[p]["sum"].tolist() == [900.0, 1600.0, 0.0]
    clr = 0.07 * 0.03 / (50.0 + 1e-10)
    assert_floats(p.tolist(), [1.0 - clr * 30 / (30 + 1e-10), -1.0 + clr * 40 / (40 + 1e-10), 2.0])


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_gradient_tensor_does_not_move(impl):
    a, b = params64([1.0, 2.0], [3.0])
    opt = AdagradClip([a, b], lr=0.07, grad_clip=0.03, impl=impl)
    set_grads([a, b], [[0.0, 0.0], [0.5]])
    opt.step()
    assert a.tolist() == [1.0, 2.0] and opt.state[a]["sum"].tolist() == [0.0, 0.0] and opt.state[a]["step"] == 1
    assert not torch.isnan(b).any()
    set_grads([a, b], [[0.3, 0.4], [0.0]])  # a zero gradient after a nonzero one: b stays put too
    before = b.tolist()
    opt.step()
    assert b.tolist() == before
    assert_floats(a.tolist(), [1.0 - 0.0042 * 0.3 / (0.3 + 1e-10), 2.0 - 0.0042 * 0.4 / (0.4 + 1e-10)], tol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_clip_is_torch_adagrad(impl):
    """c = 0 (the default) is plain Adagrad: torch.optim.Adagrad with the same lr_decay, weight decay, initial
    accumulator and eps gives the same parameters."""
    generator = torch.Generator().manual_seed(0)
    ours, ref = make_params(torch.float64), make_params(torch.float64)
    kwargs = dict(lr=0.05, lr_decay=0.01, weight_decay=0.02, initial_accumulator_value=0.1, eps=1e-10)
    opt, ref_opt = AdagradClip(ours, impl=impl, **kwargs), torch.optim.Adagrad(ref, foreach=False, **kwargs)
    for _ in range(4):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        assert_close(p.detach(), q.detach(), atol=1e-14, rtol=0)


# ======================================================================================================================
# foreach == loop
# ======================================================================================================================

SHAPES = [(3, 5), (7,), (2, 3, 4), (1,), (5, 1, 3), (0, 4), (11, 13)]


def make_params(dtype: torch.dtype, seed: int = 0) -> List[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64).to(dtype)) for s in SHAPES]


def run_steps(params: List[torch.nn.Parameter], impl: str, steps: int = 5, seed: int = 1) -> AdagradClip:
    """Two param groups; gradient scales straddle c so some tensors clip and others do not; tensor 3 never has a
    gradient, tensor 1 a zero one."""
    generator = torch.Generator().manual_seed(seed)
    opt = AdagradClip([{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.01, "grad_clip": 0.5}],
                      lr=0.07, grad_clip=0.03, impl=impl)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 0.07 * min(1.0, (step + 1) / 3)
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=generator, dtype=torch.float64) * (0.002 if i % 2 else 1.0)
            p.grad = None if i == 3 else grad.to(p.dtype) * 0 if i == 1 else grad.to(p.dtype)
        opt.step()
    return opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_foreach_equals_loop(dtype):
    fast, ref = make_params(dtype), make_params(dtype)
    opt_fast, opt_ref = run_steps(fast, "foreach"), run_steps(ref, "loop")
    tol = dict(atol=1e-14, rtol=0) if dtype == torch.float64 else {}
    for i, (a, b) in enumerate(zip(fast, ref)):
        assert a.dtype == dtype
        assert_close(a.detach(), b.detach(), msg=f"param {i}", **tol)
        if i != 3:
            assert opt_fast.state[a]["sum"].dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
            assert_close(opt_fast.state[a]["sum"], opt_ref.state[b]["sum"], msg=f"sum {i}", **tol)
            assert opt_fast.state[a]["step"] == opt_ref.state[b]["step"] == 5
    assert fast[3] not in opt_fast.state


def test_foreach_step_never_reads_tensors_on_the_host(monkeypatch):
    """No .item() / bool / float of a tensor inside the foreach step (each would be a device sync on GPU)."""
    params = make_params(torch.float32)
    opt = run_steps(params, "foreach", steps=1)
    assert_foreach_step_reads_nothing_on_host(monkeypatch, params, opt)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_step_updates_parameters_in_place(impl, dtype):
    params = make_params(dtype)
    assert_full_precision_step_copies_no_parameter(params, run_steps(params, impl, steps=1))


# ======================================================================================================================
# precision, errors, state dicts
# ======================================================================================================================


def test_half_params_update_through_fp32():
    half = torch.nn.Parameter(torch.randn(4, 6).half())
    full = torch.nn.Parameter(half.detach().float())
    grad = torch.randn(4, 6).half()
    half.grad, full.grad = grad, grad.float()
    opt_half, opt_full = AdagradClip([half], lr=0.07, grad_clip=0.03), AdagradClip([full], lr=0.07, grad_clip=0.03)
    opt_half.step()
    opt_full.step()
    assert torch.equal(half.detach(), full.detach().half())
    assert opt_half.state[half]["sum"].dtype == torch.float32
    restored = AdagradClip([half], lr=0.07)
    restored.load_state_dict(roundtrip(opt_half.state_dict()))
    assert torch.equal(restored.state[half]["sum"], opt_full.state[full]["sum"])  # not rounded to fp16


def test_sparse_gradients_are_rejected():
    assert_sparse_gradients_rejected(AdagradClip, IMPLS)


@pytest.mark.parametrize("kwargs, match", [
    (dict(grad_clip=-0.03), "grad_clip.*0 disables"), (dict(lr=-1.0), "invalid lr"),
    (dict(lr_decay=-0.1), "lr_decay"), (dict(weight_decay=-1e-4), "weight_decay"),
    (dict(initial_accumulator_value=-1.0), "initial_accumulator_value"), (dict(eps=0.0), "eps must be > 0"),
    (dict(grad_clip=float("nan")), "grad_clip"), (dict(impl="fused"), "impl must be one of"),
])
def test_bad_hyperparameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdagradClip([torch.nn.Parameter(torch.zeros(2))], **kwargs)



@pytest.mark.parametrize("impl", IMPLS)
def test_state_dict_roundtrip_resumes_exactly(impl):
    original, resumed = make_params(torch.float32), make_params(torch.float32)
    opt = run_steps(original, impl, steps=2)
    for p, q in zip(original, resumed):
        q.data.copy_(p.data)
    opt_resumed = AdagradClip([{"params": resumed[:3]}, {"params": resumed[3:]}], lr=0.5, impl=impl)
    opt_resumed.load_state_dict(roundtrip(opt.state_dict()))
    assert opt_resumed.param_groups[1]["grad_clip"] == 0.5  # saved hyperparameters come back
    assert_resume_is_exact(original, resumed, opt, opt_resumed)


# ======================================================================================================================
# through fairseq
# ======================================================================================================================

W = 4  # warmup updates
RECIPE = ["--optimizer", "adagrad_clip", "--adagrad-clip", "0.03", "--lr-scheduler", "fixed",
          "--warmup-updates", str(W)]


def fairseq_cfg(lr: float = 0.07, extra: Tuple[str, ...] = ()):
    return training_cfg("transformer_lm", [*RECIPE, "--lr", str(lr), *extra])


def test_flags_and_defaults():
    defaults = AdagradClipConfig()
    assert (defaults.adagrad_clip, defaults.weight_decay, defaults.adagrad_eps, str(defaults.adagrad_impl)) == (
        0.0, 0.0, 1e-10, "foreach")
    cfg = fairseq_cfg(extra=("--adagrad-impl", "loop", "--weight-decay", "0.001"))
    assert cfg.optimizer._name == "adagrad_clip"
    opt = FairseqAdagradClip(cfg.optimizer, make_params(torch.float32))
    assert opt.optimizer_config == dict(lr=0.07, weight_decay=0.001, eps=1e-10, grad_clip=0.03, impl="loop")
    assert not opt.supports_flat_params and opt.supports_memory_efficient_fp16


def test_build_through_fairseq_and_step():
    from fairseq import optim

    cfg = fairseq_cfg()
    params, reference = make_params(torch.float32), make_params(torch.float32)
    opt = optim.build_optimizer(cfg.optimizer, params)
    assert isinstance(opt, FairseqAdagradClip) and isinstance(opt.optimizer, AdagradClip)
    ref_opt = AdagradClip(reference, lr=0.07, grad_clip=0.03, impl="loop")
    for p, q in zip(params, reference):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    opt.step()
    ref_opt.step()
    for p, q in zip(params, reference):
        assert_close(p.detach(), q.detach())
    fresh = optim.build_optimizer(cfg.optimizer, params)  # fairseq's checkpoint path, with --optimizer-overrides
    fresh.load_state_dict(roundtrip(opt.state_dict()), {"lr": 1e-4})
    assert fresh.get_lr() == 1e-4 and fresh.param_groups[0]["grad_clip"] == 0.03
    assert torch.equal(fresh.optimizer.state[params[0]]["sum"], opt.optimizer.state[params[0]]["sum"])


def test_fairseq_fp16_needs_no_flatten(monkeypatch):
    from fairseq.optim import FP16Optimizer

    cfg = fairseq_cfg()
    with open_dict(cfg):
        cfg.common.fp16 = True
    params = [torch.nn.Parameter(torch.randn(3, 5).half()), torch.nn.Parameter(torch.randn(7).half())]
    if not torch.cuda.is_available():  # fairseq's flat buffer asks for the CUDA device index only
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(RuntimeError, match="--fp16-no-flatten-grads"):
        FP16Optimizer.build_optimizer(cfg, params)  # one flat master tensor would mean one clip decision
    with open_dict(cfg):
        cfg.common.fp16_no_flatten_grads = True
    FP16Optimizer.build_optimizer(cfg, params)


# ======================================================================================================================
# the warmup schedule: fairseq's `fixed` == the original's LambdaLR stepped before the update
# ======================================================================================================================


class FairseqLoop:
    """The calls fairseq's Trainer makes on the optimizer and the scheduler (trainer.py: ``step_update(0)`` in
    ``_build_optimizer``; ``begin_epoch`` -> ``step_begin_epoch`` then ``step_update(num_updates)``; after each update
    ``set_num_updates`` -> ``step_update(num_updates)``; on load: scheduler state, then ``set_num_updates``)."""

    def __init__(self, lr: float, params: List[torch.nn.Parameter], checkpoint: Dict = None) -> None:
        from fairseq import optim
        from fairseq.optim import lr_scheduler

        cfg = fairseq_cfg(lr)
        self.params, self.num_updates = params, 0
        self.opt = optim.build_optimizer(cfg.optimizer, params)
        self.scheduler = lr_scheduler.build_lr_scheduler(cfg.lr_scheduler, self.opt)
        self.scheduler.step_update(0)
        if checkpoint is not None:
            self.opt.load_state_dict(roundtrip(checkpoint["optimizer"]), {})
            self.scheduler.load_state_dict(checkpoint["lr_scheduler"])
            self.num_updates = checkpoint["num_updates"]
            self.scheduler.step_update(self.num_updates)
        self.scheduler.step_begin_epoch(1)
        self.scheduler.step_update(self.num_updates)

    def update(self, grads: List[torch.Tensor]) -> float:
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        lr = self.opt.get_lr()
        self.opt.step()
        self.num_updates += 1
        self.scheduler.step_update(self.num_updates)
        return lr

    def checkpoint(self) -> Dict:
        return dict(optimizer=self.opt.state_dict(), lr_scheduler=self.scheduler.state_dict(),
                    num_updates=self.num_updates)


def original_run(params: List[torch.nn.Parameter], grads: List[List[torch.Tensor]], lr: float, fine_tune_lr: float,
                 resume_at: int) -> List[float]:
    """The original's loop: LambdaLR(min(1, t/W)) stepped before each optimizer step; from ``resume_at`` on the rate
    base is the fine-tune lr (base_lrs captured before the state reload, then the scheduler stepped to the saved
    iteration), accumulators kept."""
    opt = AdagradClip(params, lr=lr, grad_clip=0.03, impl="loop")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, t / W))
    used = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": the original's order
        for t, step_grads in enumerate(grads, start=1):
            if t == resume_at + 1:
                sched.base_lrs = [fine_tune_lr]
            sched.step()
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            used.append(opt.param_groups[0]["lr"])
            opt.step()
    return used


@pytest.mark.parametrize("resume_at", [2, 6])  # inside and after the warmup
def test_fixed_warmup_reproduces_the_original_schedule_and_fine_tune_resume(resume_at):
    generator = torch.Generator().manual_seed(5)
    n_updates = 9
    grads = [[torch.randn(s, generator=generator) * (0.001 if i == 1 else 1.0) for i, s in enumerate(SHAPES)]
             for _ in range(n_updates)]
    reference = make_params(torch.float32)
    ref_lrs = original_run(reference, grads, 0.07, 0.007, resume_at)
    assert ref_lrs[:2] == pytest.approx([0.07 / W, 0.07 * 2 / W], rel=1e-12)  # update t uses lr·t/W

    params = make_params(torch.float32)
    first = FairseqLoop(0.07, params)
    lrs = [first.update(g) for g in grads[:resume_at]]
    second = FairseqLoop(0.007, params, checkpoint=first.checkpoint())  # fine-tune: --lr divided by 10, resumed
    lrs += [second.update(g) for g in grads[resume_at:]]
    assert lrs == pytest.approx(ref_lrs, rel=1e-12, abs=0)
    assert lrs[resume_at] == pytest.approx(0.007 * min(1.0, (resume_at + 1) / W), rel=1e-12)
    for p, q in zip(params, reference):
        assert_close(p.detach(), q.detach())
    assert second.opt.optimizer.state[params[0]]["step"] == n_updates  # the accumulators carried over
