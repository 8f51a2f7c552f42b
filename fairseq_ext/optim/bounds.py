"""Parameter bounds enforced after every optimizer step (e.g. adaptive-span z in [0, 1], spec adaptive_span.md
§1.4: "clamped after every optimizer step, on the fp32 master").

A module declares its bounded parameters with ``parameter_bounds() -> [(parameter, low, high), ...]``;
``clamp_parameters(model, optimizer)`` (called by ``streaming_lm.optimizer_step``) clamps each such parameter in
place **and** its fp32 master copy when fairseq's ``FP16Optimizer`` keeps one (``--fp16`` / ``--bf16``, flat or
``--fp16-no-flatten-grads``): clamping only the model copy would let the master drift outside the bounds and be
copied back at the next step. Never done inside ``forward``.
"""
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

Bound = Tuple[nn.Parameter, float, float]


def collect_bounds(model: nn.Module) -> List[Bound]:
    """(parameter, low, high) of every module that defines ``parameter_bounds()``."""
    bounds: List[Bound] = []
    for module in model.modules():
        if callable(getattr(module, "parameter_bounds", None)):
            bounds.extend(module.parameter_bounds())
    return bounds


def master_copies(optimizer: object) -> Dict[int, Tensor]:
    """id(model parameter) -> its fp32 master tensor (a view into the flat master when flattened); empty when the
    optimizer updates the model parameters themselves (fp32 training, AMP, memory-efficient fp16)."""
    fp16_params: Optional[Iterable[Tensor]] = getattr(optimizer, "fp16_params", None)
    fp32_params = getattr(optimizer, "fp32_params", None)
    if fp16_params is None or fp32_params is None:
        return {}
    fp16_params = list(fp16_params)
    if isinstance(fp32_params, (list, tuple)):  # --fp16-no-flatten-grads: one master per parameter
        return {id(p): p32.data for p, p32 in zip(fp16_params, fp32_params)}
    flats = list(fp32_params.values()) if isinstance(fp32_params, dict) else [fp32_params]
    if len(flats) != 1:  # pipeline-parallel flat masters (one per device) are not laid out by model order
        raise NotImplementedError("parameter bounds with one flat fp32 master per device (pipeline parallel) are "
                                  "not supported; use --fp16-no-flatten-grads")
    flat, views, offset = flats[0].data, {}, 0
    for p in fp16_params:
        views[id(p)] = flat[offset:offset + p.numel()].view_as(p)  # same layout as FP16Optimizer.build_fp32_params
        offset += p.numel()
    return views


@torch.no_grad()
def clamp_parameters(model: nn.Module, optimizer: object) -> int:
    """Clamp every declared parameter (and its fp32 master copy) to its bounds; returns how many were clamped."""
    bounds = collect_bounds(model)
    if not bounds:
        return 0
    masters = master_copies(optimizer)
    for param, low, high in bounds:
        param.clamp_(low, high)
        master = masters.get(id(param))
        if master is not None:
            master.clamp_(low, high)
    return len(bounds)
