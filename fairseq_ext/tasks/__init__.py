"""Registered tasks, and the task checks every fairseq command runs first (``launch_checks``)."""
from . import launch_checks, streaming_lm  # noqa: F401

launch_checks.register()
