"""ELU+1 feature map of the linear transformer (Katharopoulos et al. 2020, Eq. 7; Schlag et al. 2021, Sec. 5.1 "Linear";
spec fast_weights.md §1.3): phi(x) = elu(x) + 1 elementwise, D_phi = d (the head dim)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class EluFeatureMap(nn.Module):
    """x (..., d) -> phi(x) (..., d), positive, computed in fp32 at least (fp64 stays fp64)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.out_dim = head_dim

    def new_draw(self) -> None:
        """Deterministic map: nothing to redraw (see FavorFeatureMap)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        return F.elu(x) + 1.0  # (..., d)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}"
