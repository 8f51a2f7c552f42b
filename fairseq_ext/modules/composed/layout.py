"""Per-layer choices of the composed core and the rules that make a combination possible, checked before any
tensor is built (each error names the valid choices).

A layout is three comma-separated patterns, one entry per layer (one entry: every layer; k entries with k dividing
the number of layers: repeated, e.g. ``softmax,softmax,delta`` over 6 layers):

* mixer:    softmax | span (softmax with an adaptive-span soft mask) | sum | delta (fast weights) | sha
* position: none | alibi | xl            (relative terms; absolute ones are the model's --input-position)
* source:   segment | memory | window, optionally ``+persistent``
"""
from __future__ import annotations

import dataclasses
from typing import List

from fairseq_ext.errors import ConfigError
from fairseq_ext.modules.composed.positions import RELATIVE
from fairseq_ext.modules.composed.sources import SOURCES

MIXERS = ("softmax", "span", "sum", "delta", "sha")
SOFTMAX_MIXERS = ("softmax", "span")
FAST_WEIGHT_MIXERS = ("sum", "delta")
LAYER_POSITIONS = ("none", *RELATIVE)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    mixer: str
    position: str
    source: str
    persistent: bool


def expand_pattern(pattern: str, layers: int, flag: str) -> List[str]:
    entries = [entry.strip() for entry in str(pattern).split(",")]
    if any(not entry for entry in entries) or layers % len(entries):
        raise ConfigError(f"{flag} {pattern!r} has {len(entries)} entries, which do not tile --decoder-layers "
                          f"{layers}; give 1 entry, {layers} entries, or a pattern whose length divides {layers}")
    return entries * (layers // len(entries))


def parse_layout(mixer: str, position: str, source: str, layers: int) -> List[LayerSpec]:
    if layers < 1:
        raise ConfigError(f"--decoder-layers must be >= 1, got {layers}")
    specs = []
    for m, p, s in zip(expand_pattern(mixer, layers, "--mixer"), expand_pattern(position, layers, "--position"),
                       expand_pattern(source, layers, "--source"), strict=True):
        parts = s.split("+")
        persistent = parts[1:] == ["persistent"]
        if len(parts) > 2 or (len(parts) == 2 and not persistent):
            raise ConfigError(f"--source entry {s!r}: a source is one of {SOURCES}, optionally followed by "
                              f"'+persistent'")
        specs.append(LayerSpec(m, p, parts[0], persistent))
    return specs


def check_layer(index: int, spec: LayerSpec, mem_len: int, attn_span: int, persistent_slots: int) -> None:
    """Raise ConfigError for a combination that cannot be built."""
    where = f"layer {index} ({spec.mixer}, position {spec.position}, source {spec.source})"
    if spec.mixer not in MIXERS:
        raise ConfigError(f"{where}: unknown mixer {spec.mixer!r}; choose one of {MIXERS}")
    if "+" in spec.position:
        raise ConfigError(f"{where}: one relative position term per layer (ALiBi and Transformer-XL's relative term "
                          f"both encode the query-key distance); choose one of {LAYER_POSITIONS}")
    if spec.position not in LAYER_POSITIONS:
        raise ConfigError(f"{where}: unknown layer position {spec.position!r}; choose one of {LAYER_POSITIONS} "
                          f"(absolute positions are --input-position sinusoidal|descending)")
    if spec.source not in SOURCES:
        raise ConfigError(f"{where}: unknown source {spec.source!r}; choose one of {SOURCES} (+persistent)")
    if spec.mixer not in SOFTMAX_MIXERS:
        if spec.position != "none":
            raise ConfigError(f"{where}: a {spec.mixer} layer has no score matrix for a relative position term; use "
                              f"position none for it (absolute positions: --input-position); valid for "
                              f"{spec.mixer}: none")
        if spec.source == "window":
            raise ConfigError(f"{where}: a key/value cache window feeds softmax attention; a {spec.mixer} layer "
                              f"reads its own memory: use source segment or memory (valid: segment, memory)")
    if spec.mixer == "sha" and spec.persistent:
        raise ConfigError(f"{where}: single-head attention has no persistent slots; use source segment or memory")
    if spec.source in ("memory", "window") and mem_len < 1 and spec.mixer not in FAST_WEIGHT_MIXERS:
        raise ConfigError(f"{where}: source {spec.source} needs --mem-len >= 1 (the memory / window length)")
    if spec.persistent and spec.mixer in SOFTMAX_MIXERS and persistent_slots < 1:
        raise ConfigError(f"{where}: +persistent needs --pers-mem-size >= 1 (the learned key/value slots)")
    if spec.mixer == "span":
        if attn_span < 1:
            raise ConfigError(f"{where}: a span layer needs --attn-span >= 1 (the maximum span L)")
        if spec.source in ("memory", "window") and attn_span > mem_len:
            raise ConfigError(f"{where}: --attn-span {attn_span} is larger than the {spec.source} of --mem-len "
                              f"{mem_len}, so the first queries of a segment could never see their whole span; set "
                              f"--mem-len >= {attn_span} or --attn-span <= {mem_len}")
