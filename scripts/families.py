"""The comparison's models: every family as a row of fairseq-train flags, shared by ``scripts/bench.py`` (speed and
memory) and ``scripts/compare_quality.py`` (quality), so both compare the same configurations.

``family_flags(layers, dim, heads)``: every family at one size (FFN 4d; SHA-RNN: ``layers`` LSTM blocks of d, Boom
4d, one attention block); the parameter counts in the blocks match within about 10% (the tables print them). The
fast-weight model carries its fast weights across segments without absolute positions, as the paper's carry-over
configuration (``--no-pos``: positions restarting every segment would not match the carried state).
``TINY``: each family's tiny preset, for tests. Placeholders filled per run: ``{T}`` the segment length (memory,
span and window lengths follow it) and ``{W}`` the longest segment the model will read (SHA-RNN refuses a window
shorter than the segment).
"""
from __future__ import annotations

import re
import shlex
from typing import Dict, Tuple


def family_flags(layers: int, dim: int, heads: int) -> Dict[str, str]:
    size = f"--decoder-layers {layers} --decoder-embed-dim {dim} --decoder-ffn-embed-dim {4 * dim}"
    attention = f"{size} --decoder-attention-heads {heads}"
    return {
        "alibi": f"--arch alibi_lm {attention} --decoder-input-dim {dim} --decoder-output-dim {dim} "
                 f"--share-decoder-input-output-embed",
        "transformer_xl": f"--arch transformer_xl_lm {attention} --mem-len {{T}}",
        "adaptive_span": f"--arch adaptive_span_lm {attention} --attn-span {{T}}",
        "fast_weight_delta": f"--arch fast_weight_lm {attention} --attn-type linear --update-rule delta "
                             f"--carry-over-fast-weight --no-pos",
        "sha_rnn": f"--arch sha_rnn_lm {size} --max-memory {{W}}",
        "composed_hybrid": f"--arch composed_lm {attention} --mixer softmax,delta --position alibi,none "
                           f"--source memory --mem-len {{T}}",
    }


TINY: Dict[str, str] = {
    "alibi": "--arch alibi_lm_tiny",
    "transformer_xl": "--arch transformer_xl_tiny --mem-len {T}",
    "adaptive_span": "--arch adaptive_span_tiny --attn-span {T}",
    "fast_weight_delta": "--arch fast_weight_tiny --carry-over-fast-weight",
    "sha_rnn": "--arch sha_rnn_tiny --max-memory {W}",
    "composed_hybrid": "--arch composed_hybrid_delta_tiny --mem-len {T}",
}


def model_flag(item: str) -> Tuple[str, str]:
    """``--model LABEL=FLAGS`` -> (label, flags); the label is a file name (letters, digits, ``_ . -``) and the
    flags name an ``--arch``."""
    label, sep, flags = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", label.strip()) or "--arch" not in shlex.split(flags):
        raise SystemExit(f"--model {item!r}: give LABEL=FLAGS (a label of letters, digits, _ . -) with --arch "
                         f"among the flags")
    return label.strip(), flags


def fill(flags: str, segment: int, longest: int) -> str:
    """``flags`` with ``{T}`` = ``segment`` and ``{W}`` = ``longest``."""
    return flags.replace("{T}", str(segment)).replace("{W}", str(longest))
