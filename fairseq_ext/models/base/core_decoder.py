"""``CoreDecoder``: the one decoder loop of every model, read top to bottom:

    x = embed(tokens) = Drop_in(E[tokens] + P_abs)   (embedding / adaptive input; P_abs an absolute position term)
    c = layer_context(tokens, x, states, offset, T)  (what every layer shares in this call, e.g. Transformer-XL's R)
    x, state_l = Block_l(x, state_l, c)   l = 1..N   (ComposedBlock or a system's own block)
    features = finish(x) = Drop(LN(x))               (LN only where the stack has a final one)

and the output layer reads the features (the adaptive softmax, or a model's own ``output_layer``).

A block is any module with ``forward(x, state, context) -> (y, open state)``, ``close(state)`` (the state the next
segment starts from: memory cut to M, segment caches dropped, fast weights kept only when carried) and
``carries_state``. State: one ``DecoderState`` (per-layer states, and the offset into the current segment). A
streaming call is one whole segment: every layer's state is closed at its end. Incremental decoding cuts its tokens
at the same segment boundaries (``segment_pieces``), so its log-probabilities equal the streaming pass over segments
of ``tokens_per_sample``; a decoder whose outputs do not depend on where segments start (``cuts_at_segments``
False: adaptive span's caches, ALiBi's KV cache) runs new tokens as one continuation of the open state.

A model's decoder validates its own config, builds the pieces and hands them to ``__init__``: ``composed_lm`` from
per-layer patterns, ``fast_weight_lm`` from lmtool's settings, ``transformer_xl_lm``, ``sha_rnn_lm`` and
``adaptive_span_lm`` with their own blocks and ``layer_context``; ``alibi_lm`` also replaces ``embed`` and
``finish`` with fairseq's transformer_lm input and output stages.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fairseq_ext.models.base.stateful_decoder import SegmentOutput, StatefulDecoder, segment_pieces
from fairseq_ext.modules.composed import PositionTerm
from fairseq_ext.ops.dropout import dropout
from fairseq_ext.state import DecoderState, SegmentState

MAX_POSITIONS = 1_000_000  # no learned positions: fairseq uses this only for filtering
LayerState = Optional[SegmentState]


class CoreDecoder(StatefulDecoder):
    """Input (+ absolute positions) -> dropout -> blocks -> (LN) -> dropout -> output; see the module docstring."""

    cuts_at_segments = True  # whether incremental decoding closes the state at tokens_per_sample boundaries

    def __init__(self, dictionary, embed_tokens: nn.Module, input_position: PositionTerm, layers: Sequence[nn.Module],
                 layer_norm: Optional[nn.Module], adaptive_softmax: Optional[nn.Module],
                 dropout: float, tokens_per_sample: Optional[int], input_dropout: Optional[float] = None) -> None:
        """adaptive_softmax: fairseq's AdaptiveSoftmax interface (``ProjectedAdaptiveLogSoftmax`` or fairseq's own), or
        None; input_dropout: dropout on the input embeddings (default: ``dropout``). The submodules are registered in
        the order above: ``parameters()``, which optimizer states index, lists the decoder's own parameters (e.g.
        Transformer-XL's shared u, v), then these modules' in this order."""
        super().__init__(dictionary)
        self.embed_tokens = embed_tokens
        self.input_position = input_position
        self.layers = nn.ModuleList(layers)
        self.layer_norm = layer_norm
        self.adaptive_softmax = adaptive_softmax
        self.dropout = dropout
        self.input_dropout = dropout if input_dropout is None else input_dropout
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
        features, layer_states = self._forward(tokens, self._layer_states(state), 0, lengths, tokens.size(1))
        return features, self._closed(layer_states), {}

    def forward_incremental(self, tokens: Tensor, state: Optional[DecoderState]) -> SegmentOutput:
        """New tokens (B, T_new) of generation, cut at the streaming pass's segment boundaries (in one piece, the
        open state kept, when the decoder does not cut at segments)."""
        offset = state.offset if state is not None else 0
        layer_states = self._layer_states(state)
        if not self.cuts_at_segments:
            lengths = torch.full((1, 1), offset + tokens.size(1), device=tokens.device)
            features, layer_states = self._forward(tokens, layer_states, offset, lengths, offset + tokens.size(1))
            return features, DecoderState(layer_states, offset + tokens.size(1)), {}
        outputs: List[Tensor] = []
        seg_len = torch.full((1, 1), self.tokens_per_sample or 0, device=tokens.device)
        for start, stop, closes in segment_pieces(tokens.size(1), offset, self.tokens_per_sample):
            features, layer_states = self._forward(tokens[:, start:stop], layer_states, offset, seg_len,
                                                   self.tokens_per_sample)
            outputs.append(features)
            offset = 0 if closes else offset + stop - start
            if closes:
                layer_states = self._layer_states(self._closed(layer_states))
        return torch.cat(outputs, dim=1), DecoderState(layer_states, offset), {}

    def keep_module_order(self, names: Sequence[str]) -> None:
        """Re-register the submodules ``names`` first, in that order (the rest keep theirs after them): the
        ``parameters()`` order in which a family's existing checkpoints saved their optimizer states."""
        order = [name for name in names if name in self._modules]
        order += [name for name in self._modules if name not in order]
        self._modules = {name: self._modules[name] for name in order}

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

    def layer_context(self, tokens: Tensor, x: Tensor, layer_states: Tuple[LayerState, ...], offset: int,
                      segment_length: int) -> Optional[object]:
        """What every block shares in one call (None by default): tokens (B, T) and x (B, T, C) the block input,
        starting ``offset`` tokens into a segment of ``segment_length`` tokens, over the layers' states."""
        return None

    def embed(self, tokens: Tensor, offset: int, lengths: Tensor) -> Tensor:
        """tokens (B, T), ``offset`` tokens into segments of ``lengths`` (B|1, 1) -> the first block's input (B, T, C):
        the embedding plus the absolute position term, then input dropout."""
        x = self.embed_tokens(tokens)  # (B, T, C)
        position = offset + torch.arange(tokens.size(1), device=tokens.device)[None]  # (1, T)
        absolute = self.input_position.embed(position, lengths, x.dtype)  # (B|1, T, C) or None
        if absolute is not None:
            x = x + absolute
        return dropout(x, self.input_dropout, self.training)

    def finish(self, x: Tensor) -> Tensor:
        """The last block's output (B, T, C) -> the features: final LN (where the stack has one), then dropout."""
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return dropout(x, self.dropout, self.training)

    def _forward(self, tokens: Tensor, layer_states: Tuple[LayerState, ...], offset: int, lengths: Tensor,
                 segment_length: int) -> Tuple[Tensor, Tuple[LayerState, ...]]:
        """tokens (B, T) starting ``offset`` tokens into segments of ``lengths`` (B|1, 1) real tokens (of
        ``segment_length`` tokens, the call's length when streaming) -> (features (B, T, C), the open states)."""
        x = self.embed(tokens, offset, lengths)  # (B, T, C)
        context = self.layer_context(tokens, x, layer_states, offset, segment_length)
        new_states = []
        for layer, layer_state in zip(self.layers, layer_states):
            x, layer_state = layer(x, layer_state, context)  # (B, T, C)
            new_states.append(layer_state)
        return self.finish(x), tuple(new_states)
