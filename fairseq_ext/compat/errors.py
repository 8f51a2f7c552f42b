"""One line for user mistakes: ``sys.excepthook`` prints a ``UserError`` as ``error: <message>``, no traceback.

fairseq sometimes wraps an error in its own (``Trainer.load_checkpoint`` re-raises any failure as "Cannot load
model parameters from checkpoint ...; please ensure that the architectures match."), so the hook looks for a
``UserError`` along the ``__cause__`` / ``__context__`` chain. Every other exception keeps Python's traceback.
The process still exits with status 1.
"""
import sys
from types import TracebackType
from typing import Optional, Type

from fairseq_ext.errors import UserError


def find_user_error(error: Optional[BaseException]) -> Optional[UserError]:
    """The first ``UserError`` in ``error``'s cause/context chain (``error`` itself first), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _excepthook(kind: Type[BaseException], error: BaseException, traceback: Optional[TracebackType]) -> None:
    user_error = find_user_error(error)
    if user_error is not None:
        sys.stderr.write(f"error: {user_error}\n")
        sys.stderr.flush()
        return
    _previous_hook(kind, error, traceback)


_previous_hook = sys.excepthook


def apply() -> None:
    global _previous_hook
    if sys.excepthook is not _excepthook:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook
