"""Model bases shared by the registered models (nothing here is registered with fairseq)."""
from .stateful_decoder import (
    CONTEXT_WINDOW_ERROR,
    STREAMS,
    StatefulDecoder,
    StatefulLanguageModel,
    reset_stream_state,
    segment_pieces,
)

__all__ = ["CONTEXT_WINDOW_ERROR", "STREAMS", "StatefulDecoder", "StatefulLanguageModel", "reset_stream_state",
           "segment_pieces"]
