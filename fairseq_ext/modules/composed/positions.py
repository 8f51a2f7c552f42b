"""Position terms of the composed core: one small module per scheme behind one interface (x-transformers style).

* ``embed(position, length, dtype)``: absolute schemes return encodings (B|1, T, C) added to the input embeddings;
  ``position`` (B|1, T) is each token's index in its segment and ``length`` (B|1, 1) the segment's length.
* ``score_terms(q, distance)``: relative schemes return the query of the content term and an additive logit bias
  for queries against keys at ``distance`` (T, S) = query position - key position (negative: a future key).
* ``attend(q, k, v, before, dropout_p)``: a scheme's own kernel for plain causal attention over a context and the
  segment. ALiBi's is ``alibi_lm``'s (``ops.alibi``), which forms no (T, S) tensor on CPU, and Transformer-XL's
  ``transformer_xl_lm``'s (``ops.xl_relative``: causal query blocks on CPU); schemes with no score term run ALiBi's
  with zero slopes. The mixer uses them when nothing else shapes the scores (no span, no persistent slots, no window)
  and ``--attn-impl auto``.

Schemes:

* ``none``        nothing (SHA-RNN, NoPE).
* ``sinusoidal``  Vaswani et al. 2017: [sin | cos] of the index in the segment, 0 .. T-1.
* ``descending``  lmtool-fwms's absolute positions (Schlag et al. 2021): the same sinusoid over T-1 .. 0.
  Both cap the index at ``clamp_len`` when it is > 0.
* ``alibi``       Press et al. 2021, Eq. in Sec. 3: bias -m_h · (i - j), the slopes in fp32.
* ``xl``          Dai et al. 2019, Sec. 3.3: ((q_i + u) · k_j + (q_i + v) · W_R R_{i-j}) / sqrt(D); R the sinusoid
                  of the distance, u, v (H, D) learned per layer. Computed in the gather form: (q + v) W_R R for
                  every distance 0 .. S-1, then each (i, j) picks its distance; the bias carries its own 1/sqrt(D).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from fairseq_ext.modules.positional.alibi import AlibiPositionalBias
from fairseq_ext.modules.positional.descending_sinusoid import DescendingSinusoid
from fairseq_ext.ops.alibi import alibi_attention
from fairseq_ext.ops.xl_relative import xl_relative_attention

ABSOLUTE = ("sinusoidal", "descending")
RELATIVE = ("alibi", "xl")
POSITIONS = ("none", *ABSOLUTE, *RELATIVE)


class PositionTerm(nn.Module):
    """The interface; this base is the ``none`` scheme."""

    kind = "none"

    def embed(self, position: Tensor, length: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
        return None

    def score_terms(self, q: Tensor, distance: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        return q, None

    def attend(self, q: Tensor, k: Tensor, v: Tensor, before: int, dropout_p: float) -> Optional[Tensor]:
        """Causal attention of q (B, H, T, D) over k, v (B, H, before + T, D), query i seeing keys 0 .. before + i,
        by a kernel of this scheme's own that never forms the (T, S) terms, or None (the mixer then builds them
        for ``ops.biased_attention``). Here: for schemes whose ``score_terms`` add nothing (none, sinusoidal,
        descending), ALiBi's kernel with every slope 0, i.e. plain causal attention (on CPU its query blocks over one
        zero (1, H, r, S) strip); None for a relative scheme that overrides ``score_terms`` but not ``attend``."""
        if type(self).score_terms is not PositionTerm.score_terms:
            return None  # its terms are not ours to drop: the mixer builds them
        slopes = q.new_zeros(q.size(1), dtype=torch.float32)  # (H,): no bias
        return alibi_attention(q, k, v, slopes, q_offset=before, causal=True, dropout_p=dropout_p,
                               impl="auto")  # (B, H, T, D)


class SinusoidalPosition(PositionTerm):
    kind = "sinusoidal"

    def __init__(self, embed_dim: int, clamp_len: int = -1) -> None:
        super().__init__()
        self.sinusoid = DescendingSinusoid(embed_dim)  # a [sin | cos] encoder of caller-given indices
        self.clamp_len = clamp_len  # > 0: indices capped there (lmtool's --clamp_len); <= 0: none

    def extra_repr(self) -> str:
        return f"clamp_len={self.clamp_len}" if self.clamp_len > 0 else ""

    def indices(self, position: Tensor, length: Tensor) -> Tensor:
        return position

    def embed(self, position: Tensor, length: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
        return self.sinusoid(self.indices(position, length), self.clamp_len, dtype)  # (B|1, T, C)


class DescendingPosition(SinusoidalPosition):
    kind = "descending"

    def indices(self, position: Tensor, length: Tensor) -> Tensor:
        return (length - 1 - position).clamp(min=0)  # (B|1, T): T-1 .. 0 over the segment


class AlibiPosition(PositionTerm):
    kind = "alibi"

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.alibi = AlibiPositionalBias(num_heads)  # fp32 slopes (H,), kept fp32 under .half()

    def score_terms(self, q: Tensor, distance: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        slopes = self.alibi.slopes.to(q.device)  # (H,)
        bias = -slopes[:, None, None] * distance.clamp(min=0).to(slopes.dtype)  # (H, T, S)
        return q, bias.unsqueeze(0)  # (1, H, T, S)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, before: int, dropout_p: float) -> Optional[Tensor]:
        """``alibi_lm``'s kernel choice (``ops.alibi``, ``auto``): on CPU causal query blocks whose biases view one
        (1, H, r, S) strip, without gradients bias chunks, else SDPA with the (1, H, T, S) bias."""
        return alibi_attention(q, k, v, self.alibi.slopes.to(q.device), q_offset=before, causal=True,
                               dropout_p=dropout_p, impl="auto")  # (B, H, T, D)


class XLRelativePosition(PositionTerm):
    kind = "xl"

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.sinusoid = DescendingSinusoid(embed_dim)
        self.r_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=False)  # W_{k,R}
        self.content_bias = nn.Parameter(torch.zeros(num_heads, head_dim))  # u
        self.position_bias = nn.Parameter(torch.zeros(num_heads, head_dim))  # v

    def _projected(self, distances: Tensor, dtype: torch.dtype) -> Tensor:
        """W_R R for the given distances (S,) -> (H, S, D)."""
        encodings = self.sinusoid(distances, dtype=dtype)  # (S, C)
        return self.r_proj(encodings).view(-1, self.num_heads, self.head_dim).transpose(0, 1)  # (H, S, D)

    def score_terms(self, q: Tensor, distance: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        b, h, t, d = q.shape
        far = int(distance.size(1))  # distances 0 .. S-1 cover every visible key
        r = self._projected(torch.arange(far, device=q.device), q.dtype)  # (H, S, D), row c = distance c
        by_distance = torch.matmul(q + self.position_bias[:, None, :], r.transpose(1, 2))  # (B, H, T, S_dist)
        index = distance.clamp(0, far - 1).expand(b, h, t, -1)  # (B, H, T, S)
        bias = torch.gather(by_distance, 3, index) / math.sqrt(d)  # (B, H, T, S), scaled as the content term
        return q + self.content_bias[:, None, :], bias

    def attend(self, q: Tensor, k: Tensor, v: Tensor, before: int, dropout_p: float) -> Optional[Tensor]:
        """``transformer_xl_lm``'s kernel choice (``ops.xl_relative``, ``auto``: causal query blocks on CPU from 256
        queries, else SDPA with the shifted position scores as its bias), the encodings in its layout."""
        s = k.size(2)
        r = self._projected(torch.arange(s - 1, -1, -1, device=q.device), q.dtype)  # (H, S, D), row c: S - 1 - c
        return xl_relative_attention(q, k, v, r, self.content_bias, self.position_bias, dropout_p=dropout_p,
                                     impl="auto")  # (B, H, T, D)


_BUILDERS = {
    "none": lambda dim, heads, head_dim: PositionTerm(),
    "sinusoidal": lambda dim, heads, head_dim: SinusoidalPosition(dim),
    "descending": lambda dim, heads, head_dim: DescendingPosition(dim),
    "alibi": lambda dim, heads, head_dim: AlibiPosition(heads),
    "xl": XLRelativePosition,
}


def build_position(kind: str, embed_dim: int, num_heads: int, head_dim: int) -> PositionTerm:
    if kind not in _BUILDERS:
        raise ValueError(f"unknown position term {kind!r}; choose one of {POSITIONS}")
    return _BUILDERS[kind](embed_dim, num_heads, head_dim)
