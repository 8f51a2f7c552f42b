"""One fused ``qkv_proj`` (rows [W_q ; W_k ; W_v]) from checkpoints that stored three projections."""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor


def fuse_qkv(state_dict: Dict[str, Tensor], name: str) -> Dict[str, Tensor]:
    """``{name}.{q,k,v}_proj.weight`` (H D, C) each -> ``{name}.qkv_proj.weight`` (3 H D, C), in place."""
    old = [f"{name}.{p}_proj.weight" for p in "qkv"]
    if all(key in state_dict for key in old):
        state_dict[f"{name}.qkv_proj.weight"] = torch.cat([state_dict.pop(key) for key in old], dim=0)
    return state_dict
