"""Registered criterions."""
from . import lm_loss  # noqa: F401
