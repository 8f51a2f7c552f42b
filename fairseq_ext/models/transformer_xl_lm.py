"""``transformer_xl_lm``: Transformer-XL (Dai et al. 2019, arXiv 1901.02860) as a fairseq language model.

Segment recurrence (Sec. 3.2): layer l of segment tau reads ``[SG(m_l) ; h_l]``, where the memory m_l holds the
last ``mem_len`` inputs of layer l from earlier segments (index 0 = the dropped-out embedding), detached.
Relative positional attention (Sec. 3.3): ``ops/xl_relative`` with the global biases u, v (shared by all layers
as in the original PyTorch code; ``--untie-r`` gives each layer its own, as the TF SOTA weights need),
``clamp_len`` and ``same_length`` (``--same-length-convention original|nvidia``). Adaptive input and projected
adaptive log-softmax with ``div_val`` and tied embeddings/projections (spec §3). Initialisation as the original
``weights_init`` (spec §4). Post-LN by default, ``--decoder-normalize-before`` for the original ``pre_lnorm``.

State (a ``DecoderState``: one ``HiddenCache`` per layer and the offset into the current segment) lives only in
``StatefulDecoder``: streaming (training, validation, ``fairseq-eval-lm --task streaming_lm``) cuts the memory to
``mem_len`` after every call (one call = one segment); incremental decoding (generation) appends token by token and
cuts at the same segment boundaries, every ``tokens_per_sample`` tokens, so its per-token logits equal the streaming
pass over segments of that length. ``mem_len``, ``clamp_len``, ``same_length`` and ``tokens_per_sample`` can all be
changed at evaluation with ``--model-overrides`` (the segment length of streaming evaluation is the task's
``--tokens-per-sample``).

Pieces, in the order the forward pass uses them: ``models/base/core_decoder.py`` (the loop and the state; R, u, v
and the window are the layers' per-call ``XLContext``), ``modules/adaptive/adaptive_input.py`` (XLAdaptiveInput),
``modules/positional/descending_sinusoid.py`` (R: the sinusoid over distances S-1 .. 0),
``modules/blocks/transformer_xl_layer.py`` ->
``modules/attention/xl_relative_self_attention.py`` -> ``ops/xl_relative/`` (mask.py, shift.py, naive.py, fused.py),
``modules/blocks/feed_forward.py``, ``modules/adaptive/projected_adaptive_softmax.py`` (+ ``modules/dead_rows.py``);
initialisation ``modules/init.py``; state ``fairseq_ext/state.py`` (DecoderState, HiddenCache) held by ``models/base``.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model, register_model_architecture
from fairseq.utils import safe_getattr
from omegaconf import II
from torch import Tensor, nn

from fairseq_ext.models.base import StatefulLanguageModel
from fairseq_ext.models.base.compile import CompileOptions
from fairseq_ext.models.base.core_decoder import CoreDecoder
from fairseq_ext.models.base.presets import set_defaults
from fairseq_ext.modules.adaptive import ProjectedAdaptiveLogSoftmax, XLAdaptiveInput
from fairseq_ext.modules.adaptive.cutoffs import check_cutoffs, parse_cutoffs
from fairseq_ext.modules.blocks.transformer_xl_layer import TransformerXLLayer, XLContext
from fairseq_ext.modules.composed.positions import PositionTerm
from fairseq_ext.modules.init import xl_weights_init
from fairseq_ext.modules.positional.descending_sinusoid import DescendingSinusoid, descending_indices
from fairseq_ext.ops.dropout import dropout
from fairseq_ext.ops.xl_relative import IMPLS, SAME_LENGTH_CONVENTIONS, same_length_window
from fairseq_ext.state import SegmentState

BIAS_LAYOUTS = ("original", "nvidia")  # output-bias tensors of the adaptive softmax (adaptive_softmax_bias_layout)

TIE_PROJS = ("none", "tails", "all")


@dataclass
class TransformerXLConfig(CompileOptions):
    """Defaults are the original ``train.py`` argparse defaults; presets set the paper/script values."""

    decoder_layers: int = field(default=12, metadata={"help": "number of layers (original n_layer)"})
    decoder_embed_dim: int = field(default=500, metadata={"help": "model dim C (original d_model)"})
    decoder_input_dim: Optional[int] = field(
        default=None, metadata={"help": "embedding dim of the head cluster (original d_embed); default: C"})
    decoder_ffn_embed_dim: int = field(default=1000, metadata={"help": "feed-forward inner dim (d_inner)"})
    decoder_attention_heads: int = field(default=10, metadata={"help": "attention heads H (n_head)"})
    decoder_attention_head_dim: Optional[int] = field(
        default=None, metadata={"help": "per-head dim D (d_head); default C / H, which must then divide"})
    decoder_normalize_before: bool = field(
        default=False, metadata={"help": "pre-LN (the original --pre_lnorm); default post-LN"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on embeddings, encodings, residuals, FFN"})
    attention_dropout: float = field(default=0.0, metadata={"help": "dropout on attention probs (dropatt)"})
    mem_len: int = field(
        default=0, metadata={"help": "M: hidden states per layer kept as memory across segments (0: none); "
                                     "may differ at evaluation (--model-overrides)"})
    clamp_len: int = field(
        default=-1, metadata={"help": "distances above clamp_len reuse its encoding; <= 0: no clamping"})
    same_length: bool = field(
        default=False, metadata={"help": "every query attends to the same number of keys (evaluation setting)"})
    same_length_convention: ChoiceEnum(SAME_LENGTH_CONVENTIONS) = field(
        default="original", metadata={"help": "same_length window: mem_len keys (original code) or mem_len + 1 "
                                              "(NVIDIA)"})
    untie_r: bool = field(
        default=False, metadata={"help": "per-layer global biases u, v (TF code's untie_r); default shared"})
    adaptive_softmax_cutoff: Optional[str] = field(
        default=None, metadata={"help": "comma-separated cutoffs of the adaptive input and softmax clusters, e.g. "
                                        "20000,40000,200000 (fairseq dictionary ids); default: full softmax"})
    adaptive_softmax_factor: int = field(
        default=1, metadata={"help": "div_val: cluster i embeds in d_embed / factor^i dims (input and softmax)"})
    adaptive_softmax_bias_layout: ChoiceEnum(BIAS_LAYOUTS) = field(
        default="original", metadata={"help": "output-bias tensors: original (one per cluster when "
                                              "--adaptive-softmax-factor > 1, else one) or nvidia (one per cluster); "
                                              "same numbers, but what a per-tensor optimizer such as LAMB sees"})
    untie_adaptive_weights: bool = field(
        default=False, metadata={"help": "separate output word matrices (the original --not_tied); by default they "
                                         "ARE the input embeddings, with or without cutoffs"})
    tie_projs: ChoiceEnum(TIE_PROJS) = field(
        default="tails", metadata={"help": "which softmax projections are the input projections: none (lm1b), "
                                           "tails (wt103: head untied), all"})
    init_std: float = field(default=0.02, metadata={"help": "std of weight init (Linear, Embedding, u, v)"})
    proj_init_std: float = field(default=0.01, metadata={"help": "std of the adaptive projections' init"})
    attn_impl: ChoiceEnum(IMPLS) = field(
        default="auto", metadata={"help": "relative attention kernel: auto (blocked on CPU from 256 queries, else "
                                          "sdpa), blocked, sdpa, shift, naive, flex"})
    tokens_per_sample: int = II("task.tokens_per_sample")


def per_cluster_biases(cfg) -> bool:
    """One output-bias tensor per cluster: the original's layout with div_val > 1, NVIDIA's always (configs written
    before ``adaptive_softmax_bias_layout`` existed mean "original")."""
    return cfg.adaptive_softmax_factor > 1 or str(safe_getattr(cfg, "adaptive_softmax_bias_layout",
                                                               "original")) == "nvidia"


def tie_projection_flags(mode: str, num_clusters: int) -> List[bool]:
    """Per cluster (head first): is the softmax projection the input projection?"""
    if mode not in TIE_PROJS:
        raise ValueError(f"unknown tie_projs {mode!r}; choose one of {TIE_PROJS}")
    return [mode == "all"] + [mode != "none"] * (num_clusters - 1)


def validate_config(cfg: TransformerXLConfig, vocab_size: int) -> None:
    """Clear errors for impossible combinations (before any tensor is allocated)."""
    heads, dim = cfg.decoder_attention_heads, cfg.decoder_embed_dim
    if heads < 1 or dim < 1 or cfg.decoder_layers < 1:
        raise ValueError("decoder_layers, decoder_embed_dim and decoder_attention_heads must be >= 1")
    if cfg.decoder_attention_head_dim is None and dim % heads:
        raise ValueError(f"--decoder-attention-heads {heads} does not divide --decoder-embed-dim {dim}; choose a "
                         f"divisor of {dim} or set --decoder-attention-head-dim explicitly (e.g. 10 x 41 for 410)")
    if cfg.mem_len < 0:
        raise ValueError(f"--mem-len must be >= 0 (0 disables the memory), got {cfg.mem_len}")
    if cfg.same_length:
        same_length_window(cfg.mem_len, cfg.same_length_convention)
    if dim % 2:
        raise ValueError(f"--decoder-embed-dim must be even for the sinusoidal relative encodings, got {dim}")
    check_cutoffs(cfg.adaptive_softmax_cutoff, vocab_size)


class TransformerXLDecoder(CoreDecoder):
    """Embedding -> dropout -> layers over [memory ; segment] -> dropout -> projected adaptive softmax, on the one
    decoder loop (``models/base/core_decoder.py``); R, the shared u, v and the same-length window are the layers'
    per-call context (``layer_context``)."""

    def __init__(self, cfg: TransformerXLConfig, dictionary) -> None:
        validate_config(cfg, len(dictionary))
        vocab = len(dictionary)
        dim = cfg.decoder_embed_dim
        embed_dim = cfg.decoder_input_dim or dim
        heads = cfg.decoder_attention_heads
        head_dim = cfg.decoder_attention_head_dim or dim // heads
        cutoffs = parse_cutoffs(cfg.adaptive_softmax_cutoff)
        embed_tokens = XLAdaptiveInput(vocab, embed_dim, dim, cutoffs, cfg.adaptive_softmax_factor)
        super().__init__(
            dictionary, embed_tokens, PositionTerm(),
            layers=[TransformerXLLayer(dim, heads, head_dim, cfg.decoder_ffn_embed_dim, cfg.dropout,
                                       cfg.attention_dropout, cfg.decoder_normalize_before, cfg.mem_len,
                                       str(cfg.attn_impl), own_biases=cfg.untie_r)
                    for _ in range(cfg.decoder_layers)],
            layer_norm=None,  # post-LN ends in a LayerNorm; the original's pre-LN stack has no final one
            adaptive_softmax=ProjectedAdaptiveLogSoftmax(
                vocab, embed_dim, dim, cutoffs, cfg.adaptive_softmax_factor,
                tie_to=None if cfg.untie_adaptive_weights else embed_tokens,
                tie_projs=tie_projection_flags(str(cfg.tie_projs), len(cutoffs) + 1),
                bias_per_cluster=per_cluster_biases(cfg)),
            dropout=cfg.dropout, tokens_per_sample=cfg.tokens_per_sample)
        if cfg.untie_r:
            self.content_bias = self.position_bias = None  # each layer owns its u, v
        else:  # u, v shared by every layer (original r_w_bias, r_r_bias)
            self.content_bias = nn.Parameter(torch.zeros(heads, head_dim))
            self.position_bias = nn.Parameter(torch.zeros(heads, head_dim))
        self.embed_dim = dim
        self.mem_len = cfg.mem_len
        self.clamp_len = cfg.clamp_len
        self.same_length = cfg.same_length
        self.same_length_convention = str(cfg.same_length_convention)
        self.positions = DescendingSinusoid(dim)  # R's row c encodes distance S - 1 - c (capped at clamp_len)
        self.reset_parameters(cfg.init_std, cfg.proj_init_std)

    @torch.no_grad()
    def reset_parameters(self, init_std: float, proj_init_std: float) -> None:
        """The original ``weights_init`` (spec §4): N(0, init_std) weights, N(1, init_std) LayerNorm gains, zero
        biases, N(0, proj_init_std) adaptive projections; tied tensors are initialised once as embeddings."""
        xl_weights_init(self, init_std, proj_init_std, normal_leaves=("content_bias", "position_bias"))

    @property
    def memory_description(self) -> str:
        extras = [f"clamp_len {self.clamp_len}"] * (self.clamp_len > 0) + ["same_length"] * bool(self.same_length)
        return ", ".join([f"mem_len {self.mem_len}"] + extras) if self.mem_len else "none (mem_len 0)"

    def layer_context(self, tokens: Tensor, x: Tensor, layer_states: Tuple[Optional[SegmentState], ...], offset: int,
                      segment_length: int) -> XLContext:
        """R for the M + T keys of this call (M = the memory length, the same in every layer), with dropout once
        for all layers, the shared u, v, and the same_length window."""
        cached = layer_states[0].length if layer_states[0] is not None else 0
        distances = descending_indices(cached + x.size(1), device=x.device)  # (S,): S-1 .. 0
        positions = self.positions(distances, self.clamp_len, x.dtype)  # (S, C)
        positions = dropout(positions, self.dropout, self.training)
        window = same_length_window(self.mem_len, self.same_length_convention) if self.same_length else None
        return XLContext(positions, self.content_bias, self.position_bias, window)


@register_model("transformer_xl_lm", dataclass=TransformerXLConfig)
class TransformerXLLanguageModel(StatefulLanguageModel):
    """Transformer-XL LM; see the module docstring. Presets: ``transformer_xl_<dataset>_<size>``."""

    decoder_class = TransformerXLDecoder


@register_model_architecture("transformer_xl_lm", "transformer_xl_wiki103_base")
def transformer_xl_wiki103_base(args):
    """Paper's "Standard" WikiText-103 model, 151M (original pytorch/run_wt103_base.sh): 16 layers, d 410,
    10 x 41 heads, FFN 2100, dropout 0.1, dropatt 0, adaptive softmax 20000/40000/200000 with div_val 1 (no
    projections), tgt/mem 150."""
    set_defaults(args, decoder_layers=16, decoder_embed_dim=410, decoder_attention_heads=10,
                 decoder_attention_head_dim=41, decoder_ffn_embed_dim=2100, dropout=0.1, attention_dropout=0.0,
                 mem_len=150, adaptive_softmax_cutoff="20000,40000,200000", adaptive_softmax_factor=1,
                 tie_projs="tails")


@register_model_architecture("transformer_xl_lm", "transformer_xl_wiki103_large")
def transformer_xl_wiki103_large(args):
    """Paper's "Large" WikiText-103 model (original run_wt103_large.sh): 18 layers, d 1024, 16 x 64 heads,
    FFN 4096, dropout 0.2, dropatt 0.2, div_val 4, tgt/mem 384."""
    set_defaults(args, decoder_layers=18, decoder_embed_dim=1024, decoder_attention_heads=16,
                 decoder_attention_head_dim=64, decoder_ffn_embed_dim=4096, dropout=0.2, attention_dropout=0.2,
                 mem_len=384, adaptive_softmax_cutoff="20000,40000,200000", adaptive_softmax_factor=4,
                 tie_projs="tails")


@register_model_architecture("transformer_xl_lm", "transformer_xl_enwik8_base")
def transformer_xl_enwik8_base(args):
    """Paper's 12-layer enwik8 model, 41M (run_enwik8_base.sh): d 512, 8 x 64 heads, FFN 2048, dropout 0.1,
    dropatt 0, full softmax, tgt/mem 512."""
    set_defaults(args, decoder_layers=12, decoder_embed_dim=512, decoder_attention_heads=8,
                 decoder_attention_head_dim=64, decoder_ffn_embed_dim=2048, dropout=0.1, attention_dropout=0.0,
                 mem_len=512)


@register_model_architecture("transformer_xl_lm", "transformer_xl_enwik8_large")
def transformer_xl_enwik8_large(args):
    """Paper's 24-layer enwik8 model, 277M (run_enwik8_large.sh): d 1024, 8 x 128 heads, FFN 3072, dropout and
    dropatt 0.15, tgt/mem 768."""
    set_defaults(args, decoder_layers=24, decoder_embed_dim=1024, decoder_attention_heads=8,
                 decoder_attention_head_dim=128, decoder_ffn_embed_dim=3072, dropout=0.15, attention_dropout=0.15,
                 mem_len=768)


@register_model_architecture("transformer_xl_lm", "transformer_xl_text8_base")
def transformer_xl_text8_base(args):
    """text8 base (run_text8_base.sh): the enwik8 base model."""
    transformer_xl_enwik8_base(args)


@register_model_architecture("transformer_xl_lm", "transformer_xl_text8_large")
def transformer_xl_text8_large(args):
    """Paper's text8 model, 277M (run_text8_large.sh): the enwik8 large model."""
    transformer_xl_enwik8_large(args)


@register_model_architecture("transformer_xl_lm", "transformer_xl_wiki103_nvidia_base")
def transformer_xl_wiki103_nvidia_base(args):
    """NVIDIA DeepLearningExamples wt103_base.yaml: 16 layers, d 512, 8 x 64 heads, FFN 2048, dropout 0.1,
    dropatt 0, div_val 1, tgt/mem 192, cutoffs 19997/39997/199997 (a 20000-row head), NVIDIA same_length and
    per-cluster output biases."""
    set_defaults(args, decoder_layers=16, decoder_embed_dim=512, decoder_attention_heads=8,
                 decoder_attention_head_dim=64, decoder_ffn_embed_dim=2048, dropout=0.1, attention_dropout=0.0,
                 mem_len=192, adaptive_softmax_cutoff="19997,39997,199997", adaptive_softmax_factor=1,
                 tie_projs="tails", same_length_convention="nvidia", adaptive_softmax_bias_layout="nvidia",
                 init_std=0.02)


@register_model_architecture("transformer_xl_lm", "transformer_xl_wiki103_nvidia_large")
def transformer_xl_wiki103_nvidia_large(args):
    """NVIDIA wt103_large.yaml: 18 layers, d 1024, 16 x 64 heads, FFN 4096, dropout and dropatt 0.2, div_val 4,
    tgt/mem 384, init_std 0.005, cutoffs 19997/39997/199997, NVIDIA same_length and per-cluster output biases."""
    set_defaults(args, decoder_layers=18, decoder_embed_dim=1024, decoder_attention_heads=16,
                 decoder_attention_head_dim=64, decoder_ffn_embed_dim=4096, dropout=0.2, attention_dropout=0.2,
                 mem_len=384, adaptive_softmax_cutoff="19997,39997,199997", adaptive_softmax_factor=4,
                 tie_projs="tails", same_length_convention="nvidia", adaptive_softmax_bias_layout="nvidia",
                 init_std=0.005)


@register_model_architecture("transformer_xl_lm", "transformer_xl_tiny")
def transformer_xl_tiny(args):
    """Tests and the demo: 2 layers, d 64, 4 x 16 heads, FFN 256, memory 32, full softmax."""
    set_defaults(args, decoder_layers=2, decoder_embed_dim=64, decoder_attention_heads=4, decoder_ffn_embed_dim=256,
                 mem_len=32)
