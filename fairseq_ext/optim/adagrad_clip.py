"""``adagrad_clip``: Adagrad with per-tensor step-size clipping, as the adaptive-span original's
``adagrad_with_grad_clip.py`` (Sukhbaatar et al., "Adaptive Attention Span in Transformers", ACL 2019;
facebookresearch/adaptive-span). Spec: /work/shared/specs/adaptive_span.md §2.

For each parameter tensor p with gradient g, separately (accumulator ``sum`` starting at ``initial_accumulator_value``,
0 in the original; ``step`` counted per tensor):

    step ← step + 1
    g    ← g + λ·p                                     if weight_decay λ ≠ 0 (never set by the original's scripts)
    clr  = lr / (1 + (step − 1)·lr_decay)              (lr_decay 0 in the original: clr = lr, which already carries
                                                        the warmup factor of the LR schedule)
    clr  ← clr · c / (‖g‖₂ + 1e−10)                    if c > 0 and ‖g‖₂ > c   (‖g‖₂ of THIS tensor;
                                                                                 c = --adagrad-clip)
    sum  ← sum + g²                                     (the UNCLIPPED g: the clip never reaches the accumulator)
    p    ← p − clr · g / (√sum + eps)                   (eps = 1e−10)

This is per-tensor step-size scaling, not global gradient-norm clipping: with the original's ``--optim adagrad`` the
global clip is off, so do not combine it with fairseq's ``--clip-norm`` (default 0) when reproducing the paper.
c = 0 (the default of the original ``--grad-clip`` and of fairseq's example ``--adagrad-clip``) disables the clip:
plain Adagrad. The paper's scripts use ``--lr 0.07 --adagrad-clip 0.03``.

Differences from the original, all deliberate: sparse gradients are rejected (the original has a sparse path, no
model here produces sparse gradients); the clip decision is taken on device (``torch.where``) instead of ``.item()``,
so a step never syncs with the host; the state is created lazily on the first step with a gradient (the original
fills it in ``__init__``; values are identical); half-precision parameters are updated through fp32 working copies
with an fp32 accumulator (``--memory-efficient-fp16``).

Warmup: the original multiplies lr by ``min(1, t / warmup)`` with a LambdaLR stepped *before* the optimizer, so
update t (1-based) uses ``lr·min(1, t/W)``. fairseq's own ``--lr-scheduler fixed --warmup-updates W`` gives exactly
that: the trainer calls ``step_update(0)`` when the optimizer is built and ``step_update(n)`` after update n, and
``fixed`` sets ``lr·(n + 1)/W`` while ``n < W``, ``lr`` after. On resume with a new ``--lr`` (the fine-tune phase at
lr/10), ``fixed`` recomputes its rate from the config at the start of the epoch, before the first resumed update,
and the accumulators come back from the checkpoint. So no extra scheduler is needed (tests/optim/test_adagrad_clip.py
checks both against a LambdaLR-driven run).

Implementations (``impl`` / ``--adagrad-impl``): ``foreach`` (default; ``torch._foreach_*`` per (device, dtype)
bucket, norms from ``torch._foreach_norm``) and ``loop`` (per-tensor reference, the same operations in the same
order). The clip is per tensor, so ``supports_flat_params`` is False: ``--fp16`` needs ``--fp16-no-flatten-grads``
(as fairseq's example).
"""

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Sequence

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.optim import register_optimizer
from omegaconf import II
from torch import Tensor

from .per_tensor import FairseqPerTensorOptimizer, PerTensorOptimizer, Slot

ADAGRAD_IMPLS = ("foreach", "loop")
CLIP_NORM_EPS = 1e-10  # the original's constant in c / (‖g‖ + 1e-10)


# ======================================================================================================================
# the algorithm
# ======================================================================================================================


@dataclass(frozen=True)
class AdagradClipHyper:
    """One param group's hyperparameters."""

    lr: float
    lr_decay: float
    weight_decay: float
    eps: float
    grad_clip: float

    @classmethod
    def from_group(cls, group: Dict[str, Any]) -> "AdagradClipHyper":
        return cls(lr=group["lr"], lr_decay=group["lr_decay"], weight_decay=group["weight_decay"], eps=group["eps"],
                   grad_clip=group["grad_clip"])

    def clr(self, step: int) -> float:
        """The step's learning rate before the clip (lr when lr_decay = 0)."""
        return self.lr / (1 + (step - 1) * self.lr_decay)


def clip_factor(grad_norm: Tensor, grad_clip: float) -> Tensor:
    """The original's step factor: c / (‖g‖ + 1e-10) where ‖g‖ > c, else 1; 1 everywhere when c <= 0.
    Elementwise over a 0-dim (one tensor) or (N,) (N tensors) norm."""
    if grad_clip <= 0:
        return torch.ones_like(grad_norm)
    return torch.where(grad_norm > grad_clip, grad_clip / (grad_norm + CLIP_NORM_EPS), torch.ones_like(grad_norm))


def adagrad_clip_loop(params: Sequence[Tensor], grads: Sequence[Tensor], sums: Sequence[Tensor], steps: Sequence[int],
                      hp: AdagradClipHyper) -> None:
    """Reference step, one tensor at a time; updates params and accumulators in place. ``steps``: each tensor's step
    count including this step."""
    for p, g, s, step in zip(params, grads, sums, steps):
        if hp.weight_decay != 0:
            g = g.add(p, alpha=hp.weight_decay)
        scale = clip_factor(torch.linalg.vector_norm(g), hp.grad_clip) * -hp.clr(step)  # 0-dim
        s.addcmul_(g, g)  # unclipped g
        update = g / s.sqrt().add_(hp.eps)
        p.add_(update.mul_(scale))


def adagrad_clip_foreach(params: List[Tensor], grads: List[Tensor], sums: List[Tensor], steps: Sequence[int],
                         hp: AdagradClipHyper) -> None:
    """Multi-tensor step over tensors of one device and dtype; no host syncs."""
    if hp.weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=hp.weight_decay)
    norms = torch.stack(torch._foreach_norm(grads))  # (N,)
    clrs = torch.tensor([-hp.clr(step) for step in steps], dtype=norms.dtype).to(norms.device, non_blocking=True)
    scales = clip_factor(norms, hp.grad_clip) * clrs  # (N,)
    torch._foreach_addcmul_(sums, grads, grads)  # unclipped g
    denom = torch._foreach_sqrt(sums)
    torch._foreach_add_(denom, hp.eps)
    updates = torch._foreach_div(grads, denom)
    del denom
    torch._foreach_mul_(updates, list(scales.unbind()))
    torch._foreach_add_(params, updates)


# ======================================================================================================================
# torch optimizer
# ======================================================================================================================


class AdagradClip(PerTensorOptimizer):
    """Adagrad with per-tensor step-size clipping (module docstring); usable without fairseq.

    Defaults are the original's: lr_decay 0, weight_decay 0, initial accumulator 0, eps 1e-10, grad_clip 0 (no clip).
    ``impl``: "foreach" (multi-tensor, no host syncs) or "loop" (per-tensor reference).
    """

    def __init__(self, params: Iterable, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, grad_clip: float = 0.0,
                 impl: str = "foreach") -> None:
        impl = str(impl)  # fairseq passes its choice enum
        check_hyperparameters(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                              initial_accumulator_value=initial_accumulator_value, eps=eps, grad_clip=grad_clip)
        if impl not in ADAGRAD_IMPLS:
            raise ValueError(f"impl must be one of {ADAGRAD_IMPLS}, got {impl!r}")
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps, grad_clip=grad_clip)
        super().__init__(params, defaults)
        self.impl = impl

    STATE_KEYS = ("sum",)

    def init_state(self, key: str, param: Tensor, group: Dict[str, Any], dtype: torch.dtype) -> Tensor:
        return torch.full_like(param, group["initial_accumulator_value"], dtype=dtype,
                               memory_format=torch.preserve_format)

    def update(self, bucket: List[Slot], group: Dict[str, Any]) -> None:
        tensors = ([s.work_param for s in bucket], [s.grad for s in bucket], [s.state["sum"] for s in bucket],
                   [s.step for s in bucket])
        (adagrad_clip_foreach if self.impl == "foreach" else adagrad_clip_loop)(*tensors,
                                                                               AdagradClipHyper.from_group(group))


def check_hyperparameters(*, lr: float, lr_decay: float, weight_decay: float, initial_accumulator_value: float,
                          eps: float, grad_clip: float) -> None:
    values = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                  initial_accumulator_value=initial_accumulator_value, eps=eps, grad_clip=grad_clip)
    for name, value in values.items():
        if not value >= 0:  # also rejects NaN
            hint = " (0 disables the per-tensor clip)" if name == "grad_clip" else ""
            raise ValueError(f"invalid {name} {value}: must be >= 0{hint}")
    if eps == 0 and initial_accumulator_value == 0:
        raise ValueError("eps must be > 0 when initial_accumulator_value is 0 (a zero gradient would divide 0 by 0)")


# ======================================================================================================================
# fairseq optimizer
# ======================================================================================================================


@dataclass
class AdagradClipConfig(FairseqDataclass):
    adagrad_clip: float = field(
        default=0.0,
        metadata={"help": "per-tensor clip c: a tensor whose gradient norm exceeds c takes a step scaled by "
                          "c/‖g‖ (the accumulator still gets the unclipped gradient); 0 = no clip (the original's "
                          "default; its scripts use 0.03)"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "L2 penalty added to the gradient before the clip and the accumulator"})
    adagrad_eps: float = field(default=1e-10, metadata={"help": "epsilon added to √sum (the original: 1e-10)"})
    adagrad_impl: ChoiceEnum(ADAGRAD_IMPLS) = field(
        default="foreach", metadata={"help": "foreach: multi-tensor torch ops; loop: per-tensor reference"})
    lr: List[float] = II("optimization.lr")


def optimizer_kwargs(cfg: AdagradClipConfig) -> Dict[str, Any]:
    """Constructor kwargs of ``AdagradClip`` for this config."""
    return dict(lr=cfg.lr[0] if isinstance(cfg.lr, Collection) else cfg.lr, weight_decay=cfg.weight_decay,
                eps=cfg.adagrad_eps, grad_clip=cfg.adagrad_clip, impl=str(cfg.adagrad_impl))


@register_optimizer("adagrad_clip", dataclass=AdagradClipConfig)
class FairseqAdagradClip(FairseqPerTensorOptimizer):
    """Adagrad with per-tensor clipping for fairseq: ``--optimizer adagrad_clip --adagrad-clip 0.03 --lr 0.07
    --lr-scheduler fixed --warmup-updates 32000`` is the adaptive-span enwik8 recipe."""

    def __init__(self, cfg: AdagradClipConfig, params: List[Any]) -> None:
        super().__init__(cfg)
        self._optimizer = AdagradClip(params, **self.optimizer_config)

    @property
    def optimizer_config(self) -> Dict[str, Any]:
        """Constructor kwargs of the wrapped optimizer (fairseq also uses them to override saved groups on resume)."""
        return optimizer_kwargs(self.cfg)


    @property
    def supports_memory_efficient_fp16(self) -> bool:
        """True: half parameters are updated through fp32 working copies with an fp32 accumulator."""
        return True
