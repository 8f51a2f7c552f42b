"""Arch presets: ``set_defaults(args, name=value, ...)`` sets each value the command line did not set (fairseq's
convention for ``register_model_architecture`` functions), so a preset states only what differs."""
from typing import Any

from fairseq.utils import safe_getattr


def set_defaults(args: Any, **values: Any) -> None:
    for name, value in values.items():
        setattr(args, name, safe_getattr(args, name, value))
