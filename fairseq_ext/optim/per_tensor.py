"""Base for optimizers whose update is decided per parameter tensor (LAMB's trust ratio, Adagrad's per-tensor clip).

``PerTensorOptimizer.step`` gathers, per param group, every parameter with a gradient as a ``Slot``: the working
tensor (fp32 copy for fp16/bf16 parameters), the gradient in that dtype, the optimizer state tensors named by
``STATE_KEYS`` (kept in the working dtype, also across ``load_state_dict``) and the tensor's step count. Slots are
bucketed by (device, dtype), the unit of a multi-tensor ``torch._foreach_*`` update, and handed to the subclass's
``update(bucket, group)``; half parameters get their working copy written back. Sparse gradients are rejected.
``FairseqPerTensorOptimizer`` is the fairseq side they share.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from fairseq.optim import FairseqOptimizer
from torch import Tensor

HALF_DTYPES = (torch.float16, torch.bfloat16)


def work_dtype(param: Tensor) -> torch.dtype:
    """The dtype the step computes in for this parameter: fp32 for fp16/bf16, the parameter's own otherwise."""
    return torch.float32 if param.dtype in HALF_DTYPES else param.dtype


@dataclass
class Slot:
    """One parameter with a gradient, as the step sees it."""

    param: Tensor
    work_param: Tensor
    grad: Tensor
    state: Dict[str, Tensor]
    step: int


def buckets(slots: List[Slot]) -> List[List[Slot]]:
    """Slots grouped by (device, working dtype), the unit a multi-tensor op (and a stacked norm vector) works on."""
    groups: Dict[Tuple[torch.device, torch.dtype], List[Slot]] = defaultdict(list)
    for s in slots:
        groups[(s.work_param.device, s.work_param.dtype)].append(s)
    return list(groups.values())


def fill_missing_group_keys(param_groups: List[Dict[str, Any]], defaults: Dict[str, Any]) -> None:
    """Hyperparameters a saved group lacks (state written by another implementation) come from the defaults."""
    for group in param_groups:
        for key, value in defaults.items():
            group.setdefault(key, value)


class PerTensorOptimizer(torch.optim.Optimizer):
    """Subclasses set ``STATE_KEYS`` and implement ``init_state`` and ``update``."""

    STATE_KEYS: Tuple[str, ...] = ()
    supports_memory_efficient_fp16 = True  # half parameters are updated through fp32 working copies
    supports_flat_params = False  # the update is decided per tensor

    def init_state(self, key: str, param: Tensor, group: Dict[str, Any], dtype: torch.dtype) -> Tensor:
        """The initial value of state tensor ``key`` for ``param`` (in ``dtype``)."""
        raise NotImplementedError

    def update(self, bucket: List[Slot], group: Dict[str, Any]) -> None:
        """Update the working parameters and state of one (device, dtype) bucket in place."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            slots = [self._slot(p, group) for p in group["params"] if p.grad is not None]
            for bucket in buckets(slots):
                self.update(bucket, group)
            for s in slots:
                if s.work_param.dtype != s.param.dtype:  # a half parameter's fp32 working copy (else: a view of it)
                    s.param.copy_(s.work_param)
        return loss

    def _slot(self, param: Tensor, group: Dict[str, Any]) -> Slot:
        """The parameter's working tensors and state (created, or restored to the working dtype, on demand)."""
        if param.grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (e.g. "
                               f"nn.Embedding(sparse=True)); use dense gradients or torch.optim.SparseAdam for those "
                               f"parameters")
        dtype = work_dtype(param)
        state = self.state[param]
        for key in self.STATE_KEYS:
            if key not in state:
                state[key] = self.init_state(key, param, group, dtype)
            elif state[key].dtype != dtype or state[key].device != param.device:
                state[key] = state[key].to(device=param.device, dtype=dtype)
        state["step"] = int(state.get("step", 0)) + 1  # torch's own optimizers may have saved a tensor step
        work_param = param.detach() if param.dtype == dtype else param.detach().to(dtype)
        return Slot(param=param, work_param=work_param, grad=param.grad.detach().to(dtype),
                    state={key: state[key] for key in self.STATE_KEYS}, step=state["step"])

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch's loader casts state to the parameter dtype; keep it in the working dtype (fp32 for half
        parameters) at full saved precision, and fill hyperparameters the saved groups lack from the defaults."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            for key in self.STATE_KEYS:
                if work_dtype(param) != param.dtype and torch.is_tensor(saved.get(key)):
                    self.state[param][key] = saved[key].to(device=param.device, dtype=work_dtype(param))
        fill_missing_group_keys(self.param_groups, self.defaults)


class FairseqPerTensorOptimizer(FairseqOptimizer):
    """fairseq wrapper of a per-tensor optimizer: no flat fp32 master buffer (it would turn the per-tensor decision
    into one for the whole model, so ``--fp16`` asks for ``--fp16-no-flatten-grads``), and saved groups that lack a
    hyperparameter (state written by another implementation) get the wrapped optimizer's defaults."""

    @property
    def supports_flat_params(self) -> bool:
        return False

    def load_state_dict(self, state_dict: Dict[str, Any], optimizer_overrides: Optional[Dict[str, Any]] = None
                        ) -> None:
        super().load_state_dict(state_dict, optimizer_overrides)
        fill_missing_group_keys(self.param_groups, self.optimizer.defaults)
