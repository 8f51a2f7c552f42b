"""``lamb_torch``: LAMB in plain torch, in the two forms the Transformer-XL and SHA-RNN reproductions use.

LAMB: You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 Minutes", arXiv 1904.00962
(Algorithm 2 as in paper v3: no bias correction). Per parameter tensor w with gradient g, m and v starting at 0:

    m ← β₁·m + (1 − β₁)·g                      v ← β₂·v + (1 − β₂)·g²
    u = m / (√v + ε) + λ·w                       (L2 term inside the direction, before the trust ratio)
    r_w = min(‖w‖₂, max_weight_norm)             r_u = ‖u‖₂
    trust = r_w / (r_u + ε)                      trust_denominator = update_norm_plus_eps   (NVIDIA)
          = r_w / r_u                            trust_denominator = update_norm            (cybertronai, Smerity)
    trust = 1                                    if r_w = 0 or r_u = 0
    trust = max(trust, min_trust)                if min_trust > 0                          (Smerity's minimum trust)
    trust = 1                                    if adam_mode
    w ← w − lr · trust · u

The two reference implementations (read from their source):

* NVIDIA DeepLearningExamples ``PyTorch/LanguageModeling/Transformer-XL/pytorch/lamb.py`` (``Lamb`` and the
  TorchScript ``JITLamb``, derived from cybertronai/pytorch-lamb): betas (0.9, 0.999), eps 1e-6, weight decay 0,
  ``‖w‖`` clamped to [0, 10], ``trust = ‖w‖ / (‖u‖ + eps)``. ``Lamb(adam=True)`` forces trust 1 (``JITLamb``
  ignores ``adam``; NVIDIA's train.py never sets it). These are this optimizer's defaults.
* Smerity/pytorch-lamb (used by Smerity/sha-rnn): the cybertronai code (``trust = ‖w‖ / ‖u‖``, no eps) plus
  ``trust = max(trust, min_trust)``; sha-rnn passes weight decay 1.2e-6 and min_trust 0.25:
  ``--min-trust 0.25 --trust-denominator update_norm --weight-decay 1.2e-6``. The floor is applied *after* the
  "trust = 1 when a norm is zero" rule, so with min_trust ≤ 1 a zero tensor (sha-rnn's zero-initialised attention
  gates) takes a full ``lr·u`` step, not ``min_trust·lr·u``; only a ratio computed from two non-zero norms is
  floored.

``max_weight_norm ≤ 0`` (or ``inf``) disables the clamp. ``step`` in the state counts updates per tensor; no formula
uses it (there is no bias correction), it is kept for state-dict compatibility with the references.

Implementations (``impl`` / ``--lamb-impl``):

* ``foreach`` (default): multi-tensor ``torch._foreach_*`` ops per (device, dtype) bucket; all norms come from
  ``torch._foreach_norm`` and the trust ratios are computed as one tensor, so a step never syncs with the host.
* ``loop``: the per-tensor reference (same operations in the same order, one tensor at a time).
* ``apex`` (fairseq wrapper only): ``apex.optimizers.FusedLAMB`` configured as ``bias_correction=False``,
  ``grad_averaging=True``, ``adam_w_mode=True`` (λ·w added to the direction after the Adam ratio, as above),
  ``use_nvlamb=True`` (otherwise apex applies the trust ratio only to tensors with non-zero weight decay, i.e. plain
  Adam at λ = 0) and ``max_grad_norm=inf`` (apex otherwise divides every gradient by ‖g‖_global / max_grad_norm
  when the global norm exceeds it; its default 1.0). FusedLAMB has no weight-norm clamp, no eps in the trust
  denominator and no minimum trust, so it is accepted only with ``--max-weight-norm 0 --trust-denominator
  update_norm --min-trust 0`` (and ``--adam-mode`` only with weight decay 0); anything else is an error, never a
  silent change of algorithm. Further apex differences: it keeps the moments in the parameter dtype (fp16 moments
  for fp16 parameters), supports only fp16/fp32 parameters, counts ``step`` per group and overwrites ``p.grad``
  with the update. fairseq's own ``--optimizer lamb`` is FusedLAMB with apex's defaults (bias correction on,
  global grad-norm pre-scaling at 1.0, no ``use_nvlamb``: Adam for weight-decay-0 tensors), a different algorithm.

Precision: parameters in fp16/bf16 are updated through fp32 working copies with fp32 moments (kept fp32 across
``load_state_dict``), so the optimizer supports fairseq's ``--memory-efficient-fp16/bf16``. With ``--fp16`` /
``--bf16`` fairseq keeps fp32 master parameters; their flat master buffer would turn the per-tensor trust ratio into
one ratio for the whole model, so ``supports_flat_params`` is False and fairseq asks for ``--fp16-no-flatten-grads``.
Sparse gradients are rejected.
"""

import ast
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.optim import register_optimizer
from omegaconf import II
from torch import Tensor

from .per_tensor import FairseqPerTensorOptimizer, PerTensorOptimizer, Slot

TRUST_DENOMINATORS = ("update_norm_plus_eps", "update_norm")
TORCH_IMPLS = ("foreach", "loop")
LAMB_IMPLS = TORCH_IMPLS + ("apex",)

APEX_FIX = (
    "--lamb-impl apex needs NVIDIA apex built with its C++/CUDA extensions: clone https://github.com/NVIDIA/apex and "
    "run `pip install -v --no-build-isolation --config-settings '--build-option=--cpp_ext' "
    "--config-settings '--build-option=--cuda_ext' .` in it (the PyPI package named 'apex' is unrelated: never "
    "`pip install apex`). Or use --lamb-impl foreach, the same algorithm in plain torch."
)


# ======================================================================================================================
# the algorithm
# ======================================================================================================================


@dataclass(frozen=True)
class LambHyper:
    """One param group's hyperparameters."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    min_trust: float
    max_weight_norm: float
    trust_denominator: str
    adam_mode: bool

    @classmethod
    def from_group(cls, group: Dict[str, Any]) -> "LambHyper":
        beta1, beta2 = group["betas"]
        return cls(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                   min_trust=group["min_trust"], max_weight_norm=group["max_weight_norm"],
                   trust_denominator=group["trust_denominator"], adam_mode=group["adam_mode"])


def trust_ratio(weight_norm: Tensor, update_norm: Tensor, hp: LambHyper) -> Tensor:
    """LAMB trust ratio from ‖w‖ and ‖u‖ (0-dim for one tensor, (N,) for N tensors), elementwise."""
    if hp.adam_mode:
        return torch.ones_like(weight_norm)
    if 0 < hp.max_weight_norm < math.inf:
        weight_norm = weight_norm.clamp(max=hp.max_weight_norm)  # norms are >= 0: clamp(0, max) as in NVIDIA
    denom = update_norm + hp.eps if hp.trust_denominator == "update_norm_plus_eps" else update_norm
    zero = (weight_norm == 0) | (update_norm == 0)
    trust = torch.where(zero, torch.ones_like(weight_norm), weight_norm / denom)  # 0/0 lanes are masked out
    if hp.min_trust > 0:
        trust = trust.clamp(min=hp.min_trust)  # after the zero rule, as in Smerity/pytorch-lamb
    return trust


def lamb_loop(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
              exp_avg_sqs: Sequence[Tensor], hp: LambHyper) -> None:
    """Reference LAMB step, one tensor at a time; updates params and moments in place."""
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        m.mul_(hp.beta1).add_(g, alpha=1 - hp.beta1)
        v.mul_(hp.beta2).addcmul_(g, g, value=1 - hp.beta2)
        u = m / (v.sqrt() + hp.eps)
        if hp.weight_decay != 0:
            u.add_(p, alpha=hp.weight_decay)
        trust = trust_ratio(torch.linalg.vector_norm(p), torch.linalg.vector_norm(u), hp)
        p.add_(u * (trust * -hp.lr))


def lamb_foreach(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                 hp: LambHyper) -> None:
    """Multi-tensor LAMB step over tensors of one device and dtype; no host syncs."""
    torch._foreach_mul_(exp_avgs, hp.beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - hp.beta1)
    torch._foreach_mul_(exp_avg_sqs, hp.beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - hp.beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, hp.eps)
    updates = torch._foreach_div(exp_avgs, denom)
    del denom
    if hp.weight_decay != 0:
        torch._foreach_add_(updates, params, alpha=hp.weight_decay)
    weight_norms = torch.stack(torch._foreach_norm(params))  # (N,)
    update_norms = torch.stack(torch._foreach_norm(updates))  # (N,)
    scales = trust_ratio(weight_norms, update_norms, hp) * -hp.lr  # (N,)
    torch._foreach_mul_(updates, list(scales.unbind()))
    torch._foreach_add_(params, updates)


# ======================================================================================================================
# torch optimizer
# ======================================================================================================================


class Lamb(PerTensorOptimizer):
    """LAMB (see the module docstring for the update and the two variants); usable without fairseq.

    Defaults are the NVIDIA Transformer-XL variant. ``impl``: "foreach" (multi-tensor, no host syncs) or "loop"
    (per-tensor reference).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, min_trust: float = 0.0, max_weight_norm: float = 10.0,
                 trust_denominator: str = "update_norm_plus_eps", adam_mode: bool = False,
                 impl: str = "foreach") -> None:
        trust_denominator, impl = str(trust_denominator), str(impl)  # fairseq passes its choice enums
        check_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_trust=min_trust,
                              trust_denominator=trust_denominator)
        if impl not in TORCH_IMPLS:
            raise ValueError(f"impl must be one of {TORCH_IMPLS}, got {impl!r} (apex is chosen in the fairseq "
                             f"wrapper: --lamb-impl apex)")
        defaults = dict(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, weight_decay=weight_decay,
                        min_trust=min_trust, max_weight_norm=max_weight_norm, trust_denominator=trust_denominator,
                        adam_mode=bool(adam_mode))
        super().__init__(params, defaults)
        self.impl = impl

    STATE_KEYS = ("exp_avg", "exp_avg_sq")

    def init_state(self, key: str, param: Tensor, group: Dict[str, Any], dtype: torch.dtype) -> Tensor:
        return torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)

    def update(self, bucket: List[Slot], group: Dict[str, Any]) -> None:
        tensors = ([s.work_param for s in bucket], [s.grad for s in bucket], [s.state["exp_avg"] for s in bucket],
                   [s.state["exp_avg_sq"] for s in bucket])
        (lamb_foreach if self.impl == "foreach" else lamb_loop)(*tensors, LambHyper.from_group(group))


def check_hyperparameters(*, lr: float, betas: Sequence[float], eps: float, weight_decay: float, min_trust: float,
                          trust_denominator: str) -> None:
    if lr < 0:
        raise ValueError(f"invalid learning rate {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two values in [0, 1), got {betas}")
    if eps < 0:
        raise ValueError(f"invalid eps {eps}")
    if weight_decay < 0:
        raise ValueError(f"invalid weight decay {weight_decay}")
    if min_trust < 0:
        raise ValueError(f"invalid min_trust {min_trust}")
    if trust_denominator not in TRUST_DENOMINATORS:
        raise ValueError(f"trust_denominator must be one of {TRUST_DENOMINATORS}, got {trust_denominator!r}")


# ======================================================================================================================
# fairseq optimizer
# ======================================================================================================================


@dataclass
class LambConfig(FairseqDataclass):
    lamb_betas: str = field(default="(0.9, 0.999)", metadata={"help": "betas (β1, β2) for LAMB"})
    lamb_eps: float = field(
        default=1e-6, metadata={"help": "epsilon added to √v (and to ‖u‖, see --trust-denominator)"})
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "L2 weight decay added to the update direction before the trust ratio (sha-rnn: 1.2e-6)"})
    min_trust: float = field(
        default=0.0, metadata={"help": "floor of the trust ratio (Smerity/sha-rnn: 0.25); 0 = no floor (NVIDIA)"})
    max_weight_norm: float = field(
        default=10.0, metadata={"help": "‖w‖ is clamped to this in the trust ratio; <= 0 disables the clamp"})
    trust_denominator: ChoiceEnum(TRUST_DENOMINATORS) = field(
        default="update_norm_plus_eps",
        metadata={"help": "trust = ‖w‖/(‖u‖+eps) (update_norm_plus_eps: NVIDIA Lamb/JITLamb) or ‖w‖/‖u‖ "
                          "(update_norm: cybertronai, Smerity/sha-rnn, apex FusedLAMB)"})
    adam_mode: bool = field(
        default=False,
        metadata={"help": "trust ratio 1 for every tensor (NVIDIA Lamb(adam=True)): Adam without bias correction"})
    lamb_impl: ChoiceEnum(LAMB_IMPLS) = field(
        default="foreach",
        metadata={"help": "foreach: multi-tensor torch ops; loop: per-tensor reference; apex: "
                          "apex.optimizers.FusedLAMB (see fairseq_ext/optim/lamb.py)"})
    lr: List[float] = II("optimization.lr")


def parse_betas(betas: Any) -> Tuple[float, float]:
    """``"(0.9, 0.999)"`` (fairseq's CLI form) or a 2-sequence -> (β1, β2)."""
    values = ast.literal_eval(betas) if isinstance(betas, str) else betas
    if not isinstance(values, Collection) or len(values) != 2:
        raise ValueError(f"--lamb-betas must be two numbers like '(0.9, 0.999)', got {betas!r}")
    return float(values[0]), float(values[1])


def apex_incompatibilities(cfg: LambConfig) -> List[str]:
    """Settings FusedLAMB cannot reproduce, each with the flag that makes the config explicit."""
    problems = []
    if 0 < cfg.max_weight_norm < math.inf:
        problems.append(f"FusedLAMB does not clamp ‖w‖ (max_weight_norm={cfg.max_weight_norm}): pass "
                        f"--max-weight-norm 0")
    if str(cfg.trust_denominator) != "update_norm":
        problems.append("FusedLAMB's trust ratio is ‖w‖/‖u‖ without eps: pass --trust-denominator update_norm")
    if cfg.min_trust > 0:
        problems.append(f"FusedLAMB has no minimum trust (min_trust={cfg.min_trust}): use --lamb-impl foreach")
    if cfg.adam_mode and cfg.weight_decay != 0:
        problems.append("FusedLAMB applies the trust ratio to every tensor with weight decay, so --adam-mode needs "
                        "--weight-decay 0 there: use --lamb-impl foreach")
    return problems


def build_apex_lamb(params: Iterable, config: Dict[str, Any]) -> torch.optim.Optimizer:
    """``apex.optimizers.FusedLAMB(params, **config)``, with the fix named when apex or its extensions are missing."""
    try:
        from apex.optimizers import FusedLAMB
    except ImportError as err:
        raise ImportError(f"{err}. {APEX_FIX}") from err
    try:
        return FusedLAMB(params, **config)
    except RuntimeError as err:  # "apex.optimizers.FusedLAMB requires cuda extensions"
        raise RuntimeError(f"{err}. {APEX_FIX}") from err


def optimizer_kwargs(cfg: LambConfig) -> Dict[str, Any]:
    """Constructor kwargs of ``Lamb``, or of ``FusedLAMB`` configured as the NVIDIA update for --lamb-impl apex."""
    common = dict(lr=cfg.lr[0] if isinstance(cfg.lr, Collection) else cfg.lr, betas=parse_betas(cfg.lamb_betas),
                  eps=cfg.lamb_eps, weight_decay=cfg.weight_decay)
    if str(cfg.lamb_impl) == "apex":
        return dict(common, bias_correction=False, grad_averaging=True, adam_w_mode=True, max_grad_norm=math.inf,
                    use_nvlamb=not cfg.adam_mode)
    return dict(common, min_trust=cfg.min_trust, max_weight_norm=cfg.max_weight_norm,
                trust_denominator=str(cfg.trust_denominator), adam_mode=cfg.adam_mode, impl=str(cfg.lamb_impl))


@register_optimizer("lamb_torch", dataclass=LambConfig)
class FairseqLamb(FairseqPerTensorOptimizer):
    """LAMB for fairseq: ``--optimizer lamb_torch`` (NVIDIA Transformer-XL variant by default; SHA-RNN:
    ``--weight-decay 1.2e-6 --min-trust 0.25 --trust-denominator update_norm``)."""

    def __init__(self, cfg: LambConfig, params: List[Any]) -> None:
        super().__init__(cfg)
        if str(cfg.lamb_impl) == "apex":
            problems = apex_incompatibilities(cfg)
            if problems:
                raise ValueError("--lamb-impl apex cannot run this LAMB configuration:\n  " + "\n  ".join(problems))
            self._optimizer = build_apex_lamb(params, self.optimizer_config)
        else:
            self._optimizer = Lamb(params, **self.optimizer_config)

    @property
    def optimizer_config(self) -> Dict[str, Any]:
        """Constructor kwargs of the wrapped optimizer (fairseq also uses them to rebuild it, e.g. for ZeRO)."""
        return optimizer_kwargs(self.cfg)


    @property
    def supports_memory_efficient_fp16(self) -> bool:
        """True for the torch implementations (fp32 working copies and moments); apex keeps half moments."""
        return str(self.cfg.lamb_impl) != "apex"
