"""optim/bounds.py: declared parameter bounds are clamped on the model and on fairseq's fp32 master copies."""
from types import SimpleNamespace

import pytest
import torch
from fairseq.optim.fp16_optimizer import FP16Optimizer
from torch import nn

from fairseq_ext.optim.bounds import clamp_parameters, master_copies


class Bounded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.free = nn.Parameter(torch.tensor([5.0, -5.0, 3.0]))
        self.z = nn.Parameter(torch.tensor([0.5, 0.25]))

    def parameter_bounds(self):
        return [(self.z, 0.0, 1.0)]


def test_plain_optimizer_clamps_only_declared_parameters():
    model = Bounded()
    with torch.no_grad():
        model.z.copy_(torch.tensor([1.5, -0.5]))
    assert clamp_parameters(model, SimpleNamespace()) == 1
    assert model.z.tolist() == [1.0, 0.0] and model.free.tolist() == [5.0, -5.0, 3.0]


@pytest.mark.parametrize("flatten", [True, False])
def test_fp32_master_copies_are_clamped(flatten):
    model = Bounded()
    params = list(model.parameters())
    cfg = SimpleNamespace(pipeline_model_parallel=False, distributed_no_spawn=False)
    masters = FP16Optimizer.build_fp32_params(cfg, params, flatten=flatten) if not flatten else \
        {"cpu": _flat_master(params)}
    optimizer = SimpleNamespace(fp16_params=params, fp32_params=masters)
    views = master_copies(optimizer)
    views[id(model.z)].copy_(torch.tensor([1.25, -0.75]))  # the master drifted out of bounds after a step
    views[id(model.free)].copy_(torch.tensor([9.0, 9.0, 9.0]))
    with torch.no_grad():
        model.z.copy_(torch.tensor([1.25, -0.75]))
    clamp_parameters(model, optimizer)
    assert views[id(model.z)].tolist() == [1.0, 0.0] and model.z.tolist() == [1.0, 0.0]
    assert views[id(model.free)].tolist() == [9.0, 9.0, 9.0]  # undeclared parameters untouched
    if flatten:  # the views alias the flat master in FP16Optimizer's layout (parameters in order)
        assert masters["cpu"].data.tolist() == [9.0, 9.0, 9.0, 1.0, 0.0]
    else:
        assert masters[1].data.tolist() == [1.0, 0.0]


def _flat_master(params):
    """FP16Optimizer.build_fp32_params(flatten=True) asks CUDA for its device; the same layout on CPU."""
    flat = torch.cat([p.data.reshape(-1).float() for p in params])
    return nn.Parameter(flat)
