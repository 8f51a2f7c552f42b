"""Converters for the original systems' released checkpoints (pure dict -> dict rewrites plus safe I/O)."""
