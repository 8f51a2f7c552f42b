"""``CoreDecoder``: the decoder of every model built from the composable core (``modules/composed``), read top to
bottom:

    x = Drop(E[tokens] · sqrt(C) + P_abs)            (adaptive input; P_abs from an absolute position term or none)
    x, state_l = Block_l(x, state_l)   for l = 1..N  (ComposedBlock: a mixer and a feed-forward sublayer)
    features = Drop(LN(x))                           (LN only for pre-LN stacks)

and ``ProjectedAdaptiveLogSoftmax`` reads the features (``output_layer`` passes them through).

State: one ``DecoderState`` (per-layer states, and the offset into the current segment). A streaming call is one
whole segment: every layer's state is closed at its end (memory cut to M, segment caches dropped, fast weights kept
only when carried). Incremental decoding cuts its tokens at the same segment boundaries (``segment_pieces``), so its
log-probabilities equal the streaming pass over segments of ``tokens_per_sample``.

A model's decoder validates its own config, builds the pieces and hands them to ``__init__``: ``composed_lm`` from
per-layer patterns, ``fast_weight_lm`` from lmtool's settings.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairseq_ext.models.base.stateful_decoder import SegmentOutput, StatefulDecoder, segment_pieces
from fairseq_ext.modules.adaptive import ProjectedAdaptiveLogSoftmax, XLAdaptiveInput
from fairseq_ext.modules.composed import ComposedBlock, PositionTerm
from fairseq_ext.state import DecoderState, SegmentState

MAX_POSITIONS = 1_000_000  # no learned positions: fairseq uses this only for filtering
LayerState = Optional[SegmentState]


class CoreDecoder(StatefulDecoder):
    """Adaptive input (+ absolute positions) -> dropout -> ComposedBlocks -> (LN) -> dropout -> adaptive softmax."""

    def __init__(self, dictionary, embed_tokens: XLAdaptiveInput, input_position: PositionTerm,
                 layers: Sequence[ComposedBlock], layer_norm: Optional[nn.LayerNorm],
                 adaptive_softmax: ProjectedAdaptiveLogSoftmax, dropout: float,
                 tokens_per_sample: Optional[int]) -> None:
        super().__init__(dictionary)
        self.embed_tokens = embed_tokens
        self.input_position = input_position
        self.layers = nn.ModuleList(layers)
        self.layer_norm = layer_norm
        self.adaptive_softmax = adaptive_softmax
        self.dropout = dropout
        self.tokens_per_sample = tokens_per_sample

    @property
    def carries_state(self) -> bool:
        """Whether any layer carries something from one segment to the next (else the model is stateless)."""
        return any(layer.carries_state for layer in self.layers)

    def max_positions(self) -> int:
        return MAX_POSITIONS

    def output_layer(self, features: Tensor) -> Tensor:
        """Features unchanged: the adaptive softmax (``get_normalized_probs``, ``lm_loss``) reads them."""
        return features

    def forward_segment(self, tokens: Tensor, state: Optional[DecoderState]) -> SegmentOutput:
        """One whole segment (streaming): tokens (B, T) -> features (B, T, C) and the closed state (None when
        nothing is carried). Absolute positions run over each row's real (non-pad) tokens, so a row's result does
        not depend on the rows batched with it."""
        if state is not None and not self.carries_state:
            raise ValueError(f"this {type(self).__name__} carries nothing across segments (every layer restarts at "
                             f"each segment), so forward_segment takes no state")
        if state is not None and state.offset:
            raise ValueError(f"a streaming call starts a segment, but the state is {state.offset} tokens into one")
        lengths = tokens.ne(self.dictionary.pad()).sum(1, keepdim=True)  # (B, 1)
        features, layer_states = self._forward(tokens, self._layer_states(state), 0, lengths)
        return features, self._closed(layer_states), {}

    def forward_incremental(self, tokens: Tensor, state: Optional[DecoderState]) -> SegmentOutput:
        """New tokens (B, T_new) of generation, cut at the streaming pass's segment boundaries."""
        offset = state.offset if state is not None else 0
        layer_states = self._layer_states(state)
        outputs: List[Tensor] = []
        seg_len = torch.full((1, 1), self.tokens_per_sample or 0, device=tokens.device)
        for start, stop, closes in segment_pieces(tokens.size(1), offset, self.tokens_per_sample):
            features, layer_states = self._forward(tokens[:, start:stop], layer_states, offset, seg_len)
            outputs.append(features)
            offset = 0 if closes else offset + stop - start
            if closes:
                layer_states = self._layer_states(self._closed(layer_states))
        return torch.cat(outputs, dim=1), DecoderState(layer_states, offset), {}

    def _layer_states(self, state: Optional[DecoderState]) -> Tuple[LayerState, ...]:
        if state is None:
            return (None,) * len(self.layers)
        if len(state.layers) != len(self.layers):
            raise ValueError(f"state has {len(state.layers)} layers, the model {len(self.layers)}")
        return state.layers

    def _closed(self, layer_states: Tuple[LayerState, ...]) -> Optional[DecoderState]:
        """The state the next segment starts from (None when no layer carries anything)."""
        closed = tuple(layer.close(s) for layer, s in zip(self.layers, layer_states))
        return None if all(s is None for s in closed) else DecoderState(closed, 0)

    def _forward(self, tokens: Tensor, layer_states: Tuple[LayerState, ...], offset: int,
                 lengths: Tensor) -> Tuple[Tensor, Tuple[LayerState, ...]]:
        """tokens (B, T) starting ``offset`` tokens into segments of ``lengths`` (B|1, 1) -> (features (B, T, C),
        the layers' open states)."""
        x = self.embed_tokens(tokens)  # (B, T, C) scaled by sqrt(C)
        position = offset + torch.arange(tokens.size(1), device=tokens.device)[None]  # (1, T)
        absolute = self.input_position.embed(position, lengths, x.dtype)  # (B|1, T, C) or None
        if absolute is not None:
            x = x + absolute
        x = F.dropout(x, self.dropout, self.training)
        new_states = []
        for layer, layer_state in zip(self.layers, layer_states):
            x, layer_state = layer(x, layer_state)  # (B, T, C)
            new_states.append(layer_state)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return F.dropout(x, self.dropout, self.training), tuple(new_states)
