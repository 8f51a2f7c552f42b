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

``attn_impl``: ``naive`` (the scores, mask, softmax and probability dropout written out: the reference) or ``sdpa``
(``scaled_dot_product_attention`` with a boolean mask and its own dropout: on CUDA its fused kernels keep no
(B, T, S) scores; in CPU training ``ops/sdpa.py`` draws its dropout from packed bits). ``auto`` is ``sdpa`` on CUDA
and ``naive`` on CPU, where sdpa measured no faster and would move the converted checkpoints' log-probabilities by
their last bits.

Precision under a half-precision model (``model.half()`` / ``.to(torch.bfloat16)``): ``qln`` keeps fp32 parameters
and runs in fp32; the softmax normalises in fp32 and the probabilities are cast back for the value product.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairseq_ext.ops.dispatch import ImplResolver
from fairseq_ext.ops.dropout import dropout
from fairseq_ext.ops.sdpa import sdpa

IMPLS = ("auto", "naive", "sdpa")
_resolve_cpu = ImplResolver("SHA-RNN attention on CPU", IMPLS, "naive", "the written-out softmax; sdpa is no faster")
_resolve_cuda = ImplResolver("SHA-RNN attention on CUDA", IMPLS, "sdpa", "fused kernels, no (B, T, S) scores kept")


def select_impl(impl: str, device: torch.device) -> str:
    """The kernel ``impl`` runs on ``device``: an explicit name as given (validated); ``auto`` -> sdpa on CUDA,
    naive elsewhere (logged once each)."""
    return _resolve_cuda(impl) if device.type == "cuda" else _resolve_cpu(impl)


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

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        """query (B, T, d) (the ``lnmid`` stream), memory (B, S, d) with S >= T (carried memory then the current
        segment's ``lnmem`` stream) -> (B, T, d)."""
        t, s = query.size(1), memory.size(1)
        q = self.q(query)  # (B, T, d)
        dtype = torch.promote_types(q.dtype, torch.float32)  # the LN in (at least) fp32, as the original
        q = F.layer_norm(q.to(dtype), (self.dim,), self.qln.weight.to(dtype), self.qln.bias.to(dtype),
                         self.qln.eps).to(query.dtype)
        q = dropout(torch.sigmoid(self.qs) * q, self.dropout, self.training)
        k = torch.sigmoid(self.ks) * memory  # (B, S, d)
        v = dropout(self.value_gate() * memory, self.dropout, self.training)  # (B, S, d)
        rows = torch.arange(t, device=query.device).unsqueeze(1)  # (T, 1)
        cols = torch.arange(s, device=query.device).unsqueeze(0) - (s - t)  # (1, S): memory < 0
        if select_impl(self.attn_impl, query.device) == "sdpa":
            out = sdpa(  # one head: (B, 1, T|S, d)
                q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_mask=cols <= rows,
                dropout_p=self.dropout if self.training else 0.0, scale=1 / math.sqrt(self.dim))
            return out.squeeze(1)  # (B, T, d)
        scores = torch.matmul(q, k.transpose(1, 2)).div_(math.sqrt(self.dim))  # (B, T, S), scaled in place
        scores = scores.masked_fill_(cols > rows, float("-inf"))  # in place: the product saves its inputs only
        probs = torch.softmax(scores, dim=-1, dtype=dtype).to(v.dtype)  # (B, T, S) normalised in fp32 at least
        probs = dropout(probs, self.dropout, self.training)
        return torch.matmul(probs, v)  # (B, T, d)
