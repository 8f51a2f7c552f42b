"""The embedded demo corpus: docstrings and comments of the Python standard library (no download needed)."""
