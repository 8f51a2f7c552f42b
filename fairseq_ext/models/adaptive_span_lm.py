"""``adaptive_span_lm``: Adaptive Attention Span (Sukhbaatar et al. 2019, arXiv 1905.07799) and the All-attention
network with persistent memory (Sukhbaatar et al. 2019, arXiv 1907.01470) as a fairseq language model, following
the original ``facebookresearch/adaptive-span`` code (spec adaptive_span.md §1).

Stack (§1.1): plain embedding (not scaled; N(0, 1) init) -> emb_dropout -> post-LN layers over [cache ; segment]
-> emb_dropout -> untied ``Linear(H, V)`` with bias. PyTorch default initialisation everywhere; one relative
position table ``key_pe`` (d, L), N(0, 1), shared by all layers and heads (its last column is distance 1). WT103
uses tied adaptive input/softmax (``--adaptive-softmax-cutoff``, div_val ``--adaptive-softmax-factor``, embeddings
scaled by sqrt(H)), with the original's PyTorch-default init.

Layers: ``modules/blocks/adaptive_span_layer.py``; attention and its window: ``modules/attention``; the op with
the skew trick and its naive reference: ``ops/adaptive_span``. Per-head spans z in [0, 1] (``--adapt-span-layer``:
one per layer), soft mask with ramp R, renormalisation after masking (``--no-span-renorm`` only to reproduce
checkpoints of fairseq's examples/adaptive_span), L1 span loss coeff·L·mean(z) per layer (``aux_loss``), z
clamped after every optimizer step (``parameter_bounds``), trimming of keys/values and of the cache to the current
spans (+ ramp, rounded to 64; cache + 64 slack, ``--no-adapt-span-cache`` keeps L), ``--fixed-span`` for the
fixed-span baseline. ``--pers-mem-size N``: N persistent key/value vectors per head; the FF sublayers and their
LayerNorms are removed.

State: a ``DecoderState`` with one ``HiddenCache`` (B, C_l, H) of layer inputs per layer (§1.2). A cold start
(None, or a cache shorter than the window) reads as zeros, exactly the original's zero-initialised cache (zero inputs
give zero keys and values: the projections have no bias). Outputs depend only on the L previous positions of each
layer, not on where segments start, so streaming with any segment length and incremental decoding (generation)
agree.

Pieces, in the order the forward pass uses them (the loop: ``models/base/core_decoder.py``, no position term; the
layer context is ``key_pe``): embedding or ``modules/adaptive/adaptive_input.py``,
``modules/blocks/adaptive_span_layer.py`` -> ``modules/attention/adaptive_span_self_attention.py`` (with
``modules/attention/adaptive_span_mask.py``) -> ``ops/adaptive_span/`` (mask.py, skew.py, blocked.py, naive.py), the
output Linear or ``modules/adaptive/projected_adaptive_softmax.py`` (+ ``modules/dead_rows.py``); state DecoderState
held by ``models/base``.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model, register_model_architecture
from torch import Tensor, nn

from fairseq_ext.models.base import StatefulLanguageModel
from fairseq_ext.models.base.compile import CompileOptions
from fairseq_ext.models.base.core_decoder import CoreDecoder
from fairseq_ext.models.base.presets import set_defaults
from fairseq_ext.modules.adaptive import ProjectedAdaptiveLogSoftmax, XLAdaptiveInput
from fairseq_ext.modules.adaptive.cutoffs import check_cutoffs, parse_cutoffs
from fairseq_ext.modules.attention.adaptive_span_mask import AdaptiveSpanMask
from fairseq_ext.modules.attention.adaptive_span_self_attention import AdaptiveSpanSelfAttention
from fairseq_ext.modules.blocks.adaptive_span_layer import AdaptiveSpanLayer
from fairseq_ext.modules.composed import PositionTerm
from fairseq_ext.modules.dead_rows import DeadRows
from fairseq_ext.ops.adaptive_span import IMPLS, block_rows, select_impl


@dataclass
class AdaptiveSpanConfig(CompileOptions):
    """Defaults are the original ``enwik8_small.sh`` (= fairseq's AdaptiveSpanSmallConfig); presets set the rest."""

    decoder_layers: int = field(default=8, metadata={"help": "number of layers (original --nlayers)"})
    decoder_embed_dim: int = field(default=256, metadata={"help": "model dim H (original --hid-sz)"})
    decoder_ffn_embed_dim: int = field(
        default=1024, metadata={"help": "feed-forward inner dim (--inner-hid-sz); unused with --pers-mem-size"})
    decoder_attention_heads: int = field(default=4, metadata={"help": "attention heads K (--nheads)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on attention weights and inside the FF"})
    emb_dropout: float = field(default=0.0, metadata={"help": "dropout on the embeddings and the final hidden states"})
    attn_span: int = field(default=1024, metadata={"help": "maximum attention span L (distances 1..L)"})
    fixed_span: bool = field(
        default=False, metadata={"help": "no adaptive span: every head attends to all L previous positions, "
                                         "unmasked (the original without --adapt-span)"})
    adapt_span_ramp: int = field(default=32, metadata={"help": "ramp length R of the soft span mask"})
    adapt_span_init: float = field(default=0.0, metadata={"help": "initial span z as a fraction of L"})
    adapt_span_loss: float = field(
        default=0.0, metadata={"help": "span-loss coefficient: coeff * L * mean(z) per layer is added to the loss"})
    adapt_span_layer: bool = field(
        default=False, metadata={"help": "one span per layer instead of one per head (fairseq's example extra)"})
    no_adapt_span_cache: bool = field(
        default=False, metadata={"help": "keep L cached positions per layer instead of the trimmed span + 64 "
                                         "(the original without --adapt-span-cache)"})
    no_span_renorm: bool = field(
        default=False, metadata={"help": "do not renormalise attention after the span mask: only to reproduce "
                                         "checkpoints trained with fairseq's examples/adaptive_span"})
    pers_mem_size: int = field(
        default=0, metadata={"help": "N persistent key/value vectors per head (All-attention); 0: off. Removes the "
                                     "feed-forward sublayers"})
    adaptive_softmax_cutoff: Optional[str] = field(
        default=None, metadata={"help": "comma-separated cutoffs of tied adaptive input/softmax (WT103: "
                                        "20000,40000,200000); default: full softmax, untied"})
    adaptive_softmax_factor: int = field(default=4, metadata={"help": "div_val of the adaptive input/softmax"})
    attn_impl: ChoiceEnum(IMPLS) = field(
        default="auto", metadata={"help": "attention kernel: auto (fused on CPU in fp32/fp64 once the scores "
                                          "reach 8 MiB; else blocked when the window is shorter than the "
                                          "segment, else skew), skew, blocked, fused, naive (reference), flex"})


@torch.no_grad()
def init_adaptive_io(inp: XLAdaptiveInput, out: ProjectedAdaptiveLogSoftmax, dim: int) -> None:
    """The original's PyTorch defaults: embeddings N(0, 1); projections, output biases and the cluster layer as
    ``nn.Linear(d_i, .)``: U(-1/sqrt(d_i), 1/sqrt(d_i))."""
    for i, (lo, hi) in enumerate(out.bounds):
        bound = 1.0 / math.sqrt(inp.emb_projs[str(i)].size(1))
        nn.init.uniform_(inp.emb_projs[str(i)], -bound, bound)
        nn.init.uniform_(out.bias[lo:hi], -bound, bound)
    bound = 1.0 / math.sqrt(dim)
    nn.init.uniform_(out.cluster_weight, -bound, bound)
    nn.init.uniform_(out.cluster_bias, -bound, bound)


def validate_config(cfg: AdaptiveSpanConfig, vocab_size: int) -> None:
    """Clear errors for impossible combinations, before any tensor is allocated."""
    heads, dim = cfg.decoder_attention_heads, cfg.decoder_embed_dim
    if heads < 1 or dim < 1 or cfg.decoder_layers < 1:
        raise ValueError("decoder_layers, decoder_embed_dim and decoder_attention_heads must be >= 1")
    if dim % heads:
        raise ValueError(f"--decoder-attention-heads {heads} does not divide --decoder-embed-dim {dim}; choose a "
                         f"divisor of {dim}")
    if cfg.attn_span < 1:
        raise ValueError(f"--attn-span must be >= 1, got {cfg.attn_span}")
    if cfg.pers_mem_size == 0 and cfg.decoder_ffn_embed_dim < 1:
        raise ValueError("--decoder-ffn-embed-dim must be >= 1 without persistent memory (--pers-mem-size)")
    cutoffs = check_cutoffs(cfg.adaptive_softmax_cutoff, vocab_size)
    if cutoffs and cfg.adaptive_softmax_factor < 2:
        raise ValueError("the original adaptive input/softmax needs --adaptive-softmax-factor (div_val) >= 2")


class AdaptiveSpanDecoder(CoreDecoder):
    """Embedding -> emb_dropout -> layers over [cache ; segment] -> emb_dropout -> output layer, on the core loop
    with no position term (the layers share ``key_pe``: the layer context) and caches that do not depend on where
    segments start (``cuts_at_segments`` False)."""

    cuts_at_segments = False

    def __init__(self, cfg: AdaptiveSpanConfig, dictionary) -> None:
        validate_config(cfg, len(dictionary))
        vocab, dim, heads = len(dictionary), cfg.decoder_embed_dim, cfg.decoder_attention_heads
        cutoffs = parse_cutoffs(cfg.adaptive_softmax_cutoff)
        # built in the original's order (the same initial weights for a seed): input, output, key_pe, layers
        if cutoffs:
            embed_tokens = XLAdaptiveInput(vocab, dim, dim, cutoffs, cfg.adaptive_softmax_factor)
            adaptive_softmax = ProjectedAdaptiveLogSoftmax(
                vocab, dim, dim, cutoffs, cfg.adaptive_softmax_factor, tie_to=embed_tokens,
                tie_projs=[True] * (len(cutoffs) + 1), bias_per_cluster=False)
            output_projection = None
            init_adaptive_io(embed_tokens, adaptive_softmax, dim)
        else:
            embed_tokens = nn.Embedding(vocab, dim)  # N(0, 1), not scaled
            adaptive_softmax = None
            output_projection = nn.Linear(dim, vocab)
        key_pe = nn.Parameter(torch.randn(dim // heads, cfg.attn_span))  # (d, L), column j = distance L - j
        ffn_dim = 0 if cfg.pers_mem_size > 0 else cfg.decoder_ffn_embed_dim
        layers = []
        for _ in range(cfg.decoder_layers):
            span = None if cfg.fixed_span else AdaptiveSpanMask(
                1 if cfg.adapt_span_layer else heads, cfg.attn_span, cfg.adapt_span_ramp, cfg.adapt_span_init,
                cfg.adapt_span_loss, adapt_cache=not cfg.no_adapt_span_cache)
            attn = AdaptiveSpanSelfAttention(dim, heads, cfg.attn_span, cfg.dropout, span, cfg.pers_mem_size,
                                             renorm=not cfg.no_span_renorm, impl=str(cfg.attn_impl))
            layers.append(AdaptiveSpanLayer(attn, dim, ffn_dim, cfg.dropout))
        super().__init__(dictionary, embed_tokens, PositionTerm(), layers, layer_norm=None,
                         adaptive_softmax=adaptive_softmax, dropout=cfg.emb_dropout, tokens_per_sample=None)
        self.key_pe = key_pe
        self.output_projection = output_projection
        if output_projection is not None:
            self.dead_rows = DeadRows(vocab, bias="output_projection.bias", weight="output_projection.weight")
        self.keep_module_order(["embed_tokens", "adaptive_softmax", "output_projection"])  # saved optimizer states
        self.embed_dim = dim
        self.max_span = cfg.attn_span
        self._last_length = 0  # M of the last forward, for the FLOP telemetry

    def output_layer(self, features: Tensor) -> Tensor:
        """Logits (B, T, V) of the untied output layer; with adaptive softmax the features unchanged (read by
        ``get_normalized_probs`` and ``lm_loss``)."""
        if self.output_projection is None:
            return features
        return self.dead_rows(self.output_projection(features))

    def layer_context(self, tokens: Tensor, x: Tensor, layer_states, offset: int, segment_length: int) -> Tensor:
        """Every layer reads the one relative position table ``key_pe`` (d, L), in the input's dtype."""
        self._last_length = x.size(1)
        return self.key_pe.to(x.dtype)

    @property
    def memory_description(self) -> str:
        return f"each layer's cache of its inputs, up to attn_span {self.max_span} (+ ramp)"

    # -- span telemetry (logged by lm_loss) ----------------------------------------------------------------
    def span_masks(self) -> List[AdaptiveSpanMask]:
        return [layer.self_attn.span for layer in self.layers if layer.self_attn.span is not None]

    def attention_gflop(self, batch: int, length: int) -> float:
        """Attention GFLOP of a forward over a (batch, length) segment at the current windows: content, position and
        value products over the materialised skew layout, 2·B·K·M·d·(2 (L_pos + R) + L_pos) per layer, R = M rows
        per query block (``skew``) or ``block_rows(M)`` where the layer runs ``blocked`` or ``fused`` (projections,
        FF and softmax excluded)."""
        d, heads = self.key_pe.size(0), self.layers[0].self_attn.num_heads
        total = 0
        for layer in self.layers:
            span = layer.self_attn.window().span
            attn = layer.self_attn
            impl = select_impl(attn.impl, span, length, device_type=self.key_pe.device.type, dtype=self.key_pe.dtype,
                               batch_heads=batch * heads)
            rows = block_rows(length) if impl in ("blocked", "fused") else length
            total += 2 * batch * heads * length * d * (2 * (span + rows) + span)
        return total / 1e9

    def log_stats(self) -> Dict[str, float]:
        """span_avg: mean over layers of each layer's mean span; span_max: the largest span of any head;
        attn_len: mean computed window L_pos; attn_mflop_tok: attention MFLOP per token of the last forward's
        segment length (``attention_gflop``; independent of the batch size and of --batch-split)."""
        spans = [mask.spans() for mask in self.span_masks()]
        windows = [layer.self_attn.window() for layer in self.layers]
        length = max(self._last_length, 1)
        stats = {"attn_len": sum(w.span for w in windows) / len(windows),
                 "attn_mflop_tok": self.attention_gflop(1, length) * 1e3 / length}
        if spans:
            stats["span_avg"] = float(torch.stack([s.mean() for s in spans]).mean())
            stats["span_max"] = float(torch.stack([s.max() for s in spans]).max())
        return stats

    def layer_spans(self) -> List[List[float]]:
        """Per layer, per head (or per layer) span in tokens (plots, checkpoints inspection)."""
        return [mask.spans().tolist() for mask in self.span_masks()]


@register_model("adaptive_span_lm", dataclass=AdaptiveSpanConfig)
class AdaptiveSpanLanguageModel(StatefulLanguageModel):
    """Adaptive-span / All-attention LM; see the module docstring. Presets: ``adaptive_span_<dataset>[_size]``,
    ``all_attention_<dataset>[_small]``."""

    decoder_class = AdaptiveSpanDecoder


@register_model_architecture("adaptive_span_lm", "adaptive_span_enwik8_small")
def adaptive_span_enwik8_small(args):
    """experiments/enwik8_small.sh: 8 layers, H 256, FF 1024, 4 heads, L 1024, span loss 2e-6, no dropout
    (6.48M parameters with the 205-symbol enwik8 vocabulary)."""
    set_defaults(args, decoder_layers=8, decoder_embed_dim=256, decoder_ffn_embed_dim=1024, decoder_attention_heads=4,
                 attn_span=1024, adapt_span_loss=2e-6, dropout=0.0, emb_dropout=0.0)


@register_model_architecture("adaptive_span_lm", "adaptive_span_enwik8")
def adaptive_span_enwik8(args):
    """experiments/enwik8.sh (the paper's 12-layer "small" model, 38.54M): H 512, FF 2048, 8 heads, L 8192,
    span loss 5e-7, dropout 0.3."""
    set_defaults(args, decoder_layers=12, decoder_embed_dim=512, decoder_ffn_embed_dim=2048, decoder_attention_heads=8,
                 attn_span=8192, adapt_span_loss=5e-7, dropout=0.3, emb_dropout=0.0)


@register_model_architecture("adaptive_span_lm", "adaptive_span_enwik8_large")
def adaptive_span_enwik8_large(args):
    """experiments/enwik8_large.sh (208.91M): 24 layers, H 768, FF 4096, 8 heads, L 8192, span loss 5e-7,
    dropout 0.4."""
    set_defaults(args, decoder_layers=24, decoder_embed_dim=768, decoder_ffn_embed_dim=4096, decoder_attention_heads=8,
                 attn_span=8192, adapt_span_loss=5e-7, dropout=0.4, emb_dropout=0.0)


@register_model_architecture("adaptive_span_lm", "adaptive_span_text8")
def adaptive_span_text8(args):
    """experiments/text8.sh: the enwik8 12-layer model (38.36M with the 28-symbol text8 vocabulary)."""
    adaptive_span_enwik8(args)


@register_model_architecture("adaptive_span_lm", "adaptive_span_text8_large")
def adaptive_span_text8_large(args):
    """experiments/text8_large.sh: the enwik8 24-layer model (208.64M)."""
    adaptive_span_enwik8_large(args)


@register_model_architecture("adaptive_span_lm", "all_attention_enwik8_small")
def all_attention_enwik8_small(args):
    """experiments/enwik8_pers_small.sh (38.50M): 18 All-attention layers, H 512, 8 heads, N 1024 persistent
    vectors per head, L 8192, span loss 1e-7, dropout 0.3."""
    set_defaults(args, decoder_layers=18, decoder_embed_dim=512, decoder_attention_heads=8, pers_mem_size=1024,
                 attn_span=8192, adapt_span_loss=1e-7, dropout=0.3, emb_dropout=0.0)


@register_model_architecture("adaptive_span_lm", "all_attention_enwik8")
def all_attention_enwik8(args):
    """experiments/enwik8_pers.sh (114.02M): 36 layers, H 512, 8 heads, N 2048, L 8192, span loss 1e-7,
    dropout 0.4."""
    set_defaults(args, decoder_layers=36, decoder_embed_dim=512, decoder_attention_heads=8, pers_mem_size=2048,
                 attn_span=8192, adapt_span_loss=1e-7, dropout=0.4, emb_dropout=0.0)


@register_model_architecture("adaptive_span_lm", "all_attention_wiki103")
def all_attention_wiki103(args):
    """experiments/wiki103_pers.sh (132.49M with 267,736 types): 36 layers, H 512, 8 heads, N 2048, L 2048,
    span loss 5e-7, dropout 0.3, emb_dropout 0.1, tied adaptive input/softmax 20000/40000/200000, div_val 4."""
    set_defaults(args, decoder_layers=36, decoder_embed_dim=512, decoder_attention_heads=8, pers_mem_size=2048,
                 attn_span=2048, adapt_span_loss=5e-7, dropout=0.3, emb_dropout=0.1,
                 adaptive_softmax_cutoff="20000,40000,200000", adaptive_softmax_factor=4)


@register_model_architecture("adaptive_span_lm", "adaptive_span_tiny")
def adaptive_span_tiny(args):
    """Tests and the demo: 2 layers, H 32, 4 heads, FF 64, L 48, ramp 8."""
    set_defaults(args, decoder_layers=2, decoder_embed_dim=32, decoder_ffn_embed_dim=64, decoder_attention_heads=4,
                 attn_span=48, adapt_span_ramp=8, adapt_span_loss=2e-6)
