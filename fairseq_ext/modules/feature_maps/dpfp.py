"""Deterministic parameter-free projection DPFP-nu (Schlag et al. 2021, Sec. 5.3, Eq. 20-21; spec fast_weights.md §1.3).

    r(x) = [relu(x), relu(-x)] in R^{2d}
    phi(x) = concat_{j=1..nu} ( r(x) ⊙ roll(r(x), j) )            D_phi = 2 d nu

The paper indexes the second factor by i + j; lmtool (and this module by default, ``roll_sign = +1``) rolls the other
way (``torch.roll(r, j)`` reads r_{i-j}). Both are the same products in a different order, applied identically to
queries and keys, so every dot product phi(q) . phi(k) is the same (``roll_sign = -1`` gives the paper's order).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DpfpFeatureMap(nn.Module):
    """x (..., d) -> phi(x) (..., 2 d nu), non-negative, fp32 at least."""

    def __init__(self, head_dim: int, n_roll: int = 2, roll_sign: int = 1) -> None:
        super().__init__()
        if n_roll < 1:
            raise ValueError(f"DPFP needs n_roll (nu) >= 1, got {n_roll}")
        if roll_sign not in (1, -1):
            raise ValueError(f"roll_sign must be +1 (lmtool) or -1 (the paper's index order), got {roll_sign}")
        self.head_dim = head_dim
        self.n_roll = n_roll
        self.roll_sign = roll_sign
        self.out_dim = 2 * head_dim * n_roll

    def new_draw(self) -> None:
        """Deterministic map: nothing to redraw."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        r = torch.cat([F.relu(x), F.relu(-x)], dim=-1)  # (..., 2d)
        rolled = torch.cat([r.roll(shifts=self.roll_sign * j, dims=-1) for j in range(1, self.n_roll + 1)],
                           dim=-1)  # (..., 2d nu)
        return r.repeat(*([1] * (r.dim() - 1)), self.n_roll) * rolled  # (..., 2d nu)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, n_roll={self.n_roll}, roll_sign={self.roll_sign}"
