"""The one place where state lives between calls: ``StatefulDecoder`` and its model ``StatefulLanguageModel``.

A subclass implements a pure ``forward_segment(tokens (B, T), state) -> (features (B, T, C), new_state, extra)``
and ``output_layer``. The base decides which state a call continues from:

* with fairseq's ``incremental_state`` (generation): the state object and the number of tokens already consumed
  live in ``incremental_state``; only the new tokens ``prev_output_tokens[:, consumed:]`` are fed (to
  ``forward_incremental``, which is ``forward_segment`` unless a model's state depends on where segments start,
  as Transformer-XL's memory does), and ``reorder_incremental_state`` calls ``state.reorder`` (beam search).
  Same state objects, same code path.
* without it (training, validation, streaming evaluation): one state per stream, "train" while
  ``self.training`` and "eval" otherwise; the stored state is always ``new_state.detach()`` (truncated BPTT), and
  a stream whose batch size changes starts over from ``None``. Under ``stream_rows(start, stop, batch_size)`` a call
  is one row slice of a batch (``streaming_lm --batch-split``): it continues rows [start, stop) of the stream's
  state, and the slices' new states are joined back in row order once the last slice has run.

The task owns the boundaries. What it calls, and nothing else:

* ``attach_streams(source)``: its batches continue the same streams (until then carrying a state into a second
  batch is an error);
* ``reset_stream_state(model, stream)``: forget "train" at an epoch start, "eval" at a validation start;
* ``stream_rows(start, stop, batch_size)``: run one row slice of a batch (``--batch-split``);
* the saved "train" stream (``train_stream.SavedTrainStream``, exact resume): ``gather_train_stream(group)``
  before a save, then on resume ``has_saved_train_stream``, ``resume_train_stream(segment)`` or
  ``discard_saved_train_stream(reason)``.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
from typing import Any, Dict, Iterator, List, Optional, Tuple

from fairseq.models import FairseqIncrementalDecoder, FairseqLanguageModel
from omegaconf import DictConfig
from torch import Tensor, nn

from fairseq_ext.models.base.compile import compile_blocks
from fairseq_ext.models.base.sliding_estimate import log_sliding_estimate
from fairseq_ext.models.base.train_stream import SavedTrainStream
from fairseq_ext.state import SegmentState, cat_states

logger = logging.getLogger(__name__)

STREAMS: Tuple[str, ...] = ("train", "eval")
IncrementalState = Dict[str, Dict[str, Any]]
SegmentOutput = Tuple[Tensor, Optional[SegmentState], Dict[str, Any]]

CONTEXT_WINDOW_ERROR = (
    "{name} carries state across segments, so --context-window {window} (the sliding-window protocol, which "
    "re-reads overlapping windows without state) does not apply to it. Evaluate it with the streaming protocol "
    "instead: --task streaming_lm without --context-window (state carried across segments of --tokens-per-sample "
    "tokens in --batch-size contiguous streams)."
)

STREAM_SOURCE_ERROR = (
    "{name} carries its state from one batch to the next, which is only correct when every batch row continues the "
    "same row of the previous batch. Train and evaluate it with --task streaming_lm (fairseq-train / fairseq-eval-lm "
    "--task streaming_lm --batch-size B --tokens-per-sample T); fairseq's language_modeling task batches unrelated "
    "blocks. Generation (incremental decoding) needs no task support. In code: decoder.attach_streams(source) once "
    "batches are contiguous streams, or reset_state() between unrelated batches."
)


@dataclasses.dataclass
class _RowSplit:
    """A batch of ``batch_size`` streams being run in row slices (``StatefulDecoder.stream_rows``)."""

    stream: str
    batch_size: int
    base: Optional[SegmentState]  # the stream's state before this batch, all rows
    parts: List[Optional[SegmentState]]  # the new state of every slice run so far, in row order
    next_row: int = 0


class StatefulDecoder(SavedTrainStream, FairseqIncrementalDecoder, abc.ABC):
    """Decoder base that carries a ``SegmentState`` from one call to the next (see the module docstring)."""

    def __init__(self, dictionary) -> None:
        super().__init__(dictionary)
        self._streams: Dict[str, Optional[SegmentState]] = {name: None for name in STREAMS}
        self.stream_source: Optional[str] = None  # set by attach_streams: who guarantees batch continuity
        self._train_segments = 0  # training calls since the "train" stream was last reset
        self._pending_train: Optional[Dict[str, Any]] = None  # a checkpoint's train stream, until resumed
        # every data-parallel rank's train stream as plain dicts (rank order), collected on rank 0 for the next save
        # by gather_train_stream; dropped when the "train" stream moves on (a new segment, a reset)
        self._gathered_train: Optional[List[Any]] = None
        self._rows: Optional[Tuple[int, int, int]] = None  # (start, stop, batch size) inside stream_rows
        self._split: Optional[_RowSplit] = None  # the batch whose row slices are running

    @property
    def carries_state(self) -> bool:
        """Whether this configuration carries state from one segment to the next (then fairseq-eval-lm's sliding
        window does not apply). Models whose state can be switched off override it."""
        return True

    @property
    def memory_description(self) -> str:
        """What this configuration carries across segments, for evaluation protocol labels (models override it with
        their memory's size)."""
        return "state carried across segments" if self.carries_state else "none"

    def attach_streams(self, source: str) -> None:
        """Declare that consecutive batches continue the same streams (``streaming_lm`` does, fairseq's
        ``language_modeling`` does not). Until then, carrying a state into a second batch is an error."""
        self.stream_source = source

    @abc.abstractmethod
    def forward_segment(self, tokens: Tensor, state: Optional[SegmentState]) -> SegmentOutput:
        """Pure step: tokens (B, T), the state after the previous segment (None: cold start) ->
        (features (B, T, C), state after this segment, extra outputs)."""

    def forward_incremental(self, tokens: Tensor, state: Optional[SegmentState]) -> SegmentOutput:
        """Incremental decoding step over new tokens (B, T_new); by default the same as ``forward_segment``.
        Models whose state depends on where segments start (Transformer-XL memory) override it."""
        return self.forward_segment(tokens, state)

    @abc.abstractmethod
    def output_layer(self, features: Tensor) -> Tensor:
        """features (B, T, C) -> logits (B, T, V) (or features unchanged when ``self.adaptive_softmax`` is set)."""

    def forward(self, prev_output_tokens: Tensor, encoder_out: Optional[Dict[str, Any]] = None,
                incremental_state: Optional[IncrementalState] = None, features_only: bool = False,
                src_lengths: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Any]]:
        """prev_output_tokens (B, T) -> (logits (B, T', V) or features (B, T', C), extra); T' = new tokens.

        ``src_lengths`` (B,) is accepted because fairseq passes the whole ``net_input``; rows are end-padded, so
        causal models need no mask.
        """
        features, extra = self.extract_features(prev_output_tokens, encoder_out, incremental_state)
        return (features if features_only else self.output_layer(features)), extra

    def extract_features(self, prev_output_tokens: Tensor, encoder_out: Optional[Dict[str, Any]] = None,
                         incremental_state: Optional[IncrementalState] = None) -> Tuple[Tensor, Dict[str, Any]]:
        if encoder_out is not None:
            raise ValueError(f"{type(self).__name__} is a decoder-only language model; encoder_out must be None")
        if incremental_state is not None:
            features, extra = self._incremental_step(prev_output_tokens, incremental_state)
        else:
            features, extra = self._stream_step(prev_output_tokens)
        return features, {"attn": None, **extra}  # fairseq's generator and scorer read extra["attn"]

    def _incremental_step(self, prev_output_tokens: Tensor,
                          incremental_state: IncrementalState) -> Tuple[Tensor, Dict[str, Any]]:
        saved = self.get_incremental_state(incremental_state, "stream")
        state, consumed = (None, 0) if saved is None else (saved["state"], saved["consumed"])
        tokens = prev_output_tokens[:, consumed:]  # (B, T_new)
        if tokens.size(1) == 0:
            raise ValueError(f"incremental decoding got no new tokens: {consumed} consumed, "
                             f"prev_output_tokens has {prev_output_tokens.size(1)}")
        features, new_state, extra = self.forward_incremental(tokens, state)
        self.set_incremental_state(incremental_state, "stream",
                                   {"state": new_state, "consumed": consumed + tokens.size(1)})
        return features, extra

    def reorder_incremental_state(self, incremental_state: IncrementalState, new_order: Tensor) -> None:
        """Select rows ``new_order`` (B',) of the incremental state (beam search)."""
        saved = self.get_incremental_state(incremental_state, "stream")
        if saved is not None and saved["state"] is not None:
            self.set_incremental_state(incremental_state, "stream",
                                       {"state": saved["state"].reorder(new_order), "consumed": saved["consumed"]})

    def _stream_step(self, tokens: Tensor) -> Tuple[Tensor, Dict[str, Any]]:
        stream = "train" if self.training else "eval"
        if self._rows is not None:
            return self._row_slice_step(stream, tokens)
        features, new_state, extra = self.forward_segment(tokens, self._continued_state(stream, tokens.size(0)))
        self._store(stream, new_state)
        return features, extra

    def _continued_state(self, stream: str, batch_size: int) -> Optional[SegmentState]:
        """The state a batch of ``batch_size`` rows continues on ``stream`` (None: start over)."""
        state = self._streams[stream]
        if state is not None and self.stream_source is None:
            raise RuntimeError(STREAM_SOURCE_ERROR.format(name=type(self).__name__))
        if state is not None and state.batch_size != batch_size:
            logger.info("%s: %r stream batch size changed from %d to %d; starting it over from an empty state",
                        type(self).__name__, stream, state.batch_size, batch_size)
            state = None
        return state

    def _store(self, stream: str, new_state: Optional[SegmentState]) -> None:
        """Keep the state after a whole batch (truncated BPTT: detached); count training segments."""
        self._streams[stream] = None if new_state is None else new_state.detach()
        if stream == "train":
            self._gathered_train = None
            self._train_segments += 1

    def _row_slice_step(self, stream: str, tokens: Tensor) -> Tuple[Tensor, Dict[str, Any]]:
        """tokens (stop - start, T): rows [start, stop) of a batch (see ``stream_rows``)."""
        start, stop, batch_size = self._rows
        if tokens.size(0) != stop - start:
            raise ValueError(f"stream_rows({start}, {stop}, {batch_size}) expects {stop - start} rows, got "
                             f"{tokens.size(0)}")
        if start == 0:  # the batch's first slice: its state (batch-size check on the whole batch)
            self._split = _RowSplit(stream, batch_size, self._continued_state(stream, batch_size), [])
        split = self._split
        if split is None or (split.stream, split.batch_size, split.next_row) != (stream, batch_size, start):
            self._split = None
            raise RuntimeError(f"{type(self).__name__}: row slices of a batch must each run once, in row order from "
                               f"row 0; got rows [{start}, {stop}) of {batch_size} on the {stream!r} stream")
        features, new_state, extra = self.forward_segment(
            tokens, None if split.base is None else split.base.rows(start, stop))
        split.parts.append(None if new_state is None else new_state.detach())
        split.next_row = stop
        if stop == batch_size:  # the last slice: the batch is done, join the slices' states in row order
            self._split = None
            self._store(stream, cat_states(split.parts))
        return features, extra

    @contextlib.contextmanager
    def stream_rows(self, start: int, stop: int, batch_size: int) -> Iterator[None]:
        """Run the stream calls inside as rows [start, stop) of a batch of ``batch_size`` streams (micro-batching,
        ``streaming_lm --batch-split``): each continues those rows of the stream's state, and once the slice ending
        at ``batch_size`` has run, the slices' new states are joined in row order and stored as the stream's state
        (one segment). Slices must run in order from row 0, one call each; until the last one the stream's stored
        state is still the one before the batch. Incremental decoding is unaffected."""
        if not 0 <= start < stop <= batch_size:
            raise ValueError(f"stream_rows: need 0 <= start < stop <= batch_size, got [{start}, {stop}) of "
                             f"{batch_size}")
        if self._rows is not None:
            raise RuntimeError("stream_rows contexts do not nest")
        self._rows = (start, stop, batch_size)
        try:
            yield
        finally:
            self._rows = None

    def stream_state(self, stream: str) -> Optional[SegmentState]:
        """The state the next call on ``stream`` ("train" / "eval") continues from (None: cold start)."""
        return self._streams[_check_stream(stream)]

    def reset_state(self, stream: Optional[str] = None) -> None:
        """Forget the state of ``stream`` ("train" / "eval"), or of every stream when None."""
        for name in STREAMS if stream is None else (_check_stream(stream),):
            self._streams[name] = None
            if self._split is not None and self._split.stream == name:
                self._split = None  # a batch cut by a reset does not complete
            if name == "train":
                self._train_segments = 0
                self._gathered_train = None


def segment_pieces(num_tokens: int, offset: int, segment_length: Optional[int]) -> List[Tuple[int, int, bool]]:
    """How incremental decoding cuts ``num_tokens`` new tokens at the streaming pass's segment boundaries, when
    ``offset`` tokens of the current segment of ``segment_length`` have been read: pieces (start, stop, closes),
    ``closes`` True when the piece ends a segment (where the streaming pass would cut its memory)."""
    if segment_length is None or segment_length < 1:
        raise ValueError("incremental decoding needs tokens_per_sample >= 1 (the segment length whose boundaries it "
                         "reproduces); set --tokens-per-sample")
    if not 0 <= offset < segment_length:
        raise ValueError(f"offset {offset} must be in [0, {segment_length})")
    pieces, start = [], 0
    while start < num_tokens:
        stop = start + min(num_tokens - start, segment_length - offset)
        offset = (offset + stop - start) % segment_length
        pieces.append((start, stop, offset == 0))
        start = stop
    return pieces


def _check_stream(stream: str) -> str:
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; streams are {STREAMS}")
    return stream


def reset_stream_state(model: nn.Module, stream: Optional[str] = None) -> int:
    """Reset ``stream`` of every StatefulDecoder inside ``model`` (wrappers such as DDP's ``.module`` included,
    since they register the wrapped model as a submodule). Returns how many decoders were reset."""
    decoders = [m for m in model.modules() if isinstance(m, StatefulDecoder)]
    for decoder in decoders:
        decoder.reset_state(stream)
    return len(decoders)


class StatefulLanguageModel(FairseqLanguageModel):
    """Decoder-only model over a StatefulDecoder; rejects the sliding-window protocol at inference."""

    decoder_class: type  # the model's StatefulDecoder subclass, built from (cfg, dictionary)

    @classmethod
    def build_model(cls, cfg: Any, task: Any) -> "StatefulLanguageModel":
        model = cls(cls.decoder_class(cfg, task.target_dictionary))
        compile_blocks(model.decoder, cfg)
        return model

    def __init__(self, decoder: StatefulDecoder) -> None:
        if not isinstance(decoder, StatefulDecoder):
            raise TypeError(f"{type(self).__name__} needs a StatefulDecoder, got {type(decoder).__name__}")
        super().__init__(decoder)

    def prepare_for_inference_(self, cfg: DictConfig) -> None:
        """Rejects fairseq-eval-lm's sliding window when the decoder carries state across segments
        (``StatefulDecoder.carries_state``); a configuration that carries nothing is stateless per call, so fairseq's
        sliding window applies to it."""
        eval_lm = getattr(cfg, "eval_lm", None)
        window = getattr(eval_lm, "context_window", 0) if eval_lm is not None else 0
        if window and window > 0 and self.decoder.carries_state:
            raise ValueError(CONTEXT_WINDOW_ERROR.format(name=type(self).__name__, window=window))
        super().prepare_for_inference_(cfg)
        if window and window > 0:
            log_sliding_estimate(self, cfg)

    def reset_state(self, stream: Optional[str] = None) -> None:
        """Forget the carried state of ``stream`` ("train" / "eval"), or of both when None."""
        self.decoder.reset_state(stream)
