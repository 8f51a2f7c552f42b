"""Linear attention as a fast weight programmer (Schlag, Irie, Schmidhuber 2021, arXiv 2102.11174; spec
fast_weights.md §1.3-§1.5), one layer, batch-first and pure: ``forward(x, state) -> (y, state')``.

Per head h and token t (d = head_dim, phi the feature map, D_phi its dimension):

    q_t, k_t, v_t = W_q x_t, W_k x_t, W_v x_t                       (bias-free, (H d, C) each)
    sum rule   (Eq. 6-7):   phi(q_t), phi(k_t) raw;  W_t = W_{t-1} + v_t ⊗ phi(k_t)
    delta rule (Eq. 15-17): phi'(x) = phi(x) / sum_j phi(x)_j for q and k (Sec. 4.2), beta_t = sigmoid(w_beta x_t)
                            (one scalar per head, ``beta_proj`` (H, C)); W_t = W_{t-1} + beta_t (v_t - W_{t-1} phi'(k_t))
                            ⊗ phi'(k_t)
    read:                   y_t = (1/sqrt(d)) W_t phi(q_t), divided by z_t · phi(q_t) + 1e-5 under ``output`` /
                            ``full`` normalisation (§1.5; ``full`` also normalises the retrieval key)
    out = W_o [y^1; ...; y^H]                                          (bias-free (C, H d))

The scale is 1/sqrt(d_head) whatever D_phi is (lmtool). The recurrence itself is ``ops.fast_weights`` (token
recurrence or chunkwise-parallel form, ``attn_impl``); the state is a ``FastWeightState`` (B, H, D_phi, d) plus the
key sum for the normalised variants, accumulated in fp32 at least. FAVOR+ draws a new Omega once per training
forward (shared by q and k of this layer).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fairseq_ext.modules.feature_maps import build_feature_map, sum_normalize
from fairseq_ext.ops.fast_weights import EPS, IMPLS, fast_weight_attention, validate_rule
from fairseq_ext.state import FastWeightState


class FastWeightSelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, feature_map: str = "linear",
                 update_rule: str = "delta", normalize: str = "none", performer_proj_dim: int = 16,
                 performer_orthogonal_compat: bool = False, dpfp_n_roll: int = 2, attn_impl: str = "auto",
                 chunk_size: int = 64, lmtool_quadratic: bool = False) -> None:
        """lmtool_quadratic: lmtool's quadratic sum-rule layers (attn_type 4/5/6) scale the scores by 1/sqrt(d) and
        then divide by their row sum + 1e-5, so the scale cancels except inside the epsilon: output scale 1 and
        denominator epsilon 1e-5 sqrt(d) reproduce them exactly."""
        super().__init__()
        validate_rule(update_rule, normalize)
        if attn_impl not in IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r} for fast-weight attention; choose one of {IMPLS}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.update_rule = update_rule
        self.normalize = normalize
        self.attn_impl = attn_impl
        self.chunk_size = chunk_size
        if lmtool_quadratic and (update_rule, normalize) != ("sum", "output"):
            raise ValueError("lmtool's quadratic layers (attn_type 4/5/6) are the output-normalised sum rule")
        self.scale = 1.0 if lmtool_quadratic else 1.0 / math.sqrt(head_dim)  # independent of D_phi (lmtool)
        self.eps = EPS * math.sqrt(head_dim) if lmtool_quadratic else EPS
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=False)
        self.k_proj = nn.Linear(embed_dim, inner, bias=False)
        self.v_proj = nn.Linear(embed_dim, inner, bias=False)
        self.beta_proj = nn.Linear(embed_dim, num_heads, bias=False) if update_rule == "delta" else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=False)
        self.feature_map = build_feature_map(feature_map, head_dim, performer_proj_dim, dpfp_n_roll,
                                             performer_orthogonal_compat)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, T, H d) -> (B, H, T, d)

    def features(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        """x (B, T, C) -> (phi(q), phi(k) (B, H, T, D_phi) fp32+, sum-normalised for the delta rule; v (B, H, T, d);
        beta (B, H, T) or None). Does not redraw FAVOR+ features."""
        q = self.feature_map(self._heads(self.q_proj(x)))  # (B, H, T, D_phi)
        k = self.feature_map(self._heads(self.k_proj(x)))  # (B, H, T, D_phi)
        v = self._heads(self.v_proj(x))  # (B, H, T, d)
        beta = None
        if self.beta_proj is not None:
            q, k = sum_normalize(q), sum_normalize(k)
            beta = torch.sigmoid(self.beta_proj(x).to(q.dtype)).transpose(1, 2)  # (B, T, H) -> (B, H, T)
        return q, k, v, beta

    def forward(self, x: Tensor, state: Optional[FastWeightState] = None) -> Tuple[Tensor, FastWeightState]:
        """x (B, T, C); state after the previous tokens (None: zero fast weights) -> (y (B, T, C), new state)."""
        b, t, _ = x.shape
        self.feature_map.new_draw()  # FAVOR+: a fresh Omega per training forward
        q, k, v, beta = self.features(x)
        out, new_state = fast_weight_attention(q, k, v.to(q.dtype), beta, state, rule=self.update_rule,
                                               normalize=self.normalize, scale=self.scale, eps=self.eps,
                                               keys_normalized=self.beta_proj is not None,  # sum-normalised, sigmoid
                                               impl=self.attn_impl,
                                               chunk_size=self.chunk_size)  # (B, H, T, d)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # (B, T, H d)
        return self.out_proj(out.to(x.dtype)), new_state

    def state_size(self) -> int:
        """Numbers in one batch row's fast-weight state: H D_phi d (+ H D_phi for the key sum when normalised)."""
        size = self.num_heads * self.feature_map.out_dim * self.head_dim
        return size + (self.num_heads * self.feature_map.out_dim if self.normalize != "none" else 0)
