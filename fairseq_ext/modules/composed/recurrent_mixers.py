"""The composed core's mixers that keep no key/value matrix per token:

* ``FastWeightMixer``: linear attention as a fast weight programmer (Schlag et al. 2021, Eq. 6-7 sum rule, Eq.
  15-17 delta rule; a ``modules.attention.FastWeightSelfAttention`` over ``ops.fast_weights``). Its memory is the
  fast-weight matrix: ``carry`` keeps it across segments (source ``memory``), otherwise it restarts at every
  segment (``segment``). ``persistent``: a learned initial fast-weight state W_0 (H, D_phi, d), the fast-weight
  analogue of persistent memory slots, used wherever the state would otherwise start at zero.
* ``SingleHeadMixer``: SHA-RNN's single-headed attention (Merity 2019, Sec. 3; ``modules.attention.
  SingleHeadAttention``) over [memory ; segment] from a hidden-state source (``segment`` or ``memory``).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from fairseq_ext.modules.attention.fast_weight_self_attention import FastWeightSelfAttention
from fairseq_ext.modules.attention.single_head_attention import SingleHeadAttention
from fairseq_ext.state import FastWeightState, HiddenCache


class FastWeightMixer(FastWeightSelfAttention):
    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, feature_map: str, update_rule: str,
                 normalize: str, *, carry: bool, persistent: bool = False, performer_proj_dim: int = 16,
                 performer_orthogonal_compat: bool = False, dpfp_n_roll: int = 2, attn_impl: str = "auto",
                 chunk_size: int = 64, lmtool_quadratic: bool = False) -> None:
        super().__init__(embed_dim, num_heads, head_dim, feature_map, update_rule, normalize, performer_proj_dim,
                         performer_orthogonal_compat, dpfp_n_roll, attn_impl, chunk_size, lmtool_quadratic)
        self.carry = carry
        # zero: the model starts as the plain fast weight programmer and learns W_0
        shape = (num_heads, self.feature_map.out_dim, head_dim)  # (H, D_phi, d)
        self.initial_weight = nn.Parameter(torch.zeros(shape)) if persistent else None

    def _initial(self, batch: int, like: Tensor) -> Optional[FastWeightState]:
        if self.initial_weight is None:
            return None
        dtype = torch.promote_types(like.dtype, torch.float32)  # fast weights in fp32 at least
        weight = self.initial_weight.to(dtype).expand(batch, -1, -1, -1)  # (B, H, D_phi, d)
        key_sum = None
        if self.normalize != "none":
            key_sum = weight.new_zeros(batch, weight.size(1), weight.size(2))  # (B, H, D_phi)
        return FastWeightState(weight, key_sum)

    def forward(self, x: Tensor, state: Optional[FastWeightState] = None) -> Tuple[Tensor, FastWeightState]:
        """x (B, T, C) -> (y (B, T, C), the fast weights after x)."""
        return super().forward(x, state if state is not None else self._initial(x.size(0), x))

    @property
    def carries_state(self) -> bool:
        return self.carry

    def close(self, state: Optional[FastWeightState]) -> Optional[FastWeightState]:
        return state if self.carry else None

    def upgrade_state_dict_named(self, state_dict: Dict[str, Tensor], name: str) -> Dict[str, Tensor]:
        """composed_lm checkpoints written while this mixer wrapped the attention (``{name}.attention.*``)."""
        old = f"{name}.attention."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[f"{name}.{key[len(old):]}"] = state_dict.pop(key)
        return state_dict


class SingleHeadMixer(nn.Module):
    def __init__(self, embed_dim: int, dropout: float, source: nn.Module) -> None:
        super().__init__()
        self.attention = SingleHeadAttention(embed_dim, dropout)
        self.source = source

    def forward(self, x: Tensor, state: Optional[HiddenCache]) -> Tuple[Tensor, Optional[HiddenCache]]:
        """x (B, T, C) -> (y (B, T, C), the source's open state); memory fully visible, the segment causal."""
        keys, _, before, new_state = self.source.read(x, state, lambda h: (h, h))  # (B, S, C), S = before + T
        return self.attention(x, keys[:, :before], keys[:, before:]), new_state

    @property
    def carries_state(self) -> bool:
        return self.source.carries

    def close(self, state: Optional[HiddenCache]) -> Optional[HiddenCache]:
        return self.source.close(state)
