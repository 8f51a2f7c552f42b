"""``cosine_warmup_xl``: linear warmup, then cosine annealing, in both conventions of the Transformer-XL code.

n is the number of updates done. fairseq calls ``step_update(0)`` when the optimizer is built and
``step_update(n)`` after every update, so lr(n) is the rate of update n + 1. Both train.py scripts do the same with
their ``train_step`` counter: after an update they increment it and set the rate from it. With W warmup updates,
peak rate lr, η = ``min_lr`` (``--eta_min``) and period P (``lr_period_updates``, or ``max_update`` when <= 0):

    warmup   (n < W):  lr(n) = lr · n / W
    cosine   (n ≥ W):  lr(n) = η + (lr − η) · (1 + cos(π · t / T)) / 2
        cosine_period=total         t = n,      T = P        kimiyoung/transformer-xl pytorch/train.py
        cosine_period=after_warmup  t = n − W,  T = P − W    NVIDIA DeepLearningExamples Transformer-XL train.py

* total: ``CosineAnnealingLR(optimizer, max_step, eta_min)`` stepped with the absolute ``train_step``, so the
  cosine phase is entered part-way, at η + (lr − η)(1 + cos(π·W/P))/2 < lr, and the warmup never reaches the peak
  (a negligible gap for the scripts' W/P ≤ 0.01). ``--eta_min`` defaults to 0 there.
* after_warmup: ``CosineAnnealingLR(optimizer, max_step − warmup_step, eta_min)`` stepped with
  ``train_step − warmup_step``; P is ``--max_step_scheduler`` when given, else ``--max_step``. ``--eta_min``
  defaults to 0.001 (wt103 yamls: base 0.001, large 1e-4).

Off by one at the start: both scripts only set the rate after an update, so their first update runs at the
optimizer's initial rate, the peak lr, not lr·0/W = 0; from the second update on, update k runs at lr(k − 1) in
both scripts and here. ``peak_lr_first_update`` reproduces that first update; by default lr(0) follows the formula
(0 when W > 0), like fairseq's schedulers. Past the period (n > P) the formula keeps following the cosine (it rises
again), as CosineAnnealingLR's closed form does; fairseq's ``cosine`` restarts instead. Runs normally stop at
max_update = P, where the last rate set (lr(P) = η) is never used.

fairseq's ``cosine`` already equals ``after_warmup`` for every n in [0, P) with ``--warmup-updates W
--warmup-init-lr 0 --min-lr η`` and ``--max-update P`` (or ``--lr-period-updates P − W``); its ``--warmup-init-lr``
defaults to ``--min-lr``, not 0, and at n = P it restarts at 0.1·lr (``--lr-shrink``). It has no ``total`` form.
"""

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import List, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.optim import FairseqOptimizer
from fairseq.optim.lr_scheduler import FairseqLRScheduler, register_lr_scheduler
from omegaconf import II

COSINE_PERIODS = ("total", "after_warmup")


@dataclass
class CosineWarmupXLConfig(FairseqDataclass):
    warmup_updates: int = field(default=0, metadata={"help": "linear warmup from 0 to --lr over the first N updates"})
    min_lr: float = field(default=0.0, metadata={"help": "eta_min: the rate at the end of the cosine"})
    lr_period_updates: int = field(default=-1, metadata={"help": "cosine period P in updates (NVIDIA "
                                                                 "--max_step_scheduler); <= 0: --max-update"})
    cosine_period: ChoiceEnum(COSINE_PERIODS) = field(
        default="total",
        metadata={"help": "total: cosine over [0, P] at the absolute update number, entered at n = W "
                          "(kimiyoung/transformer-xl); after_warmup: cosine over [W, P] (NVIDIA)"})
    peak_lr_first_update: bool = field(
        default=False, metadata={"help": "run the first update at the peak lr, as both train.py scripts do (they "
                                         "set the rate only after an update)"})
    lr: List[float] = II("optimization.lr")
    max_update: int = II("optimization.max_update")


def cosine_warmup_lr(num_updates: int, *, peak_lr: float, min_lr: float, warmup_updates: int, period_updates: int,
                     cosine_period: str, peak_lr_first_update: bool = False) -> float:
    """The rate after ``num_updates`` updates (see the module docstring)."""
    if num_updates == 0 and peak_lr_first_update:
        return peak_lr
    if num_updates < warmup_updates:
        return peak_lr * num_updates / warmup_updates
    if cosine_period == "total":
        t, t_max = num_updates, period_updates
    else:
        t, t_max = num_updates - warmup_updates, period_updates - warmup_updates
    return min_lr + (peak_lr - min_lr) * (1 + math.cos(math.pi * t / t_max)) / 2


@register_lr_scheduler("cosine_warmup_xl", dataclass=CosineWarmupXLConfig)
class CosineWarmupXLSchedule(FairseqLRScheduler):
    """Linear warmup then cosine annealing (Transformer-XL original or NVIDIA convention)."""

    def __init__(self, cfg: CosineWarmupXLConfig, optimizer: FairseqOptimizer) -> None:
        super().__init__(cfg, optimizer)
        if isinstance(cfg.lr, Collection) and len(cfg.lr) > 1:
            raise ValueError(f"cosine_warmup_xl takes one --lr, got {list(cfg.lr)}")
        self.peak_lr = float(cfg.lr[0] if isinstance(cfg.lr, Collection) else cfg.lr)
        self.period_updates = cfg.lr_period_updates if cfg.lr_period_updates > 0 else cfg.max_update
        self.cosine_period = str(cfg.cosine_period)  # fairseq's choice enum -> "total" | "after_warmup"
        check_schedule(peak_lr=self.peak_lr, min_lr=cfg.min_lr, warmup_updates=cfg.warmup_updates,
                       period_updates=self.period_updates, cosine_period=self.cosine_period)
        self.optimizer.set_lr(self.lr_at(0))

    def lr_at(self, num_updates: int) -> float:
        return cosine_warmup_lr(num_updates, peak_lr=self.peak_lr, min_lr=self.cfg.min_lr,
                                warmup_updates=self.cfg.warmup_updates, period_updates=self.period_updates,
                                cosine_period=self.cosine_period,
                                peak_lr_first_update=self.cfg.peak_lr_first_update)

    def step(self, epoch: int, val_loss: Optional[float] = None) -> float:
        """Epoch boundaries do not change the rate."""
        super().step(epoch, val_loss)
        return self.optimizer.get_lr()

    def step_update(self, num_updates: int) -> float:
        """Set the rate for the next update, given the number of updates done."""
        lr = self.lr_at(num_updates)
        self.optimizer.set_lr(lr)
        return lr


def check_schedule(*, peak_lr: float, min_lr: float, warmup_updates: int, period_updates: int,
                   cosine_period: str) -> None:
    if cosine_period not in COSINE_PERIODS:
        raise ValueError(f"cosine_period must be one of {COSINE_PERIODS}, got {cosine_period!r}")
    if warmup_updates < 0:
        raise ValueError(f"--warmup-updates must be >= 0, got {warmup_updates}")
    if min_lr > peak_lr:
        raise ValueError(f"--min-lr {min_lr} exceeds --lr {peak_lr}")
    if period_updates <= 0:
        raise ValueError("cosine_warmup_xl needs the cosine period: set --max-update or --lr-period-updates")
    if cosine_period == "after_warmup" and period_updates <= warmup_updates:
        raise ValueError(f"cosine_period=after_warmup needs a period longer than the warmup: "
                         f"P={period_updates} <= W={warmup_updates}")
