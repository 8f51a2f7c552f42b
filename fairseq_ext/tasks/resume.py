"""Resuming ``streaming_lm``'s training streams exactly: every training sample carries its stream cursor (where its
segment starts and ends: the token offset in every stream, the number of streams and the split length), the task
saves the end of the last step with the checkpoint, and a resumed run continues the saved streams only if its first
sample starts at that cursor; otherwise they start cold and the log says why."""
from typing import Any, Dict, List, Optional

from torch import nn

from fairseq_ext.data import StreamDataset
from fairseq_ext.models.base import StatefulDecoder

Cursor = Dict[str, int]  # {"streams", "tokens", "offset"}: see stream_cursor


def stream_cursor(layout: StreamDataset, segment: int) -> Cursor:
    """Where scored segment ``segment`` of ``layout`` starts: the target offset in every stream (the same for every
    stream and worker), the number of streams and the split length. Two cursors are equal exactly when a state
    carried to the one continues the text at the other."""
    return {"streams": layout.batch_size * layout.num_shards, "tokens": len(layout.tokens),
            "offset": layout.start_offset + layout.segment_start(segment)}


def cursor_mismatch(saved: Optional[Cursor], here: Cursor) -> Optional[str]:
    """Why training at cursor ``here`` does not continue a state that ended at ``saved`` (None: it does)."""
    if saved == here:
        return None
    if saved is None:
        return "the checkpoint records no position of its training streams"
    if saved["streams"] != here["streams"]:
        return (f"the training data is now cut into {here['streams']} streams (--batch-size x workers), the "
                f"checkpoint's into {saved['streams']}")
    if saved["tokens"] != here["tokens"]:
        return f"the training split now has {here['tokens']:,} tokens, the checkpoint's had {saved['tokens']:,}"
    return (f"training resumes at token {here['offset']:,} of every stream but the saved state ends at token "
            f"{saved['offset']:,} (--tokens-per-sample, --variable-bptt, --train-stream-offset or the data "
            f"loader changed)")


class TrainCursorCollater:
    """The training collater: ``layout``'s batch plus ``sample["stream_cursor"]``, the cursors of the segment's
    start and end (``stream_cursor``), so that the task can tell whether a saved state continues into it."""

    def __init__(self, layout: StreamDataset) -> None:
        self.layout = layout

    def __call__(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        sample = self.layout.collater(items)
        if sample:
            segment = sample["segment"]
            sample["stream_cursor"] = {"start": stream_cursor(self.layout, segment),
                                       "end": stream_cursor(self.layout, segment + 1)}
        return sample


class TrainStreamResume:
    """The task's record of its training streams: where they end after the last step (``end``, saved with the
    checkpoint), where a loaded checkpoint's end (``saved_end``), and the decoders holding such a checkpoint's streams
    until the first training step decides whether they continue (``pending``)."""

    def __init__(self) -> None:
        self.saved_end: Optional[Cursor] = None
        self.end: Optional[Cursor] = None
        self.pending: List[StatefulDecoder] = []

    def begin_epoch(self, model: nn.Module) -> None:
        """No step yet; fairseq loads a checkpoint before the epoch begins, so its training streams are pending."""
        self.end = None
        self.pending = [m for m in model.modules() if isinstance(m, StatefulDecoder) and m.has_saved_train_stream]

    def before_step(self, sample: Dict[str, Any]) -> None:
        """A training step on ``sample``: on a resumed run's first step, continue the checkpoint's training streams
        if the sample reads the text right after where they ended (same streams, same split, same token offset),
        else start them cold with the reason logged; then remember where this step ends."""
        cursor = sample.get("stream_cursor") if sample else None
        if cursor is None:
            return
        if self.pending:
            reason = cursor_mismatch(self.saved_end, cursor["start"])
            for decoder in self.pending:
                if reason is None:
                    decoder.resume_train_stream(sample["segment"])
                else:
                    decoder.discard_saved_train_stream(reason)
            self.pending = []
        self.end = cursor["end"]
