"""The LayerNorms and position-wise feed-forward sublayer that Transformer-XL-style layers share."""
from __future__ import annotations

from torch import Tensor, nn

from fairseq_ext.ops.dropout import dropout, relu_dropout


class FeedForwardBlock(nn.Module):
    """Base of a layer with ``self_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm`` (the state-dict names)
    and dropout ``self.dropout`` on its residual branches; the subclass builds its ``self_attn`` first, then calls
    ``_build_feed_forward`` (registration order, hence default-init order, as before)."""

    dropout: float

    def _build_feed_forward(self, embed_dim: int, ffn_dim: int) -> None:
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.final_layer_norm = nn.LayerNorm(embed_dim)

    def _drop(self, x: Tensor) -> Tensor:
        return dropout(x, p=self.dropout, training=self.training)

    def _feed_forward(self, x: Tensor) -> Tensor:
        """The residual branch Drop(W_2 Drop(ReLU(W_1 x + b_1)) + b_2): (B, T, C) -> (B, T, C)."""
        flat = x.reshape(-1, x.size(-1))  # (B*T, C): fc1's output is then 2-D, its own tensor, not a view
        hidden = relu_dropout(self.fc1(flat), self.dropout, self.training, inplace=True)  # (B*T, F)
        return self._drop(self.fc2(hidden)).view(x.shape)  # (B, T, C)
