"""Registered models: one file per model, file stem == registered name."""
from . import alibi_lm  # noqa: F401
