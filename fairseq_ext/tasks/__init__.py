"""Registered tasks."""
from . import streaming_lm  # noqa: F401
