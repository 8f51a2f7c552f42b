"""Feature maps phi of linear attention / fast weight programmers (Schlag et al. 2021, Sec. 5; spec fast_weights.md
§1.3) as small modules with one interface: ``forward(x (..., d)) -> phi(x) (..., out_dim)`` in fp32 at least,
``out_dim`` (D_phi) and ``new_draw()`` (called once per attention forward; only FAVOR+ redraws, while training).

``build_feature_map(kind, head_dim, ...)``: ``linear`` (ELU+1, D_phi = d), ``performer`` (FAVOR+, 2m), ``dpfp``
(DPFP-nu, 2 d nu). ``sum_normalize`` is the delta rule's phi'(x) = phi(x) / sum_j phi(x)_j (Sec. 4.2).
"""
from __future__ import annotations

from typing import Union

from torch import Tensor

from .dpfp import DpfpFeatureMap
from .elu import EluFeatureMap
from .favor import FAVOR_EPS, FavorFeatureMap, orthogonal_gaussian

FeatureMap = Union[EluFeatureMap, FavorFeatureMap, DpfpFeatureMap]
KINDS = ("linear", "performer", "dpfp")


def build_feature_map(kind: str, head_dim: int, performer_proj_dim: int = 16, dpfp_n_roll: int = 2,
                      orthogonal_compat: bool = False) -> FeatureMap:
    if kind == "linear":
        return EluFeatureMap(head_dim)
    if kind == "performer":
        return FavorFeatureMap(head_dim, performer_proj_dim, orthogonal_compat)
    if kind == "dpfp":
        return DpfpFeatureMap(head_dim, dpfp_n_roll)
    raise ValueError(f"unknown feature map {kind!r}; choose one of {KINDS}")


def sum_normalize(x: Tensor) -> Tensor:
    """x (..., D) -> x / sum_j x_j (no epsilon, as lmtool 24/25/26). ELU+1 and FAVOR+ (1e-4 offset) are strictly
    positive; DPFP is only non-negative: an input with a single nonzero coordinate has phi = 0 and gives NaN here,
    exactly as in lmtool (kept for parity; such inputs have measure zero)."""
    return x / x.sum(-1, keepdim=True)  # (..., D)


__all__ = ["EluFeatureMap", "FavorFeatureMap", "DpfpFeatureMap", "FeatureMap", "build_feature_map",
           "sum_normalize", "orthogonal_gaussian", "FAVOR_EPS", "KINDS"]
