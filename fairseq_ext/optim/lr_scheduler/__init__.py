"""Registered LR schedulers: one file per scheduler, file stem == registered name."""
from . import cosine_warmup_xl  # noqa: F401
