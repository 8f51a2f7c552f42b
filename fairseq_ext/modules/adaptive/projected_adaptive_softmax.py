"""Projected adaptive log-softmax of Transformer-XL (Grave et al. 2017; Dai et al. 2019; spec §3, §7).

The head scores the shortlist [0, cutoffs[0]) and one logit per tail cluster; tail cluster i scores its words
after projecting the hidden state h (C) to the cluster dim d_i with ``out_projs[i]`` (C, d_i):

    log p(x) = log softmax(head(h))[x]                                    x in the shortlist
    log p(x) = log softmax(head(h))[cluster i] + log softmax(tail_i(h))[x - l_i]   x in cluster i
    logits_i(h) = W_i (P_i^T h) + b_i            (P_i^T h omitted when cluster i has no projection)

Original parity details: the cluster logits come from ``cluster_weight`` / ``cluster_bias`` rows used in
**reverse** order (cluster i reads row n_clusters - i); here the head's columns are laid out as
[shortlist | cluster 1 | ... | cluster n] by flipping those rows, so the parameters keep the original meaning.
With ``tie_weights`` the word matrices ARE the input embedding tables (the same Parameter objects); with
``tie_projs[i]`` projection i IS the input projection (div_val = 1: the single input projection).

The output bias is one tensor ``bias`` (V,) or, with ``bias_per_cluster``, one tensor per cluster ``biases.{i}``
(V_i,): the same numbers, but a per-tensor optimizer (LAMB's trust ratio, a per-tensor clip) sees the partition of
the original it reproduces (Transformer-XL / lmtool: per cluster when div_val > 1, one tensor otherwise; NVIDIA's
Transformer-XL: always per cluster).

Dead vocabulary rows of a converted checkpoint (``dead_rows``, modules/dead_rows.py) get their fixed logit in the
head (fairseq's specials, ids 0..3, always lie in the shortlist).

The interface is fairseq's ``AdaptiveSoftmax``: ``forward(h, target)`` returns per-cluster (logits, targets)
for a summed cross-entropy, and ``get_log_prob(h)`` full log-probabilities (B, T, V).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dead_rows import DeadRows
from .adaptive_input import XLAdaptiveInput, cluster_bounds, cluster_dims


class ProjectedAdaptiveLogSoftmax(nn.Module):
    """Parameters: ``weights.{i}`` (V_i, d_i) (one (V, d_embed) table when div_val = 1), ``bias`` (V,) (or
    ``biases.{i}`` (V_i,) with ``bias_per_cluster``),
    ``out_projs.{i}`` (C, d_i) where present, ``cluster_weight`` (n, d_embed), ``cluster_bias`` (n,); buffers of
    ``dead_rows``."""

    def __init__(self, vocab_size: int, embed_dim: int, model_dim: int, cutoffs: Sequence[int], div_val: int,
                 tie_to: Optional[XLAdaptiveInput] = None, tie_projs: Sequence[bool] = (),
                 bias_per_cluster: bool = False) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.div_val = div_val
        self.bounds = cluster_bounds(vocab_size, cutoffs)
        self.num_clusters = len(self.bounds) - 1
        self.shortlist = self.bounds[0][1]
        tie_projs = list(tie_projs) or [False] * len(self.bounds)
        if len(tie_projs) != len(self.bounds):
            raise ValueError(f"tie_projs needs one flag per cluster ({len(self.bounds)}), got {tie_projs}")
        if tie_to is not None and (tie_to.vocab_size != vocab_size or tie_to.div_val != div_val
                                   or tie_to.bounds != self.bounds):
            raise ValueError("tied adaptive softmax needs the input embedding's vocabulary, cutoffs and div_val")
        if self.num_clusters:
            self.cluster_weight = nn.Parameter(torch.empty(self.num_clusters, embed_dim))
            self.cluster_bias = nn.Parameter(torch.zeros(self.num_clusters))
        self.weights = nn.ParameterDict()
        self.out_projs = nn.ParameterDict()
        if bias_per_cluster:
            self.register_parameter("bias", None)
            self.biases = nn.ParameterDict({str(i): nn.Parameter(torch.zeros(hi - lo))
                                            for i, (lo, hi) in enumerate(self.bounds)})
        else:
            self.bias = nn.Parameter(torch.zeros(vocab_size))
            self.biases = None
        self.dead_rows = DeadRows(vocab_size, bias="biases.0" if bias_per_cluster else "bias", weight="weights.0")
        if div_val == 1:
            self.weights["0"] = tie_to.emb_layers[0].weight if tie_to is not None else nn.Parameter(
                torch.empty(vocab_size, embed_dim))
            if embed_dim != model_dim:
                for i, tied in enumerate(tie_projs):
                    if tied and tie_to is None:
                        raise ValueError("tie_projs needs tied input embeddings")
                    self.out_projs[str(i)] = tie_to.emb_projs["0"] if tied else nn.Parameter(
                        torch.empty(model_dim, embed_dim))
        else:
            for i, ((lo, hi), dim) in enumerate(zip(self.bounds, cluster_dims(embed_dim, len(self.bounds),
                                                                               div_val))):
                if tied_proj := tie_projs[i]:
                    if tie_to is None:
                        raise ValueError("tie_projs needs tied input embeddings")
                self.weights[str(i)] = tie_to.emb_layers[i].weight if tie_to is not None else nn.Parameter(
                    torch.empty(hi - lo, dim))
                self.out_projs[str(i)] = tie_to.emb_projs[str(i)] if tied_proj else nn.Parameter(
                    torch.empty(model_dim, dim))

    # ------------------------------------------------------------------------------------------------------
    def _cluster_params(self) -> List[Tuple[Tensor, Tensor, Optional[Tensor]]]:
        """Per cluster: (word matrix (V_i, d_i), bias (V_i,), projection (C, d_i) or None). The shared table
        (div_val = 1) and the bias are split once per call: one split's backward writes a single gradient, where
        per-cluster slicing would materialise a full-size zero gradient per slice."""
        sizes = [hi - lo for lo, hi in self.bounds]
        biases = self.bias.split(sizes) if self.bias is not None else [self.biases[str(i)]
                                                                         for i in range(len(self.bounds))]
        if self.div_val == 1:
            weights = self.weights["0"].split(sizes)
        else:
            weights = [self.weights[str(i)] for i in range(len(self.bounds))]
        projs = [self.out_projs[str(i)] if str(i) in self.out_projs else None for i in range(len(self.bounds))]
        return list(zip(weights, biases, projs))

    @staticmethod
    def _logits(hidden: Tensor, weight: Tensor, bias: Tensor, proj: Optional[Tensor]) -> Tensor:
        """hidden (N, C) -> (N, V_i)."""
        if proj is not None:
            hidden = torch.matmul(hidden, proj)  # (N, d_i) = h P_i
        return F.linear(hidden, weight, bias)  # (N, V_i)

    def _head_logits(self, hidden: Tensor, head: Tuple[Tensor, Tensor, Optional[Tensor]]) -> Tensor:
        """hidden (N, C), the head's parameters -> (N, shortlist + n_clusters): [shortlist | cluster 1 .. n]."""
        weight, bias, proj = head
        if self.num_clusters:
            weight = torch.cat([weight, self.cluster_weight.flip(0)], dim=0)  # (shortlist + n, d_0)
            bias = torch.cat([bias, self.cluster_bias.flip(0)], dim=0)
        return self.dead_rows(self._logits(hidden, weight, bias, proj), columns=self.shortlist)

    def upgrade_state_dict_named(self, state_dict: Dict[str, Tensor], name: str) -> Dict[str, Tensor]:
        """A checkpoint with one ``bias`` (V,) loaded into per-cluster biases: split it (same numbers)."""
        if self.biases is not None and f"{name}.bias" in state_dict:
            parts = state_dict.pop(f"{name}.bias").split([hi - lo for lo, hi in self.bounds])
            state_dict.update({f"{name}.biases.{i}": part.clone() for i, part in enumerate(parts)})
        return state_dict

    # ------------------------------------------------------------------------------------------------------
    def forward(self, hidden: Tensor, target: Tensor) -> Tuple[List[Optional[Tensor]], List[Optional[Tensor]]]:
        """hidden (..., C), target (N,) -> ([head logits (N, shortlist + n), tail_i logits (N_i, V_i) or None],
        [head targets (N,), tail_i targets (N_i,) or None]); summing cross-entropies gives the NLL."""
        hidden = hidden.reshape(-1, hidden.size(-1))  # (N, C)
        target = target.reshape(-1)  # (N,)
        head_target = target.clone()
        params = self._cluster_params()
        logits: List[Optional[Tensor]] = [self._head_logits(hidden, params[0])]
        targets: List[Optional[Tensor]] = [head_target]
        for i in range(1, len(self.bounds)):
            lo, hi = self.bounds[i]
            in_cluster = (target >= lo) & (target < hi)  # (N,)
            head_target[in_cluster] = self.shortlist + i - 1
            rows = in_cluster.nonzero().squeeze(1)  # (N_i,)
            if rows.numel() == 0:
                logits.append(None)
                targets.append(None)
                continue
            logits.append(self._logits(hidden.index_select(0, rows), *params[i]))
            targets.append(target.index_select(0, rows) - lo)
        return logits, targets

    def get_log_prob(self, hidden: Tensor, target: Optional[Tensor] = None) -> Tensor:
        """hidden (..., C) -> log-probabilities (..., V) over the whole vocabulary (``target`` is unused)."""
        shape = hidden.shape[:-1]
        flat = hidden.reshape(-1, hidden.size(-1))  # (N, C)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # log-softmax in fp32 at least
        params = self._cluster_params()
        head = torch.log_softmax(self._head_logits(flat, params[0]).to(acc), dim=-1)  # (N, shortlist + n)
        if not self.num_clusters:
            return head.view(*shape, self.vocab_size)
        parts = [head[:, :self.shortlist]]
        for i in range(1, len(self.bounds)):
            tail = torch.log_softmax(self._logits(flat, *params[i]).to(acc), dim=-1)  # (N, V_i)
            parts.append(head[:, self.shortlist + i - 1, None] + tail)
        return torch.cat(parts, dim=-1).view(*shape, self.vocab_size)  # (..., V)
