"""Build one composed layer's mixer from its ``LayerSpec`` (``layout.py``) and the model-wide sizes."""
from __future__ import annotations

import dataclasses

from torch import nn

from fairseq_ext.modules.attention.adaptive_span_mask import AdaptiveSpanMask
from fairseq_ext.modules.composed.layout import FAST_WEIGHT_MIXERS, LayerSpec
from fairseq_ext.modules.composed.positions import build_position
from fairseq_ext.modules.composed.recurrent_mixers import FastWeightMixer, SingleHeadMixer
from fairseq_ext.modules.composed.softmax_mixer import SoftmaxMixer
from fairseq_ext.modules.composed.sources import build_source


@dataclasses.dataclass(frozen=True)
class MixerSizes:
    """Model-wide settings every mixer draws from."""
    embed_dim: int
    num_heads: int
    head_dim: int
    attention_dropout: float
    mem_len: int
    persistent_slots: int
    attn_span: int
    span_ramp: int
    span_init: float
    span_loss: float
    feature_map: str
    fw_normalize: str  # auto: output for the sum rule, none for the delta rule
    performer_proj_dim: int
    dpfp_n_roll: int
    fw_chunk_size: int
    attn_impl: str
    fw_impl: str


def build_mixer(spec: LayerSpec, sizes: MixerSizes) -> nn.Module:
    if spec.mixer in FAST_WEIGHT_MIXERS:
        normalize = sizes.fw_normalize if sizes.fw_normalize != "auto" else \
            ("output" if spec.mixer == "sum" else "none")
        return FastWeightMixer(sizes.embed_dim, sizes.num_heads, sizes.head_dim, sizes.feature_map, spec.mixer,
                               normalize, carry=spec.source == "memory", persistent=spec.persistent,
                               performer_proj_dim=sizes.performer_proj_dim, dpfp_n_roll=sizes.dpfp_n_roll,
                               attn_impl=sizes.fw_impl, chunk_size=sizes.fw_chunk_size)
    source = build_source(spec.source, sizes.mem_len)
    if spec.mixer == "sha":
        return SingleHeadMixer(sizes.embed_dim, sizes.attention_dropout, source)
    span = None
    if spec.mixer == "span":
        span = AdaptiveSpanMask(sizes.num_heads, sizes.attn_span, sizes.span_ramp, sizes.span_init, sizes.span_loss,
                                adapt_cache=False)
    return SoftmaxMixer(sizes.embed_dim, sizes.num_heads, sizes.head_dim, sizes.attention_dropout,
                        build_position(spec.position, sizes.embed_dim, sizes.num_heads, sizes.head_dim), source,
                        sizes.persistent_slots if spec.persistent else 0, span, sizes.attn_impl)
