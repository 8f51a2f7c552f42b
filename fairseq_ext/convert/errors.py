"""The converters' user errors: a source that cannot be converted as given, or an option that cannot work with it
(both one-line messages naming the fix, no traceback)."""
from fairseq_ext.errors import ConfigError, DataError


class ConversionError(DataError):
    """The source files cannot be converted as given; the message names the fix (a user error: one line, no
    traceback)."""


class ConversionFlagError(ConversionError, ConfigError):
    """A converter option that cannot work with this source (or at all)."""
