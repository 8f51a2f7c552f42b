"""One composed layer: a mixer (softmax / span / fast-weight / single-head, see ``layout.py``) and a ReLU
feed-forward sublayer with residuals, pre-LN (default) or post-LN:

    pre-LN:   h = x + Drop(Mix(LN_1(x), state)),   out = h + Drop(W_2 Drop(ReLU(W_1 LN_2(h))))
    post-LN:  h = LN_1(x + Drop(Mix(x, state))),   out = LN_2(h + Drop(W_2 Drop(ReLU(W_1 h))))

The mixer is pure (``forward(x, state) -> (y, open state)``, ``close(state)`` at a segment boundary).
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from fairseq_ext.modules.blocks.feed_forward import FeedForwardBlock


class ComposedBlock(FeedForwardBlock):
    def __init__(self, embed_dim: int, ffn_dim: int, dropout: float, normalize_before: bool, mixer: nn.Module) -> None:
        super().__init__()
        self.dropout = dropout
        self.normalize_before = normalize_before
        self.self_attn = mixer
        self._build_feed_forward(embed_dim, ffn_dim)

    def forward(self, x: Tensor, state: Optional[object], context: None = None) -> Tuple[Tensor, Optional[object]]:
        """x (B, T, C) -> (B, T, C) and the mixer's open state (composed mixers share no per-call context)."""
        if self.normalize_before:
            y, state = self.self_attn(self.self_attn_layer_norm(x), state)
            x = x + self._drop(y)  # (B, T, C)
            return x + self._feed_forward(self.final_layer_norm(x)), state
        y, state = self.self_attn(x, state)
        x = self.self_attn_layer_norm(x + self._drop(y))  # (B, T, C)
        return self.final_layer_norm(x + self._feed_forward(x)), state

    @property
    def carries_state(self) -> bool:
        return self.self_attn.carries_state

    def close(self, state: Optional[object]) -> Optional[object]:
        return self.self_attn.close(state)
