"""User-facing errors: a mistake in the command line, the data or an input file, reported as one line.

Raise a ``UserError`` subclass when the fix is the user's (a flag, a path, a file); its message names the fix.
Command-line programs print such an error as one line, ``error: <message>``, without a traceback
(``fairseq_ext.compat.errors`` installs the hook), and still exit non-zero. Each class also derives from the
builtin exception a caller would catch (``ValueError``, ``FileNotFoundError``), so ``except ValueError`` keeps
working. Bugs (anything else) keep their traceback.
"""


class UserError(Exception):
    """Base: the message is complete and names the fix; no traceback is shown for it.

    Raised in a data-loader worker, torch rebuilds the error in the main process from the text "Caught <class> in
    DataLoader worker process N. Original Traceback ...: <message>"; the constructor keeps only <message>, so the
    command still prints one line.
    """

    def __init__(self, message: str = "") -> None:
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class ConfigError(UserError, ValueError):
    """An impossible or unsupported combination of flags."""


class DataError(UserError, ValueError):
    """Binarised data, a dictionary or a checkpoint that cannot be used as given (corrupt, mismatched, empty)."""


class MissingFileError(UserError, FileNotFoundError):
    """A path that should exist does not."""
