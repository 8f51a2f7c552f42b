"""Registered models: one file per model, file stem == registered name."""
from . import adaptive_span_lm, alibi_lm, composed_lm, fast_weight_lm, sha_rnn_lm, transformer_xl_lm  # noqa: F401
