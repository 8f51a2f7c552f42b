"""``cosine_warmup_xl``: closed forms, the rates both train.py loops produce (torch's CosineAnnealingLR stepped the
way they step it), fairseq's ``cosine`` where it matches NVIDIA, and the CLI.

fairseq calls ``step_update(0)`` when the optimizer is built and ``step_update(n)`` after update n, so the rate of
update k is ``lr_at(k - 1)``; the train.py loops set the rate after update k from ``train_step = k``.
"""
import math
import warnings
from typing import List

import pytest
import torch

import fairseq_ext  # noqa: F401  (registers cosine_warmup_xl)
from fairseq_ext.optim.lamb import FairseqLamb, LambConfig
from fairseq_ext.optim.lr_scheduler.cosine_warmup_xl import CosineWarmupXLConfig, CosineWarmupXLSchedule
from tests.harness import training_cfg

LR, ETA, W, P = 0.01, 0.001, 8, 40  # peak rate, eta_min, warmup updates, period (= max_update)


def fairseq_optimizer(lr: float = LR) -> FairseqLamb:
    return FairseqLamb(LambConfig(lr=[lr]), [torch.nn.Parameter(torch.zeros(1))])


def build(**overrides) -> CosineWarmupXLSchedule:
    cfg = dict(lr=[LR], max_update=P, warmup_updates=W, min_lr=ETA)
    cfg.update(overrides)
    return CosineWarmupXLSchedule(CosineWarmupXLConfig(**cfg), fairseq_optimizer())


def cosine(t: float, t_max: float) -> float:
    return ETA + (LR - ETA) * (1 + math.cos(math.pi * t / t_max)) / 2


def test_total_period_closed_form():
    """kimiyoung/transformer-xl: the cosine runs over [0, P] at the absolute update number."""
    schedule = build(cosine_period="total")
    expected = {0: 0.0, 1: LR / W, W - 1: LR * (W - 1) / W,
                W: cosine(W, P),  # the cosine phase starts below the peak: LR itself is never used
                P // 2: (LR + ETA) / 2, 30: cosine(30, P), P: ETA}
    for n, lr in expected.items():
        assert schedule.step_update(n) == pytest.approx(lr, rel=1e-12, abs=0), n
        assert schedule.optimizer.get_lr() == pytest.approx(lr, rel=1e-12, abs=0)
    assert LR * (W - 1) / W < cosine(W, P) < LR


def test_after_warmup_period_closed_form():
    """NVIDIA: the cosine runs over [W, P]."""
    schedule = build(cosine_period="after_warmup")
    expected = {0: 0.0, 1: LR / W, W - 1: LR * (W - 1) / W, W: LR, (W + P) // 2: (LR + ETA) / 2,
                30: cosine(30 - W, P - W), P: ETA}
    for n, lr in expected.items():
        assert schedule.step_update(n) == pytest.approx(lr, rel=1e-12, abs=0), n


def test_period_and_first_update_options():
    assert build(peak_lr_first_update=True).step_update(0) == LR
    assert build(peak_lr_first_update=True).step_update(1) == pytest.approx(LR / W)
    nvidia = build(cosine_period="after_warmup", lr_period_updates=24)  # --max_step_scheduler 24 < max_update
    assert nvidia.step_update(16) == pytest.approx((LR + ETA) / 2)
    assert nvidia.step_update(24) == pytest.approx(ETA)
    assert nvidia.step_update(32) == pytest.approx((LR + ETA) / 2)  # past the period the closed form rises again
    assert build(warmup_updates=0).step_update(0) == pytest.approx(LR)  # no warmup: the cosine starts at the peak
    # the rate is set when the scheduler is built (before fairseq's own step_update(0))
    assert build(peak_lr_first_update=True).optimizer.get_lr() == LR


def train_py_rates(cosine_period: str, updates: int) -> List[float]:
    """The rate of updates 1..updates in the train.py loops (original: cosine_period total, NVIDIA: after_warmup)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=LR)
    t_max = P if cosine_period == "total" else P - W  # CosineAnnealingLR(optimizer, max_step [- warmup_step])
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step(epoch) is deprecated in torch; it still uses the closed form
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, t_max, eta_min=ETA)
        for train_step in range(1, updates + 1):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if train_step < W:
                optimizer.param_groups[0]["lr"] = LR * train_step / W
            else:
                scheduler.step(train_step if cosine_period == "total" else train_step - W)
    return rates


@pytest.mark.parametrize("cosine_period", ["total", "after_warmup"])
def test_rates_match_the_train_py_loops(cosine_period):
    reference = train_py_rates(cosine_period, P)
    for peak_first in (False, True):
        schedule = build(cosine_period=cosine_period, peak_lr_first_update=peak_first)
        ours = [schedule.step_update(k - 1) for k in range(1, P + 1)]  # the rate of update k
        assert ours[1:] == pytest.approx(reference[1:], rel=1e-12, abs=0)
        # train.py's first update runs at the optimizer's initial (peak) rate; fairseq's convention is lr(0) = 0
        assert (ours[0], reference[0]) == ((LR, LR) if peak_first else (0.0, LR))


def test_fairseq_cosine_matches_nvidia_except_at_the_ends():
    from fairseq.optim.lr_scheduler.cosine_lr_scheduler import CosineLRSchedule, CosineLRScheduleConfig

    def fairseq_cosine(**overrides) -> CosineLRSchedule:
        cfg = dict(lr=[LR], warmup_updates=W, min_lr=ETA, max_update=P)
        cfg.update(overrides)
        return CosineLRSchedule(CosineLRScheduleConfig(**cfg), fairseq_optimizer())

    ours = build(cosine_period="after_warmup")
    theirs = fairseq_cosine(warmup_init_lr=0.0)
    for n in range(P):
        assert theirs.step_update(n) == pytest.approx(ours.step_update(n), rel=1e-12, abs=0), n
    assert theirs.step_update(P) == pytest.approx(0.1 * LR) and ours.step_update(P) == pytest.approx(ETA)
    with_period = fairseq_cosine(warmup_init_lr=0.0, lr_period_updates=24 - W, max_update=P)
    nvidia = build(cosine_period="after_warmup", lr_period_updates=24)
    for n in range(24):
        assert with_period.step_update(n) == pytest.approx(nvidia.step_update(n), rel=1e-12, abs=0), n
    assert fairseq_cosine().step_update(0) == ETA  # --warmup-init-lr defaults to --min-lr, not 0


def test_bad_configurations_are_rejected():
    with pytest.raises(ValueError, match="longer than the warmup"):
        build(cosine_period="after_warmup", max_update=W)
    with pytest.raises(ValueError, match="--max-update or --lr-period-updates"):
        build(max_update=0)
    with pytest.raises(ValueError, match="one --lr"):
        build(lr=[LR, LR])
    with pytest.raises(ValueError, match="exceeds"):
        build(min_lr=2 * LR)


def test_cli_flags():
    from fairseq.optim import build_optimizer
    from fairseq.optim.lr_scheduler import build_lr_scheduler

    cfg = training_cfg("transformer_lm", ["--optimizer", "lamb_torch", "--lr", str(LR), "--lr-scheduler",
                                          "cosine_warmup_xl", "--warmup-updates", str(W), "--max-update", "100",
                                          "--lr-period-updates", str(P), "--min-lr", str(ETA),
                                          "--cosine-period", "after_warmup", "--peak-lr-first-update"])
    optimizer = build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])
    schedule = build_lr_scheduler(cfg.lr_scheduler, optimizer)
    assert isinstance(schedule, CosineWarmupXLSchedule) and schedule.period_updates == P
    assert [schedule.step_update(n) for n in (0, 1, W, P)] == pytest.approx([LR, LR / W, LR, ETA])
