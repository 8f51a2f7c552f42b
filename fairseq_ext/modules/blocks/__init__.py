"""Transformer blocks (attention + feed-forward with residuals and LayerNorm)."""
