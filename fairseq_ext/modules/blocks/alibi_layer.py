"""fairseq's transformer decoder layer with ALiBi self-attention (Press et al. 2021, Sec. 3), as a ``CoreDecoder``
block. Pre-LN (``normalize_before``, the paper's ``transformer_lm_wiki103``) or post-LN:

    h = x + Drop(s_attn(Attn(LN_1(x), [cache ; x], -m (i - j))))           (LN_1 after the sum when post-LN)
    y = w_res * h + Drop(W_2 LN_fc(Drop_act(act(W_1 LN_2(h)))))             (LN_2 after the sum when post-LN)

``s_attn`` (per-head scales ``c_attn`` then ``attn_ln``), ``LN_fc`` (``ffn_layernorm``) and ``w_res`` (``w_resid``) are
NormFormer's optional scalings (fairseq's ``--scale-heads``, ``--scale-attn``, ``--scale-fc``, ``--scale-resids``).
Parameter names and construction order are fairseq's ``TransformerDecoderLayerBase``'s, so ``transformer_lm`` and
ALiBi-fork checkpoints load unchanged and a seed gives the same initial weights.

State: the layer's ``KVCache`` while generating (``close`` drops it at a segment end: the model carries nothing across
segments). Context: ``AlibiContext``, the bias built once per forward for every layer and the keys' padding mask.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.modules import LayerNorm
from fairseq.utils import get_activation_fn
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fairseq_ext.errors import ConfigError
from fairseq_ext.modules.attention.alibi_self_attention import AlibiSelfAttention
from fairseq_ext.ops.dropout import dropout, relu_dropout
from fairseq_ext.state import KVCache


@dataclasses.dataclass(frozen=True)
class AlibiContext:
    """What every layer shares in one forward: ``bias`` (1, H, T, S), the sdpa bias of the kernel every layer will
    select (None when it builds its own, e.g. per query chunk), and ``key_padding_mask`` (B, T) of the new tokens (None
    when no token is padding)."""

    bias: Optional[Tensor]
    key_padding_mask: Optional[Tensor]


@dataclasses.dataclass(frozen=True)
class NormFormerScales:
    """fairseq's NormFormer options (Shleifer et al. 2021), all off by default."""

    heads: bool = False  # --scale-heads: a learned scale per attention head
    attn: bool = False  # --scale-attn: LayerNorm on the attention output
    fc: bool = False  # --scale-fc: LayerNorm after the FFN activation
    resids: bool = False  # --scale-resids: learned scale of the FFN residual


def fairseq_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """fairseq's FairseqDropout semantics: no RNG draw at all when it is off."""
    return dropout(x, p, True) if p > 0 and training else x


class AlibiLayer(nn.Module):
    carries_state = False

    def __init__(self, self_attn: AlibiSelfAttention, ffn_dim: int, dropout: float, activation_dropout: float,
                 activation_fn: str, normalize_before: bool, scales: NormFormerScales = NormFormerScales(),
                 layerdrop: float = 0.0, checkpoint_activations: bool = False,
                 offload_activations: bool = False) -> None:
        """layerdrop: probability of skipping the layer in a training forward (fairseq's --decoder-layerdrop);
        checkpoint_activations: recompute the layer in the backward pass (offload_activations: keep its saved input
        in CPU memory meanwhile)."""
        super().__init__()
        dim = self_attn.embed_dim
        self.self_attn = self_attn
        self.attn_ln = LayerNorm(dim) if scales.attn else None
        self.c_attn = nn.Parameter(torch.ones(self_attn.num_heads)) if scales.heads else None
        self.activation_fn = get_activation_fn(activation_fn)
        self.normalize_before = normalize_before
        self.self_attn_layer_norm = LayerNorm(dim)
        self.ffn_layernorm = LayerNorm(ffn_dim) if scales.fc else None
        self.w_resid = nn.Parameter(torch.ones(dim)) if scales.resids else None
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = LayerNorm(dim)
        self.dropout = dropout
        self.activation_dropout = activation_dropout
        self.layerdrop = layerdrop
        self.checkpoint_activations = checkpoint_activations
        self.offload_activations = offload_activations

    def forward(self, x: Tensor, state: Optional[KVCache], context: AlibiContext) -> Tuple[Tensor, Optional[KVCache]]:
        """x: (B, T, C) -> (y (B, T, C), the KVCache including these tokens)."""
        if self.training and self.layerdrop > 0 and float(torch.rand(())) < self.layerdrop:
            return x, state
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            offload = torch.autograd.graph.save_on_cpu(True) if self.offload_activations else contextlib.nullcontext()
            with offload:
                return checkpoint(self._layer, x, state, context, use_reentrant=False)
        return self._layer(x, state, context)

    def _layer(self, x: Tensor, state: Optional[KVCache], context: AlibiContext) -> Tuple[Tensor, KVCache]:
        b, t, c = x.shape
        residual = x
        h = self.self_attn_layer_norm(x) if self.normalize_before else x
        h, cache = self.self_attn(h, state, context.key_padding_mask, context.bias)  # (B, T, C)
        if self.c_attn is not None:  # fairseq's order: per-head scales of the projected output's head slices
            h = (h.view(b, t, self.c_attn.numel(), -1) * self.c_attn[:, None]).reshape(b, t, c)
        if self.attn_ln is not None:
            h = self.attn_ln(h)
        x = residual + fairseq_dropout(h, self.dropout, self.training)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)
        residual = x
        h = self.final_layer_norm(x) if self.normalize_before else x
        h = self.fc1(h.reshape(b * t, c))  # (B*T, F): 2-D, so not a view that in-place ops would copy back
        if self.activation_fn is F.relu and self.activation_dropout > 0:  # one masked product, over fc1's output
            h = relu_dropout(h, self.activation_dropout, self.training, inplace=True)
        else:
            h = fairseq_dropout(self.activation_fn(h), self.activation_dropout, self.training)
        if self.ffn_layernorm is not None:
            h = self.ffn_layernorm(h)
        h = fairseq_dropout(self.fc2(h), self.dropout, self.training).view(b, t, c)  # (B, T, C)
        if self.w_resid is not None:
            residual = self.w_resid * residual
        x = residual + h
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x, cache

    def upgrade_state_dict_named(self, state_dict: Dict[str, Tensor], name: str) -> Dict[str, Tensor]:
        """Checkpoints trained while alibi_lm ignored the NormFormer flags (fairseq 0.12.3.1's transformer_lm drops
        them) lack those tensors: say so instead of failing on missing keys."""
        stored = {"heads": f"{name}.c_attn", "attn": f"{name}.attn_ln.weight", "fc": f"{name}.ffn_layernorm.weight",
                  "resids": f"{name}.w_resid"}
        built = {"heads": self.c_attn, "attn": self.attn_ln, "fc": self.ffn_layernorm, "resids": self.w_resid}
        missing = [kind for kind, key in stored.items() if built[kind] is not None and key not in state_dict]
        if missing and f"{name}.fc1.weight" in state_dict:
            overrides = ", ".join(f"'scale_{kind}': False" for kind in missing)
            raise ConfigError(f"this checkpoint has no NormFormer {', '.join(missing)} scalings (trained while "
                              f"alibi_lm ignored --scale-{'/--scale-'.join(missing)}, as fairseq's transformer_lm "
                              f"does); load it with --model-overrides \"{{{overrides}}}\"")
        return state_dict

    def close(self, state: Optional[KVCache]) -> None:
        return None  # nothing is carried into the next segment
