"""Single-headed attention of the SHA-RNN (Merity 2019, "Single Headed Attention RNN: Stop Thinking With Your Head",
arXiv 1911.11423; spec sha_rnn.md §1.3), written from the spec.

One head of width d, no key, value or output projection. With the memory stream m (B, S, d) (the block's ``lnmem``
outputs: carried memory followed by the current segment) and the query stream x (B, T, d):

    q_i = dropout(σ(qs) ⊙ LN_q(W_q x_i + b_q))        (LN_q = ``qln``: parameters and computation in fp32)
    k_j = σ(ks) ⊙ m_j
    v_j = dropout(g_v ⊙ m_j),  g_v = σ(f)·tanh(c), [c; f] = vq.l1(σ(vs))   (the Overparam gate)
    out_i = Σ_j dropout(softmax_j(q_i·k_j / √d + mask_ij)) v_j

``collapse_value_gate()`` stores g_v into ``vs`` and deletes ``vq``; a collapsed module uses ``vs`` as is (no
sigmoid), as the original's ``vq_collapse``. The mask: the first S - T keys (memory) are visible to every query,
the last T (current segment) causally.

``attn_impl`` picks the kernel (``fairseq_ext/ops/sha_attention``): ``naive`` (the formula written out: the
reference; ``auto`` on CPU without a gradient), ``split`` (the gates moved to the query side, and no key or value
gradient formed for a detached memory; ``auto`` in CPU training) or ``sdpa`` (``auto`` on CUDA).

Precision under a half-precision model (``model.half()`` / ``.to(torch.bfloat16)``): ``qln`` keeps fp32 parameters
and runs in fp32; the softmax normalises in fp32 and the probabilities are cast back for the value product.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairseq_ext.ops.dropout import dropout
from fairseq_ext.ops.sha_attention import IMPLS, select_impl, sha_attention

__all__ = ["IMPLS", "Overparam", "SingleHeadAttention", "select_impl"]


class Overparam(nn.Module):
    """The Overparam gate: Linear(d, 2d) -> split into (c, f) -> σ(f)·tanh(c)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.l1 = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d) -> (..., d)."""
        c, f = self.l1(x).split(self.dim, dim=-1)
        return torch.sigmoid(f) * torch.tanh(c)


class SingleHeadAttention(nn.Module):
    """Pure single-headed attention; see the module docstring. Parameters: qs, ks, vs (d,), q (Linear d -> d),
    qln (LayerNorm d, eps 1e-12), vq.l1 (Linear d -> 2d; absent when collapsed)."""

    def __init__(self, dim: int, dropout: float, collapsed: bool = False, eps: float = 1e-12,
                 attn_impl: str = "auto") -> None:
        super().__init__()
        if attn_impl not in IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r} for SHA-RNN attention; choose one of {IMPLS}")
        self.attn_impl = attn_impl
        self.dim = dim
        self.dropout = dropout
        self.qs = nn.Parameter(torch.zeros(dim))
        self.ks = nn.Parameter(torch.zeros(dim))
        self.vs = nn.Parameter(torch.zeros(dim))
        self.q = nn.Linear(dim, dim)
        self.qln = nn.LayerNorm(dim, eps=eps)
        self.vq: Optional[Overparam] = None if collapsed else Overparam(dim)

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply; casts to fp16/bf16 (``model.half()``, fairseq's ``--fp16`` / ``--bf16``) leave the
        query LayerNorm's gain and bias in fp32, as the original's apex AMP O1 kept them (spec §6.6)."""
        super()._apply(fn, recurse)
        for param in self.qln.parameters():
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
        return self

    @property
    def collapsed(self) -> bool:
        return self.vq is None

    def value_gate(self) -> Tensor:
        """g_v (d,): Overparam(σ(vs)), or ``vs`` as is once collapsed."""
        if self.vq is None:
            return self.vs
        return self.vq(torch.sigmoid(self.vs))

    @torch.no_grad()
    def collapse_value_gate(self) -> None:
        """Fold the Overparam gate into ``vs`` and delete ``vq`` (the original's ``vq_collapse``)."""
        if self.vq is None:
            return
        self.vs.copy_(self.value_gate())
        self.vq = None

    def forward(self, query: Tensor, memory: Optional[Tensor], segment: Tensor) -> Tensor:
        """query (B, T, d) (the ``lnmid`` stream), memory (B, M, d) or None (the carried ``lnmem`` rows, visible to
        every query), segment (B, T, d) (the current segment's ``lnmem`` stream, causal) -> (B, T, d)."""
        q = self.q(query)  # (B, T, d)
        dtype = torch.promote_types(q.dtype, torch.float32)  # the LN in (at least) fp32, as the original
        q = F.layer_norm(q.to(dtype), (self.dim,), self.qln.weight.to(dtype), self.qln.bias.to(dtype),
                         self.qln.eps).to(query.dtype)
        q = dropout(torch.sigmoid(self.qs) * q, self.dropout, self.training)  # (B, T, d)
        return sha_attention(q, torch.sigmoid(self.ks), self.value_gate(), memory, segment,
                             dropout_p=self.dropout if self.training else 0.0, impl=self.attn_impl)  # (B, T, d)
