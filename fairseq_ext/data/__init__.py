"""Datasets and helpers for the streaming tasks."""
from .stream_dataset import StreamDataset, concat_lines

__all__ = ["StreamDataset", "concat_lines"]
