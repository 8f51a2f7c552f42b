"""``composed_lm``: a language model assembled per layer from the composable core (``fairseq_ext.modules.composed``):
a mixer (softmax, softmax with an adaptive span, sum- or delta-rule fast weights, SHA-RNN's single head), a relative
position term (none, ALiBi, Transformer-XL's) and a key/value source (the segment, Transformer-XL's hidden-state
memory, a key/value window; ``+persistent`` learned slots or a learned initial fast-weight state).

The forward pass and the state are ``CoreDecoder``'s (``models/base/core_decoder.py``): adaptive input (+ absolute
positions) -> the composed blocks (``modules/composed/block.py``; pre-LN by default) -> LN -> adaptive softmax, one
``DecoderState`` cut at the streaming pass's segment boundaries.
"""
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model, register_model_architecture
from omegaconf import II
from torch import nn

from fairseq_ext.errors import ConfigError
from fairseq_ext.models.base import StatefulLanguageModel
from fairseq_ext.models.base.compile import CompileOptions
from fairseq_ext.models.base.core_decoder import CoreDecoder
from fairseq_ext.models.base.presets import set_defaults
from fairseq_ext.modules.adaptive import ProjectedAdaptiveLogSoftmax, XLAdaptiveInput
from fairseq_ext.modules.adaptive.cutoffs import check_cutoffs
from fairseq_ext.modules.composed import (ABSOLUTE, ComposedBlock, MixerSizes, build_mixer, build_position,
                                          check_layer, parse_layout)
from fairseq_ext.modules.feature_maps import KINDS as FEATURE_MAPS
from fairseq_ext.modules.init import xl_weights_init
from fairseq_ext.ops.biased_attention import IMPLS as ATTN_IMPLS
from fairseq_ext.ops.fast_weights import IMPLS as FW_IMPLS

INPUT_POSITIONS = ("none", *ABSOLUTE)
FW_NORMALIZE = ("auto", "none", "output")  # "full" needs a fresh stream's first key, which W_0 does not have


@dataclass
class ComposedLMConfig(CompileOptions):
    decoder_layers: int = field(default=4, metadata={"help": "number of layers N"})
    decoder_embed_dim: int = field(default=256, metadata={"help": "model dim C"})
    decoder_ffn_embed_dim: int = field(default=1024, metadata={"help": "feed-forward inner dim"})
    decoder_attention_heads: int = field(default=4, metadata={"help": "attention heads H"})
    decoder_attention_head_dim: Optional[int] = field(
        default=None, metadata={"help": "per-head dim D; default C / H, which must then divide"})
    decoder_post_norm: bool = field(
        default=False, metadata={"help": "post-LN blocks (Transformer-XL's, lmtool's); default pre-LN with a final LN"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings, residuals, FFN and the output"})
    attention_dropout: float = field(default=0.0, metadata={"help": "dropout on softmax attention probabilities"})
    mixer: str = field(default="softmax", metadata={
        "help": "per-layer mixers, comma-separated (one entry: all layers; a pattern that divides the layers is "
                "repeated): softmax | span | sum | delta | sha"})
    position: str = field(default="alibi", metadata={
        "help": "per-layer relative position terms: none | alibi | xl (softmax and span layers only)"})
    source: str = field(default="segment", metadata={
        "help": "per-layer key/value sources: segment | memory | window, optionally +persistent"})
    input_position: ChoiceEnum(INPUT_POSITIONS) = field(
        default="none", metadata={"help": "absolute positions added to the embeddings: none | sinusoidal (0..T-1) "
                                          "| descending (T-1..0, lmtool's)"})
    mem_len: int = field(default=0, metadata={"help": "M: memory length (source memory) or window W (window)"})
    pers_mem_size: int = field(default=0, metadata={"help": "P learned key/value slots per +persistent layer"})
    attn_span: int = field(default=0, metadata={"help": "maximum span L of span layers"})
    adapt_span_ramp: int = field(default=32, metadata={"help": "ramp R of the soft span mask"})
    adapt_span_init: float = field(default=0.0, metadata={"help": "initial span z as a fraction of L"})
    adapt_span_loss: float = field(default=0.0, metadata={"help": "span penalty coefficient (x L x mean z)"})
    fw_feature_map: ChoiceEnum(FEATURE_MAPS) = field(
        default="linear", metadata={"help": "feature map of sum/delta layers: linear (ELU+1) | performer | dpfp"})
    fwp_normalize: ChoiceEnum(FW_NORMALIZE) = field(
        default="auto", metadata={"help": "fast-weight output normalisation; auto: output for sum, none for delta"})
    performer_proj_dim: int = field(default=16, metadata={"help": "FAVOR+ random features m"})
    dpfp_n_roll: int = field(default=2, metadata={"help": "DPFP nu"})
    fwp_chunk_size: int = field(default=64, metadata={"help": "chunk size of the chunkwise-parallel fast weights"})
    fwp_impl: ChoiceEnum(FW_IMPLS) = field(default="auto", metadata={"help": "fast-weight kernel"})
    attn_impl: ChoiceEnum(ATTN_IMPLS) = field(default="auto", metadata={
        "help": "softmax attention kernel (ops/biased_attention); auto also runs plain ALiBi / Transformer-XL layers "
                "(no span, persistent slots or window) on their family's ops/alibi / ops/xl_relative kernel"})
    adaptive_softmax_cutoff: Optional[str] = field(
        default=None, metadata={"help": "comma-separated adaptive input/softmax cutoffs; default: full softmax"})
    adaptive_softmax_factor: int = field(default=1, metadata={"help": "div_val of the adaptive clusters"})
    init_std: float = field(default=0.02, metadata={"help": "std of weight init (Linear, Embedding)"})
    proj_init_std: float = field(default=0.01, metadata={"help": "std of the adaptive projections' init"})
    tokens_per_sample: int = II("task.tokens_per_sample")


def mixer_sizes(cfg: ComposedLMConfig) -> MixerSizes:
    heads, dim = cfg.decoder_attention_heads, cfg.decoder_embed_dim
    if heads < 1 or dim < 1:
        raise ConfigError("--decoder-embed-dim and --decoder-attention-heads must be >= 1")
    if cfg.decoder_attention_head_dim is None and dim % heads:
        raise ConfigError(f"--decoder-attention-heads {heads} does not divide --decoder-embed-dim {dim}; choose a "
                          f"divisor of {dim} or set --decoder-attention-head-dim")
    return MixerSizes(dim, heads, cfg.decoder_attention_head_dim or dim // heads, cfg.attention_dropout, cfg.mem_len,
                      cfg.pers_mem_size, cfg.attn_span, cfg.adapt_span_ramp, cfg.adapt_span_init, cfg.adapt_span_loss,
                      str(cfg.fw_feature_map), str(cfg.fwp_normalize), cfg.performer_proj_dim, cfg.dpfp_n_roll,
                      cfg.fwp_chunk_size, str(cfg.attn_impl), str(cfg.fwp_impl))


class ComposedDecoder(CoreDecoder):
    """The composable core's decoder (``models/base/core_decoder.py``) over the per-layer patterns of the config."""

    def __init__(self, cfg: ComposedLMConfig, dictionary) -> None:
        specs = parse_layout(cfg.mixer, cfg.position, cfg.source, cfg.decoder_layers)
        if cfg.mem_len < 0:
            raise ConfigError(f"--mem-len must be >= 0, got {cfg.mem_len}")
        for index, spec in enumerate(specs):
            check_layer(index, spec, cfg.mem_len, cfg.attn_span, cfg.pers_mem_size)
        sizes = mixer_sizes(cfg)
        vocab, dim = len(dictionary), cfg.decoder_embed_dim
        cutoffs = check_cutoffs(cfg.adaptive_softmax_cutoff, vocab)
        embed_tokens = XLAdaptiveInput(vocab, dim, dim, cutoffs, cfg.adaptive_softmax_factor)  # x sqrt(C)
        super().__init__(
            dictionary, embed_tokens,
            input_position=build_position(str(cfg.input_position), dim, sizes.num_heads, sizes.head_dim),
            layers=[ComposedBlock(dim, cfg.decoder_ffn_embed_dim, cfg.dropout, not cfg.decoder_post_norm,
                                  build_mixer(spec, sizes)) for spec in specs],
            layer_norm=None if cfg.decoder_post_norm else nn.LayerNorm(dim),
            adaptive_softmax=ProjectedAdaptiveLogSoftmax(
                vocab, dim, dim, cutoffs, cfg.adaptive_softmax_factor, tie_to=embed_tokens,
                tie_projs=[False] + [True] * len(cutoffs), bias_per_cluster=cfg.adaptive_softmax_factor > 1),
            dropout=cfg.dropout, tokens_per_sample=cfg.tokens_per_sample)
        self.specs = specs
        self.mem_len = cfg.mem_len
        xl_weights_init(self, cfg.init_std, cfg.proj_init_std, normal_leaves=("content_bias", "position_bias"))

    @property
    def memory_description(self) -> str:
        kinds = {"memory": f"hidden-state memory {self.mem_len}", "window": f"key/value window {self.mem_len}"}
        carried = dict.fromkeys(
            "fast weights carried" if spec.mixer in ("sum", "delta") else kinds[spec.source]
            for spec in self.specs if spec.source in kinds)
        return ", ".join(carried) or "none"


@register_model("composed_lm", dataclass=ComposedLMConfig)
class ComposedLanguageModel(StatefulLanguageModel):
    """Per-layer compositions of the core; presets ``composed_<mechanisms>_<dataset|tiny>``."""

    decoder_class = ComposedDecoder


WT103 = dict(adaptive_softmax_cutoff="20000,40000,200000", adaptive_softmax_factor=4)
TINY = dict(decoder_layers=2, decoder_embed_dim=32, decoder_attention_heads=4, decoder_ffn_embed_dim=64)


@register_model_architecture("composed_lm", "composed_alibi_memory_wiki103")
def composed_alibi_memory_wiki103(args):
    """ALiBi over Transformer-XL memory: 16 layers, d 512, 8 heads, FFN 2048, M = 256 (train with T = 256),
    adaptive input/softmax 20k/40k/200k, div_val 4: 69,747,858 parameters with WikiText-103's dictionary."""
    set_defaults(args, decoder_layers=16, decoder_embed_dim=512, decoder_attention_heads=8, decoder_ffn_embed_dim=2048,
                 mixer="softmax", position="alibi", source="memory", mem_len=256, **WT103)


@register_model_architecture("composed_lm", "composed_delta_persistent_wiki103")
def composed_delta_persistent_wiki103(args):
    """Delta-rule fast weights with persistent memory (a learned initial fast-weight state per layer), fast weights
    reset at every segment, lmtool's descending positions: fast_weight_wiki103_small_fwm's size and output (16
    layers, d 128, 8 heads, FFN 2048, output-normalised delta rule as lmtool 24 ships, cutoffs 20k/40k/200k with
    div_val 1, post-LN) plus the 16 x 8 x 16 x 16 initial fast weights: 44,067,546 parameters with WikiText-103's
    267,735-entry dictionary (fwm: 44,034,778)."""
    set_defaults(args, decoder_layers=16, decoder_embed_dim=128, decoder_attention_heads=8, decoder_ffn_embed_dim=2048,
                 mixer="delta", position="none", source="segment+persistent", input_position="descending",
                 fwp_normalize="output", decoder_post_norm=True,
                 adaptive_softmax_cutoff=WT103["adaptive_softmax_cutoff"], adaptive_softmax_factor=1)


@register_model_architecture("composed_lm", "composed_span_xl_enwik8")
def composed_span_xl_enwik8(args):
    """Adaptive span over Transformer-XL relative attention and memory: 12 layers, d 512, 8 heads, FFN 2048,
    M = L = 2048, R = 32, span loss 2e-6 (adaptive_span's enwik8 values): 41,068,333 parameters with enwik8's
    205-symbol dictionary."""
    set_defaults(args, decoder_layers=12, decoder_embed_dim=512, decoder_attention_heads=8, decoder_ffn_embed_dim=2048,
                 mixer="span", position="xl", source="memory", mem_len=2048, attn_span=2048, adapt_span_loss=2e-6)


@register_model_architecture("composed_lm", "composed_hybrid_delta_wiki103")
def composed_hybrid_delta_wiki103(args):
    """A hybrid: two ALiBi softmax layers over memory M = 256, then one delta-rule layer carrying its fast weights,
    repeated over 12 layers; d 512, 8 heads, FFN 2048, adaptive input/softmax: 57,162,898 parameters with
    WikiText-103's dictionary."""
    set_defaults(args, decoder_layers=12, decoder_embed_dim=512, decoder_attention_heads=8, decoder_ffn_embed_dim=2048,
                 mixer="softmax,softmax,delta", position="alibi,alibi,none", source="memory", mem_len=256, **WT103)


@register_model_architecture("composed_lm", "composed_alibi_memory_tiny")
def composed_alibi_memory_tiny(args):
    """Tests and the demo: composed_alibi_memory at 2 layers, d 32, M = 16."""
    set_defaults(args, **TINY, mixer="softmax", position="alibi", source="memory", mem_len=16)


@register_model_architecture("composed_lm", "composed_delta_persistent_tiny")
def composed_delta_persistent_tiny(args):
    set_defaults(args, **TINY, mixer="delta", position="none", source="segment+persistent", input_position="descending")


@register_model_architecture("composed_lm", "composed_span_xl_tiny")
def composed_span_xl_tiny(args):
    set_defaults(args, **TINY, mixer="span", position="xl", source="memory", mem_len=16, attn_span=16,
                 adapt_span_ramp=4, adapt_span_init=0.5, adapt_span_loss=1e-3)


@register_model_architecture("composed_lm", "composed_hybrid_delta_tiny")
def composed_hybrid_delta_tiny(args):
    set_defaults(args, decoder_layers=3, decoder_embed_dim=32, decoder_attention_heads=4, decoder_ffn_embed_dim=64,
                 mixer="softmax,softmax,delta", position="alibi,alibi,none", source="memory", mem_len=16)
