"""FAVOR+ positive random features of the Performer (Choromanski et al. 2021, Lemma 1 "hyperbolic" features with
orthogonal random projections; Schlag et al. 2021, Sec. 5.2; spec fast_weights.md §1.3).

With a random matrix Omega (d, m) and u = x Omega:

    phi(x) = (2m)^(-1/2) ( [exp(u - ||x||^2 / 2), exp(-u - ||x||^2 / 2)] + 1e-4 )        D_phi = 2m

phi(q) . phi(k) approximates exp(q . k) (no 1/d^(1/4) pre-scaling, no max-subtraction, as lmtool).

Omega: block-orthogonal. Reference construction (default): m random features w_i in R^d, taken from d x d orthogonal
blocks (QR of Gaussian blocks, on CPU), each row rescaled to the norm of a Gaussian vector (chi-distributed), Omega =
[w_1 ... w_m]. ``orthogonal_compat`` reproduces lmtool's transposed call (rows = d, cols = m): m x m orthogonal
blocks stacked to d rows and the chi scaling applied per input coordinate.

Omega is a persistent buffer (in the state dict, so evaluation of a checkpoint is reproducible). ``new_draw()``
redraws it while training (the attention calls it once per forward, so q and k share one draw, per layer, shared by
all heads and batch rows, as lmtool's ``redraw = self.training``); in eval mode the last draw is kept.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from fairseq_ext.ops.fast_weights import autocast_off

FAVOR_EPS = 1e-4


def orthogonal_gaussian(rows: int, cols: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """(rows, cols) fp32 CPU: rows taken from cols x cols orthogonal blocks (QR of Gaussian blocks; the last block
    truncated), row r rescaled by the norm of an independent Gaussian vector in R^cols."""
    blocks = []
    for start in range(0, rows, cols):
        gaussian = torch.randn(cols, cols, generator=generator)  # (cols, cols)
        q, _ = torch.linalg.qr(gaussian)  # (cols, cols) orthogonal
        blocks.append(q.t()[:min(cols, rows - start)])  # rows of an orthogonal matrix
    matrix = torch.cat(blocks, dim=0)  # (rows, cols), unit rows
    norms = torch.randn(rows, cols, generator=generator).norm(dim=1)  # (rows,) chi(cols)
    return norms[:, None] * matrix  # (rows, cols)


class FavorFeatureMap(nn.Module):
    """x (..., d) -> phi(x) (..., 2m), positive, fp32 at least. Buffer ``omega`` (d, m)."""

    def __init__(self, head_dim: int, num_features: int = 16, orthogonal_compat: bool = False,
                 redraw: bool = True) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"FAVOR+ needs performer_proj_dim (m) >= 1, got {num_features}")
        self.head_dim = head_dim
        self.num_features = num_features
        self.orthogonal_compat = orthogonal_compat
        self.redraw = redraw
        self.out_dim = 2 * num_features
        self.register_buffer("omega", torch.zeros(head_dim, num_features))
        self.draw_()

    @torch.no_grad()
    def draw_(self) -> None:
        """A fresh Omega (d, m) into the buffer (global RNG, QR on CPU); no-op on the meta device."""
        if self.omega.is_meta:
            return
        if self.orthogonal_compat:  # lmtool: gaussian_orthogonal_random_matrix(nb_rows=d, nb_columns=m), x @ it
            omega = orthogonal_gaussian(self.head_dim, self.num_features)  # (d, m)
        else:  # reference: m features of dim d, x @ W^T
            omega = orthogonal_gaussian(self.num_features, self.head_dim).t()  # (d, m)
        self.omega.copy_(omega.to(self.omega.device, self.omega.dtype))

    def new_draw(self) -> None:
        """Called once per attention forward: redraw while training (if ``redraw``), keep Omega in eval."""
        if self.training and self.redraw:
            self.draw_()

    def forward(self, x: Tensor) -> Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        x = x.to(acc)
        with autocast_off(x.device):  # u feeds exp() unshifted: an autocast half matmul would round it first
            u = torch.matmul(x, self.omega.to(acc))  # (..., m)
        half_norm = 0.5 * x.pow(2).sum(-1, keepdim=True)  # (..., 1) ||x||^2 / 2
        features = torch.cat([torch.exp(u - half_norm), torch.exp(-u - half_norm)], dim=-1)  # (..., 2m)
        return (features + FAVOR_EPS) / math.sqrt(2 * self.num_features)  # (..., 2m)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_features={self.num_features}, "
                f"orthogonal_compat={self.orthogonal_compat}, redraw={self.redraw}")
