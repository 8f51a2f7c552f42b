"""Adaptive input embedding as Transformer-XL uses it (Baevski & Auli 2019; Dai et al. 2019; spec §3).

The vocabulary is cut at ``cutoffs`` into a head and clusters; cluster i embeds in d_i = d_embed / div_val^i and
is projected to the model dim C by ``emb_projs[i]`` (C, d_i). Every output is scaled by sqrt(C):

    e(x) = sqrt(C) * P_i E_i[x - l_i]     for x in cluster i = [l_i, r_i)

With div_val = 1 there is one full-vocabulary table, projected only when d_embed != C. No padding index (the
original has none).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cluster_bounds(vocab_size: int, cutoffs: Sequence[int]) -> List[Tuple[int, int]]:
    """[(l_0, r_0), ...]: head [0, cutoffs[0]) then the clusters up to the vocabulary size."""
    cutoffs = list(cutoffs)
    if any(b <= a for a, b in zip(cutoffs, cutoffs[1:])) or (cutoffs and cutoffs[0] <= 0):
        raise ValueError(f"adaptive cutoffs must be positive and strictly increasing, got {cutoffs}")
    if cutoffs and cutoffs[-1] >= vocab_size:
        raise ValueError(f"adaptive cutoffs must be below the vocabulary size {vocab_size}, got {cutoffs}: the "
                         f"last cluster would be empty (drop the cutoffs >= {vocab_size} or use a bigger dictionary)")
    ends = [0] + cutoffs + [vocab_size]
    return list(zip(ends[:-1], ends[1:]))


def cluster_dims(embed_dim: int, num_clusters: int, div_val: int) -> List[int]:
    """d_i = embed_dim // div_val^i for the head (i = 0) and each cluster."""
    if div_val < 1:
        raise ValueError(f"div_val (adaptive factor) must be >= 1, got {div_val}")
    dims = [embed_dim // div_val ** i for i in range(num_clusters)]
    if min(dims) < 1:
        raise ValueError(f"embedding dim {embed_dim} divided by {div_val}^i leaves a cluster with dim 0; use a smaller "
                         f"div_val or fewer cutoffs")
    return dims


class XLAdaptiveInput(nn.Module):
    """tokens (B, T) -> embeddings (B, T, C). Parameters: ``emb_layers.{i}.weight`` (V_i, d_i) and
    ``emb_projs.{i}`` (C, d_i) (present for every cluster when div_val > 1, else only if d_embed != C)."""

    def __init__(self, vocab_size: int, embed_dim: int, model_dim: int, cutoffs: Sequence[int],
                 div_val: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.model_dim = model_dim
        self.div_val = div_val
        self.bounds = cluster_bounds(vocab_size, cutoffs)
        self.scale = math.sqrt(model_dim)
        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ParameterDict()
        if div_val == 1:
            self.emb_layers.append(nn.Embedding(vocab_size, embed_dim))
            if embed_dim != model_dim:
                self.emb_projs["0"] = nn.Parameter(torch.empty(model_dim, embed_dim))
        else:
            for i, ((lo, hi), dim) in enumerate(zip(self.bounds, cluster_dims(embed_dim, len(self.bounds),
                                                                               div_val))):
                self.emb_layers.append(nn.Embedding(hi - lo, dim))
                self.emb_projs[str(i)] = nn.Parameter(torch.empty(model_dim, dim))

    def projection(self, i: int):
        """emb_projs[i] (C, d_i) or None."""
        key = str(i)
        return self.emb_projs[key] if key in self.emb_projs else None

    def forward(self, tokens: Tensor) -> Tensor:
        if self.div_val == 1:
            embedded = self.emb_layers[0](tokens)  # (B, T, d_embed)
            proj = self.projection(0)
            if proj is not None:
                embedded = F.linear(embedded, proj)  # (B, T, C)
            return embedded * self.scale
        flat = tokens.reshape(-1)  # (N,)
        proj0 = self.emb_projs["0"]
        out = torch.zeros(flat.size(0), self.model_dim, dtype=proj0.dtype, device=flat.device)  # (N, C)
        for i, (lo, hi) in enumerate(self.bounds):
            rows = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)  # (N_i,)
            if rows.numel() == 0:
                continue
            embedded = self.emb_layers[i](flat.index_select(0, rows) - lo)  # (N_i, d_i)
            out = out.index_copy(0, rows, F.linear(embedded, self.emb_projs[str(i)]).to(out.dtype))  # (N, C)
        return out.view(*tokens.shape, self.model_dim) * self.scale  # (B, T, C)
