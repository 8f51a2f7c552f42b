"""``fast_weight_lm``: linear Transformers as fast weight programmers (Schlag, Irie, Schmidhuber 2021, arXiv 2102.11174;
the LM toolkit IDSIA/lmtool-fwms; spec fast_weights.md) as a fairseq language model.

Architecture (lmtool, Transformer-XL's code base, spec §1.2, §1.6, §2), on the composable core's decoder
(``CoreDecoder``): adaptive input ×sqrt(d_model) (+ absolute sinusoid over DESCENDING indices unless ``no_pos``)
-> dropout -> post-LN blocks (attention + ReLU FFN) -> dropout -> Transformer-XL projected adaptive log-softmax
(one cluster = full softmax), tied to the input embedding. Attention: ``attn_type`` softmax | linear (ELU+1) |
performer (FAVOR+) | dpfp (DPFP-nu) x ``update_rule`` sum (Eq. 6-7) | delta (Eq. 15-17, phi sum-normalised, beta =
sigmoid per head) x ``fwp_normalize`` none | output | full (§1.5; ``auto`` = output for sum, none for delta).
lmtool's integer ``--attn_type`` codes are accepted as ``lmtool_attn_type`` aliases with lmtool's CLI semantics
(``skip_attn_normalization``), see ``resolve_attention``. Initialisation is Transformer-XL's ``weights_init``.

State (docs/design.md, "Fast weights"): one ``DecoderState``.

* streaming (``forward_segment``: training, validation, ``fairseq-eval-lm``): without ``carry_over_fast_weight``
  every call starts from zero fast weights and returns None (the model is stateless and runs under fairseq's
  ``language_modeling`` task, ``--context-window`` included: the paper's sliding window); with it, the call returns
  the per-layer ``FastWeightState``s and ``streaming_lm`` carries them (truncated BPTT, §1.7). Positions of a call
  run n_b - 1 .. 0 over each row's n_b real tokens.
* incremental decoding (``forward_incremental``) reproduces the streaming pass over segments of
  ``tokens_per_sample`` T with O(1) work and state per token for fast weights (softmax layers cache the segment's
  inputs); the token at offset j of a segment gets position T - 1 - j; at every T boundary carry-over models keep
  their fast weights and the others reset, as the streaming pass does. A prompt runs through the chunked form.

Pieces, in the order the forward pass uses them: ``models/base/core_decoder.py`` (the loop and the state),
``modules/adaptive/adaptive_input.py``, ``modules/composed/positions.py`` (``DescendingPosition`` over
``modules/positional/descending_sinusoid.py``), ``modules/composed/block.py`` (post-LN) ->
``modules/composed/recurrent_mixers.py`` (``FastWeightMixer``: carry-over) ->
``modules/attention/fast_weight_self_attention.py`` (``modules/feature_maps/``: elu, favor, dpfp) ->
``ops/fast_weights/`` (recurrent.py, chunked.py), or for the softmax baseline ``modules/composed/softmax_mixer.py``
(no position term, source ``segment``) -> ``ops/biased_attention/``; ``modules/blocks/feed_forward.py``,
``modules/adaptive/projected_adaptive_softmax.py``; initialisation ``modules/init.py``; state
``fairseq_ext/state.py`` (FastWeightState, HiddenCache, DecoderState).
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model, register_model_architecture
from omegaconf import II
from torch import nn

from fairseq_ext.models.base import StatefulLanguageModel
from fairseq_ext.models.base.compile import CompileOptions
from fairseq_ext.models.base.core_decoder import CoreDecoder
from fairseq_ext.models.base.presets import set_defaults
from fairseq_ext.modules.adaptive import ProjectedAdaptiveLogSoftmax, XLAdaptiveInput
from fairseq_ext.modules.adaptive.cutoffs import check_cutoffs, parse_cutoffs
from fairseq_ext.modules.composed.block import ComposedBlock
from fairseq_ext.modules.composed.positions import DescendingPosition, PositionTerm
from fairseq_ext.modules.composed.recurrent_mixers import FastWeightMixer
from fairseq_ext.modules.composed.softmax_mixer import SoftmaxMixer
from fairseq_ext.modules.composed.sources import SegmentSource
from fairseq_ext.modules.init import xl_weights_init

ATTN_TYPES = ("softmax", "linear", "performer", "dpfp")
UPDATE_RULES = ("sum", "delta")
FWP_NORMALIZE = ("auto", "none", "output", "full")
ATTN_IMPLS = ("auto", "recurrent", "chunked", "fla")

# lmtool --attn_type code -> (attn_type, update_rule, normalisation without / with --skip_attn_normalization)
LMTOOL_ATTN_TYPES = {
    2: ("softmax", None, None, None),
    4: ("linear", "sum", "output", "output"),  # lmtool's quadratic classes take no skip flag: always normalised
    5: ("performer", "sum", "output", None),  # lmtool asserts skip_attn_normalization is off
    6: ("dpfp", "sum", "output", "output"),
    34: ("linear", "sum", "output", "none"),
    35: ("performer", "sum", "output", "none"),
    24: ("linear", "delta", "output", "none"),
    25: ("performer", "delta", "output", "none"),
    26: ("dpfp", "delta", "output", "none"),
    44: ("linear", "delta", "full", "none"),
    45: ("performer", "delta", "full", "none"),
    46: ("dpfp", "delta", "full", "none"),
}
LMTOOL_QUADRATIC = (4, 5, 6)  # output scale 1, epsilon 1e-5 sqrt(d): see FastWeightSelfAttention
LMTOOL_UNSUPPORTED = {
    0: "Transformer-XL relative-position softmax attention with memory (use --arch transformer_xl_lm, e.g. "
       "mem_len 384 for medium_transformer-xl_baseline.sh)",
    1: "softmax with learnable relative positions (not used in the paper)",
    3: "softmax with learned absolute positions per layer (not used in the paper)",
    10: "the Python time-loop debug version of the sum rule (same maths as 34: use 34)",
    14: "the Python time-loop delta rule, broken at lmtool HEAD (NameError; use 24 for the delta rule)",
    16: "the Python time-loop DPFP delta rule, broken at lmtool HEAD (NameError; use 26)",
    36: "DPFP with the sum rule on the CUDA kernel, listed in the scripts' comments but not wired in lmtool's "
        "model_main.py (it crashes there); DPFP + sum exists only as the quadratic code 6 (same maths as 6)",
    80: "a plain RNN layer (not a fast weight layer)",
    90: "an LSTM layer (not a fast weight layer)",
}


@dataclass
class FastWeightLMConfig(CompileOptions):
    """Defaults: the small WikiText-103 fast weight memory (lmtool's ``train.py`` defaults where the scripts pass
    nothing); presets set the paper's scripts."""

    decoder_layers: int = field(default=16, metadata={"help": "number of layers (lmtool n_layer)"})
    decoder_embed_dim: int = field(default=128, metadata={"help": "model dim C (d_model)"})
    decoder_attention_heads: int = field(default=8, metadata={"help": "attention heads H (n_head)"})
    decoder_attention_head_dim: Optional[int] = field(
        default=None, metadata={"help": "per-head dim d (d_head); default C / H, which must then divide"})
    decoder_ffn_embed_dim: int = field(default=2048, metadata={"help": "feed-forward inner dim (d_inner)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on embeddings, residuals, FFN and the output"})
    attention_dropout: float = field(
        default=0.0, metadata={"help": "dropout on softmax attention probabilities (dropatt; softmax only)"})
    attn_type: ChoiceEnum(ATTN_TYPES) = field(
        default="linear", metadata={"help": "attention: softmax, linear (ELU+1), performer (FAVOR+), dpfp"})
    update_rule: ChoiceEnum(UPDATE_RULES) = field(
        default="delta", metadata={"help": "fast-weight update: sum (linear attention) or delta (the paper's rule)"})
    fwp_normalize: ChoiceEnum(FWP_NORMALIZE) = field(
        default="auto", metadata={"help": "output normalisation: none, output (divide by z.phi(q)), full (also the "
                                          "delta rule's retrieval key); auto = output for sum, none for delta"})
    lmtool_attn_type: Optional[int] = field(
        default=None, metadata={"help": "lmtool --attn_type alias: 2 softmax; 4/5/6, 34/35 linear/performer/dpfp "
                                        "sum; 24/25/26 delta (output-normalised unless --skip-attn-normalization); "
                                        "44/45/46 delta full; sets attn_type, update_rule, fwp_normalize"})
    skip_attn_normalization: bool = field(
        default=False, metadata={"help": "lmtool's --skip_attn_normalization (only with --lmtool-attn-type)"})
    performer_proj_dim: int = field(default=16, metadata={"help": "FAVOR+ random features m (D_phi = 2m)"})
    performer_orthogonal_compat: bool = field(
        default=False, metadata={"help": "lmtool's transposed orthogonal blocks / per-input chi scaling (spec §1.3)"})
    dpfp_n_roll: int = field(default=2, metadata={"help": "DPFP nu (D_phi = 2 d nu)"})
    no_pos: bool = field(default=False, metadata={"help": "no positional encoding (the recurrence is order-aware)"})
    clamp_len: int = field(default=-1, metadata={"help": "cap the descending position indices; <= 0: none"})
    carry_over_fast_weight: bool = field(
        default=False, metadata={"help": "carry fast weights (and key sums) across segments: train and evaluate "
                                         "with --task streaming_lm (lmtool --carry_over_fast_weight)"})
    fwp_chunk_size: int = field(default=64, metadata={"help": "chunk size C of the chunkwise-parallel form"})
    attn_impl: ChoiceEnum(ATTN_IMPLS) = field(
        default="auto", metadata={"help": "fast-weight kernel: auto (chunked; one token: recurrent), recurrent, "
                                          "chunked, fla (delta rule on CUDA: flash-linear-attention's Triton "
                                          "kernel, needs fla-core)"})
    adaptive_softmax_cutoff: Optional[str] = field(
        default=None, metadata={"help": "comma-separated adaptive input/softmax cutoffs, e.g. 20000,40000,200000; "
                                        "default: full softmax"})
    adaptive_softmax_factor: int = field(default=1, metadata={"help": "div_val of the adaptive clusters"})
    untie_adaptive_weights: bool = field(
        default=False, metadata={"help": "separate output word matrices (by default they ARE the input embeddings)"})
    init_std: float = field(default=0.02, metadata={"help": "std of weight init (Linear, Embedding)"})
    proj_init_std: float = field(default=0.01, metadata={"help": "std of the adaptive projections' init"})
    tokens_per_sample: int = II("task.tokens_per_sample")


_DEFAULTS = FastWeightLMConfig()


def resolve_attention(cfg: FastWeightLMConfig) -> Tuple[str, str, str]:
    """(attn_type, update_rule, normalisation) of a config: the lmtool alias if given (explicit conflicting values
    are an error; a value equal to the dataclass default counts as not given), then ``auto`` normalisation."""
    attn_type, rule, normalize = str(cfg.attn_type), str(cfg.update_rule), str(cfg.fwp_normalize)
    code = cfg.lmtool_attn_type
    if code is None:
        if cfg.skip_attn_normalization:
            raise ValueError("--skip-attn-normalization is lmtool's flag and only applies with --lmtool-attn-type; "
                             "otherwise choose --fwp-normalize none|output|full")
    else:
        if code in LMTOOL_UNSUPPORTED:
            raise ValueError(f"--lmtool-attn-type {code} is not supported: lmtool's code {code} is "
                             f"{LMTOOL_UNSUPPORTED[code]}")
        if code not in LMTOOL_ATTN_TYPES:
            raise ValueError(f"--lmtool-attn-type {code} is not supported: not one of the paper's attention types "
                             f"(supported: {sorted(LMTOOL_ATTN_TYPES)}; follow-up recurrent-fwp codes such as 54, "
                             f"64, 124, 224-254, 934 are not implemented)")
        want_type, want_rule, plain, skipped = LMTOOL_ATTN_TYPES[code]
        if cfg.skip_attn_normalization and want_type != "softmax" and skipped is None:
            raise ValueError(f"lmtool attn_type {code} asserts that --skip_attn_normalization is off")
        want_norm = skipped if cfg.skip_attn_normalization else plain
        wanted = {"attn_type": want_type, "update_rule": want_rule, "fwp_normalize": want_norm}
        for name, value in wanted.items():
            given = str(getattr(cfg, name))
            if value is not None and given != str(getattr(_DEFAULTS, name)) and given != value:
                raise ValueError(f"--lmtool-attn-type {code} means --{name.replace('_', '-')} {value}, but "
                                 f"{given!r} was given; drop one of them")
        attn_type = want_type
        rule = want_rule or rule
        normalize = want_norm or normalize
    if normalize == "auto":
        normalize = "output" if rule == "sum" else "none"
    return attn_type, rule, normalize


def validate_config(cfg: FastWeightLMConfig, vocab_size: int) -> Tuple[str, str, str]:
    """Clear errors for impossible combinations (before any tensor is allocated); returns ``resolve_attention``."""
    attn_type, rule, normalize = resolve_attention(cfg)
    heads, dim = cfg.decoder_attention_heads, cfg.decoder_embed_dim
    if heads < 1 or dim < 1 or cfg.decoder_layers < 1 or cfg.decoder_ffn_embed_dim < 1:
        raise ValueError("decoder_layers, decoder_embed_dim, decoder_ffn_embed_dim and decoder_attention_heads must "
                         "be >= 1")
    if cfg.decoder_attention_head_dim is None and dim % heads:
        raise ValueError(f"--decoder-attention-heads {heads} does not divide --decoder-embed-dim {dim}; choose a "
                         f"divisor or set --decoder-attention-head-dim explicitly")
    if cfg.decoder_attention_head_dim is not None and cfg.decoder_attention_head_dim < 1:
        raise ValueError(f"--decoder-attention-head-dim must be >= 1, got {cfg.decoder_attention_head_dim}")
    if not cfg.no_pos and dim % 2:
        raise ValueError(f"--decoder-embed-dim must be even for the sinusoidal positions, got {dim} (or --no-pos)")
    if attn_type == "softmax":
        if cfg.carry_over_fast_weight:
            raise ValueError("--carry-over-fast-weight needs fast-weight attention (linear, performer, dpfp); softmax "
                             "attention has no fast weights to carry (lmtool asserts the same)")
    else:
        if rule == "sum" and normalize == "full":
            raise ValueError("--fwp-normalize full normalises the delta rule's retrieval key; the sum rule has none "
                             "(use output or none)")
        if cfg.attention_dropout > 0:
            raise ValueError(f"--attention-dropout {cfg.attention_dropout} drops softmax attention probabilities; "
                             f"{attn_type} fast-weight attention has none (set it to 0)")
    if cfg.performer_proj_dim < 1 or cfg.dpfp_n_roll < 1 or cfg.fwp_chunk_size < 1:
        raise ValueError("--performer-proj-dim, --dpfp-n-roll and --fwp-chunk-size must be >= 1")
    check_cutoffs(cfg.adaptive_softmax_cutoff, vocab_size)
    return attn_type, rule, normalize


class FastWeightDecoder(CoreDecoder):
    """Adaptive input (+ descending sinusoid) -> dropout -> post-LN blocks -> dropout -> adaptive softmax: the
    composable core (``models/base/core_decoder.py``) with lmtool's pieces."""

    def __init__(self, cfg: FastWeightLMConfig, dictionary) -> None:
        attn_type, rule, normalize = validate_config(cfg, len(dictionary))
        vocab, dim, heads = len(dictionary), cfg.decoder_embed_dim, cfg.decoder_attention_heads
        head_dim = cfg.decoder_attention_head_dim or dim // heads
        cutoffs = parse_cutoffs(cfg.adaptive_softmax_cutoff)
        embed_tokens = XLAdaptiveInput(vocab, dim, dim, cutoffs, cfg.adaptive_softmax_factor)  # x sqrt(C)
        tied = not cfg.untie_adaptive_weights
        super().__init__(
            dictionary, embed_tokens,
            input_position=PositionTerm() if cfg.no_pos else DescendingPosition(dim, cfg.clamp_len),
            layers=[ComposedBlock(dim, cfg.decoder_ffn_embed_dim, cfg.dropout, False,
                                  _mixer(cfg, attn_type, rule, normalize, head_dim))
                    for _ in range(cfg.decoder_layers)],
            layer_norm=None,  # post-LN: the last block ends in a LayerNorm
            adaptive_softmax=ProjectedAdaptiveLogSoftmax(
                vocab, dim, dim, cutoffs, cfg.adaptive_softmax_factor, tie_to=embed_tokens if tied else None,
                tie_projs=[False] + [tied] * len(cutoffs),
                bias_per_cluster=cfg.adaptive_softmax_factor > 1),  # lmtool's Linear per cluster when div_val > 1
            dropout=cfg.dropout, tokens_per_sample=cfg.tokens_per_sample)
        self.attn_type, self.update_rule, self.fwp_normalize = attn_type, rule, normalize
        self.embed_dim = dim
        self.reset_parameters(cfg.init_std, cfg.proj_init_std)

    @torch.no_grad()
    def reset_parameters(self, init_std: float, proj_init_std: float) -> None:
        """Transformer-XL's ``weights_init`` (lmtool's): N(0, init_std) weights, N(1, init_std) LayerNorm gains,
        zero biases, N(0, proj_init_std) adaptive projections; tied tensors initialised once as embeddings."""
        xl_weights_init(self, init_std, proj_init_std)

    @property
    def memory_description(self) -> str:
        return "fast weights carried" if self.carries_state else "none (fast weights reset every segment)"

    def state_size(self) -> int:
        """Numbers per batch row in the carried state of all layers (fast-weight models: independent of the
        context length)."""
        return sum(layer.self_attn.state_size() for layer in self.layers if hasattr(layer.self_attn, "state_size"))


def _mixer(cfg: FastWeightLMConfig, attn_type: str, rule: str, normalize: str, head_dim: int) -> nn.Module:
    """lmtool's attention of one layer: softmax over the segment (attn_type 2), or fast weights restarted at every
    segment unless carried over."""
    dim, heads = cfg.decoder_embed_dim, cfg.decoder_attention_heads
    if attn_type == "softmax":
        return SoftmaxMixer(dim, heads, head_dim, cfg.attention_dropout, PositionTerm(), SegmentSource())
    return FastWeightMixer(dim, heads, head_dim, attn_type, rule, normalize, carry=cfg.carry_over_fast_weight,
                           performer_proj_dim=cfg.performer_proj_dim,
                           performer_orthogonal_compat=cfg.performer_orthogonal_compat, dpfp_n_roll=cfg.dpfp_n_roll,
                           attn_impl=str(cfg.attn_impl), chunk_size=cfg.fwp_chunk_size,
                           lmtool_quadratic=cfg.lmtool_attn_type in LMTOOL_QUADRATIC)


@register_model("fast_weight_lm", dataclass=FastWeightLMConfig)
class FastWeightLanguageModel(StatefulLanguageModel):
    """Fast weight programmer LM; see the module docstring. Presets: ``fast_weight_wiki103_<size>_<variant>``."""

    decoder_class = FastWeightDecoder


WT103_CUTOFFS = "20000,40000,200000"


def _wiki103(args, dim: int, head_dim: int, **extra) -> None:
    """Shared by every script (spec §2): 16 layers, 8 heads, FFN 2048, dropout 0.1, dropatt 0, post-LN,
    adaptive softmax 20000/40000/200000 div_val 1 tied."""
    set_defaults(args, decoder_layers=16, decoder_embed_dim=dim, decoder_attention_heads=8,
                 decoder_attention_head_dim=head_dim, decoder_ffn_embed_dim=2048, dropout=0.1, attention_dropout=0.0,
                 adaptive_softmax_cutoff=WT103_CUTOFFS, adaptive_softmax_factor=1, **extra)


@register_model_architecture("fast_weight_lm", "fast_weight_wiki103_small_transformer")
def fast_weight_wiki103_small_transformer(args):
    """small_standard_transformer_baseline.sh (lmtool attn_type 2): softmax, d 128, 8 x 16."""
    _wiki103(args, 128, 16, attn_type="softmax")


@register_model_architecture("fast_weight_lm", "fast_weight_wiki103_small_fwm")
def fast_weight_wiki103_small_fwm(args):
    """small_linear_fast_weight_memory.sh (lmtool 24 as shipped: linear delta, output-normalised, spec §1.5)."""
    _wiki103(args, 128, 16, attn_type="linear", update_rule="delta", fwp_normalize="output")


@register_model_architecture("fast_weight_lm", "fast_weight_wiki103_small_fwm_carry_over")
def fast_weight_wiki103_small_fwm_carry_over(args):
    """The small fast weight memory with --carry_over_fast_weight --no_pos (no small script ships; as medium's)."""
    set_defaults(args, carry_over_fast_weight=True, no_pos=True)
    fast_weight_wiki103_small_fwm(args)


@register_model_architecture("fast_weight_lm", "fast_weight_wiki103_medium_transformer")
def fast_weight_wiki103_medium_transformer(args):
    """medium_standard_transformer_baseline.sh (lmtool 2): softmax, d 256, 8 x 32."""
    _wiki103(args, 256, 32, attn_type="softmax")


@register_model_architecture("fast_weight_lm", "fast_weight_wiki103_medium_fwm")
def fast_weight_wiki103_medium_fwm(args):
    """medium_linear_fast_weight_memory.sh (lmtool 24 as shipped: linear delta, output-normalised)."""
    _wiki103(args, 256, 32, attn_type="linear", update_rule="delta", fwp_normalize="output")


@register_model_architecture("fast_weight_lm", "fast_weight_wiki103_medium_fwm_carry_over")
def fast_weight_wiki103_medium_fwm_carry_over(args):
    """medium_linear_fast_weight_memory_carry_over_context.sh: the medium FWM + --carry_over_fast_weight --no_pos."""
    set_defaults(args, carry_over_fast_weight=True, no_pos=True)
    fast_weight_wiki103_medium_fwm(args)


@register_model_architecture("fast_weight_lm", "fast_weight_tiny")
def fast_weight_tiny(args):
    """Tests and the demo: 2 layers, d 32, 4 x 8 heads, FFN 64, linear delta, full softmax."""
    set_defaults(args, decoder_layers=2, decoder_embed_dim=32, decoder_attention_heads=4, decoder_attention_head_dim=8,
                 decoder_ffn_embed_dim=64, attn_type="linear", update_rule="delta")
