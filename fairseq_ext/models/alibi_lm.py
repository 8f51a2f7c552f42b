"""``alibi_lm``: fairseq's ``transformer_lm`` with ALiBi attention instead of positional embeddings, on the core loop.

Press, Smith, Lewis 2021, "Train Short, Test Long" (arXiv 2108.12409), Sec. 3: every self-attention logit gets
-m_h * (i - j); no position embedding is added. The flags are fairseq's ``transformer_lm`` flags, and parameter names
and construction order are its ``TransformerDecoder``'s, so the ALiBi fork's ``transformer_lm_wiki103``
checkpoints load after ``scripts/convert_alibi_checkpoint.py``. Unlike the fork, the bias is built per forward from
the current query/key lengths (any evaluation length, any batch size, no ``--model-overrides``), in the relative
form in fp32, and it is applied in incremental decoding too (``fairseq-generate`` / sampling).

The forward pass (``models/base/core_decoder.py``'s loop, read top to bottom):

    x = Drop(LN_emb(W_in (s * E[tokens])))      ``embed``: s = sqrt(C) unless --no-scale-embedding; W_in only when
                                                --decoder-input-dim differs; LN_emb with --layernorm-embedding
    c = (bias -m_h (i - j), key padding mask)   ``layer_context``: one (1, H, T, S) bias for every layer
    x, cache_l = AlibiLayer_l(x, cache_l, c)    ``modules/blocks/alibi_layer.py`` (pre-LN by default in the presets)
    features = W_out LN(x)                      ``finish``: final LN (pre-LN); W_out with --decoder-output-dim
    logits = output_projection(features)        or fairseq's AdaptiveSoftmax

Pieces: ``AlibiLayer`` -> ``modules/attention/alibi_self_attention.py`` (pure, ``KVCache`` while generating), the
slopes in ``modules/positional/alibi.py`` and the kernels in ``ops/alibi/`` (bias.py, naive.py, sdpa.py,
blocked.py, chunked.py, flex.py); fairseq's ``AdaptiveInput`` / ``AdaptiveSoftmax``. State: none across segments
(``close`` drops each layer's cache); generation keeps one KV cache over the whole prefix, like fairseq's decoder.
ALiBi over Transformer-XL memory or a key/value window is ``composed_lm`` (docs/composed.md).
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from fairseq import options
from fairseq.dataclass import ChoiceEnum
from fairseq.distributed import fsdp_wrap
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import Embedding
from fairseq.models.transformer_lm import (
    TransformerLanguageModelConfig,
    base_lm_architecture,
    transformer_lm_baevski_wiki103,
    transformer_lm_gpt2_small,
)
from fairseq.modules import AdaptiveInput, LayerNorm
from fairseq.utils import safe_getattr
from torch import Tensor, nn

from fairseq_ext.errors import ConfigError
from fairseq_ext.models.base import StatefulLanguageModel
from fairseq_ext.models.base.compile import CompileOptions, compile_blocks
from fairseq_ext.models.base.core_decoder import MAX_POSITIONS, CoreDecoder  # noqa: F401  (MAX_POSITIONS: re-exported)
from fairseq_ext.modules.adaptive.one_product_head import OneProductHeadAdaptiveSoftmax
from fairseq_ext.modules.attention.alibi_self_attention import AlibiSelfAttention
from fairseq_ext.modules.blocks.alibi_layer import AlibiContext, AlibiLayer, NormFormerScales, fairseq_dropout
from fairseq_ext.modules.composed import PositionTerm
from fairseq_ext.ops.alibi import BIAS_FORMS, IMPLS
from fairseq_ext.state import KVCache


@dataclass
class AlibiLanguageModelConfig(TransformerLanguageModelConfig, CompileOptions):
    alibi_bias_form: ChoiceEnum(BIAS_FORMS) = field(
        default="relative",
        metadata={"help": "relative: -m*(i-j) (paper; exact in fp16/bf16); key_index: m*j as in the original fork "
                          "(equal in fp32 under the causal mask; only for parity with its checkpoints)"},
    )
    attn_impl: ChoiceEnum(IMPLS) = field(
        default="auto",
        metadata={"help": "attention kernel: naive (explicit reference), sdpa (scaled_dot_product_attention with "
                          "a broadcast (1,H,T,S) bias), blocked (sdpa per causal block of query rows over the keys "
                          "up to the block: about half the work, biases viewed from one (1,H,r,S) strip), chunked "
                          "(sdpa per block of query rows, bias built per block: memory O(chunk x S)), flex "
                          "(FlexAttention score_mod), flash (FlashAttention-2 alibi_slopes: CUDA fp16/bf16, needs "
                          "flash-attn), auto (blocked on CPU at T >= 256, in evaluation too unless "
                          "--alibi-chunk-size is set; chunked without gradients when T exceeds one chunk; else sdpa; "
                          "logs its choice)"},
    )
    alibi_chunk_size: int = field(
        default=0,
        metadata={"help": "query rows per block of the chunked kernel; 0: as many as keep one block's fp32 bias "
                          "(H x rows x S) under 16M values (64 MiB). Set, it also makes --attn-impl auto evaluate "
                          "with chunked (beyond one chunk) instead of blocked"},
    )


_ALIBI_FIELDS = ("alibi_bias_form", "attn_impl", "alibi_chunk_size")

# fairseq's TransformerDecoder order: the parameters() order its checkpoints saved optimizer states in
SAVED_MODULE_ORDER = ("embed_tokens", "project_in_dim", "layernorm_embedding", "layers", "layer_norm",
                      "project_out_dim", "adaptive_softmax", "output_projection")
UNSUPPORTED = (("base_layers", "--base-layers"), ("decoder_xformers_att_config", "--decoder-xformers-att-config"),
               ("character_embeddings", "--character-embeddings"), ("quant_noise_pq", "--quant-noise-pq"))


class AlibiDecoder(CoreDecoder):
    """fairseq's transformer_lm decoder stages around ``AlibiLayer`` blocks; see the module docstring."""

    cuts_at_segments = False  # generation: one KV cache over the whole prefix, as fairseq's decoder

    def __init__(self, args, dictionary, embed_tokens: nn.Module) -> None:
        for name, flag in UNSUPPORTED:
            if safe_getattr(args, name, None):
                raise ConfigError(f"alibi_lm does not support {flag} (a transformer_lm option); drop it")
        dim, input_dim, output_dim = args.decoder_embed_dim, embed_tokens.embedding_dim, args.decoder_output_dim
        # built in fairseq's TransformerDecoder order, so a seed gives its initial weights
        project_in_dim = _xavier_linear(input_dim, dim) if dim != input_dim else None
        layernorm_embedding = LayerNorm(dim) if args.layernorm_embedding else None
        layers = [self._layer(args) for _ in range(args.decoder_layers)]
        final_norm = args.decoder_normalize_before and not args.no_decoder_final_norm
        layer_norm = LayerNorm(dim) if final_norm else None
        tie_adaptive = args.tie_adaptive_weights
        project_out_dim = _xavier_linear(dim, output_dim) if dim != output_dim and not tie_adaptive else None
        adaptive_softmax, output_projection = None, None
        if args.adaptive_softmax_cutoff is not None:
            adaptive_softmax = OneProductHeadAdaptiveSoftmax(
                len(dictionary), output_dim, options.eval_str_list(args.adaptive_softmax_cutoff, type=int),
                dropout=args.adaptive_softmax_dropout, adaptive_inputs=embed_tokens if tie_adaptive else None,
                factor=args.adaptive_softmax_factor, tie_proj=args.tie_adaptive_proj)
        elif args.share_decoder_input_output_embed:
            output_projection = nn.Linear(embed_tokens.weight.size(1), embed_tokens.weight.size(0), bias=False)
            output_projection.weight = embed_tokens.weight
        else:
            output_projection = nn.Linear(output_dim, len(dictionary), bias=False)
            nn.init.normal_(output_projection.weight, mean=0, std=output_dim ** -0.5)
        super().__init__(dictionary, embed_tokens, PositionTerm(), layers, layer_norm, adaptive_softmax,
                         dropout=args.dropout, tokens_per_sample=None)
        self.register_buffer("version", torch.Tensor([3]))  # fairseq's decoder version: its state dicts carry it
        self.project_in_dim = project_in_dim
        self.layernorm_embedding = layernorm_embedding
        self.project_out_dim = project_out_dim
        self.output_projection = output_projection
        self.keep_module_order(SAVED_MODULE_ORDER)
        self.args = args
        self.padding_idx = dictionary.pad()
        self.embed_scale = 1.0 if args.no_scale_embedding else dim ** 0.5

    @staticmethod
    def _layer(args) -> nn.Module:
        attention = AlibiSelfAttention(args.decoder_embed_dim, args.decoder_attention_heads,
                                       dropout=args.attention_dropout, bias_form=args.alibi_bias_form,
                                       attn_impl=args.attn_impl, chunk_size=args.alibi_chunk_size)
        scales = NormFormerScales(**{name: bool(safe_getattr(args, f"scale_{name}", False))
                                     for name in ("heads", "attn", "fc", "resids")})
        layer = AlibiLayer(attention, args.decoder_ffn_embed_dim, args.dropout,
                           args.activation_dropout or safe_getattr(args, "relu_dropout", 0.0) or 0.0,
                           args.activation_fn, args.decoder_normalize_before, scales, args.decoder_layerdrop,
                           args.checkpoint_activations, args.offload_activations)
        min_params = 0 if args.checkpoint_activations else args.min_params_to_wrap
        return fsdp_wrap(layer, min_num_params=min_params)  # unchanged unless training under FSDP

    @property
    def memory_description(self) -> str:
        return "none (each segment starts cold)"

    def embed(self, tokens: Tensor, offset: int, lengths: Tensor) -> Tensor:
        """tokens (B, T) -> the first layer's input (B, T, C); no position term (ALiBi biases the logits)."""
        x = self.embed_scale * self.embed_tokens(tokens)  # (B, T, C_in)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)  # (B, T, C)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return fairseq_dropout(x, self.input_dropout, self.training)

    def layer_context(self, tokens: Tensor, x: Tensor, layer_states: Tuple[Optional[KVCache], ...], offset: int,
                      segment_length: int) -> AlibiContext:
        """The key padding mask of the new tokens (None without padding), and, for a pass without a cache, the
        (1, H, T, T) bias of the kernel every layer will select, built once (one tensor kept for the backward pass,
        not one per layer; dropped when the forward returns)."""
        pad = tokens.eq(self.padding_idx)  # (B, T)
        key_padding_mask = pad if pad.any() else None
        if layer_states[0] is not None:
            return AlibiContext(None, key_padding_mask)  # generation: each layer biases its few new queries
        device, t = x.device, x.size(1)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x.dtype
        return AlibiContext(self.layers[0].self_attn.shared_bias(t, t, dtype, device), key_padding_mask)

    def finish(self, x: Tensor) -> Tensor:
        """The last layer's output (B, T, C) -> features (B, T, C_out): final LN (pre-LN stacks), W_out; no
        dropout (fairseq's decoder)."""
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        if self.project_out_dim is not None:
            x = self.project_out_dim(x)
        return x

    def output_layer(self, features: Tensor) -> Tensor:
        """Logits (B, T, V); with adaptive softmax the features unchanged (read by ``get_normalized_probs``)."""
        return features if self.output_projection is None else self.output_projection(features)


def _xavier_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """fairseq's decoder projections: bias-free, xavier-uniform."""
    linear = nn.Linear(in_dim, out_dim, bias=False)
    nn.init.xavier_uniform_(linear.weight)
    return linear


@register_model("alibi_lm", dataclass=AlibiLanguageModelConfig)
class AlibiLanguageModel(StatefulLanguageModel):
    """transformer_lm with ALiBi; see the module docstring. Presets: ``alibi_lm_wiki103``, ``alibi_lm_gpt2_small``,
    ``alibi_lm_tiny``."""

    @classmethod
    def build_model(cls, args, task) -> "AlibiLanguageModel":
        base_architecture(args)
        if args.decoder_layers_to_keep:
            args.decoder_layers = len(args.decoder_layers_to_keep.split(","))
        dictionary = task.source_dictionary
        check_adaptive_cutoffs(args, len(dictionary))
        if args.adaptive_input:
            embed_tokens = AdaptiveInput(
                len(dictionary), dictionary.pad(), args.decoder_input_dim, args.adaptive_input_factor,
                args.decoder_embed_dim, options.eval_str_list(args.adaptive_input_cutoff, type=int),
                args.quant_noise_pq, args.quant_noise_pq_block_size)
        else:
            embed_tokens = Embedding(len(dictionary), args.decoder_input_dim, dictionary.pad())
        if args.tie_adaptive_weights:
            if not args.adaptive_input:
                raise ConfigError("--tie-adaptive-weights needs --adaptive-input")
            if (args.adaptive_input_factor != args.adaptive_softmax_factor
                    or args.adaptive_softmax_cutoff != args.adaptive_input_cutoff
                    or args.decoder_input_dim != args.decoder_output_dim):
                raise ConfigError("--tie-adaptive-weights needs equal adaptive input/softmax cutoffs and factors "
                                  "and decoder_input_dim == decoder_output_dim")
        model = cls(AlibiDecoder(args, task.target_dictionary, embed_tokens))
        compile_blocks(model.decoder, args)
        return model


def check_adaptive_cutoffs(args, vocab_size: int) -> None:
    """fairseq's adaptive input / softmax assert ``cannot specify cutoff larger than vocab size``; name the flags."""
    flags = [("--adaptive-softmax-cutoff", args.adaptive_softmax_cutoff),
             ("--adaptive-input-cutoff", args.adaptive_input_cutoff if args.adaptive_input else None)]
    for flag, value in flags:
        if value is None:
            continue
        cutoffs = options.eval_str_list(value, type=int)
        if cutoffs != sorted(set(cutoffs)) or cutoffs[0] < 1 or cutoffs[-1] > vocab_size:
            raise ConfigError(
                f"alibi_lm: {flag} {value} must be strictly increasing, positive and at most the dictionary size "
                f"{vocab_size} (the presets' cutoffs are WikiText-103's). Set --adaptive-softmax-cutoff below it, "
                f"e.g. {max(1, vocab_size // 4)},{max(2, vocab_size // 2)}: the adaptive input follows it unless "
                f"--adaptive-input-cutoff is given (then both, equal with --tie-adaptive-weights)")


def input_cutoff_follows_softmax(args) -> None:
    """One cutoff flag, as in the other families: ``--adaptive-softmax-cutoff`` also sets the adaptive input's
    cutoffs unless ``--adaptive-input-cutoff`` is given (the presets tie them, so they must be equal). Applied before
    fairseq's presets fill in their defaults."""
    if safe_getattr(args, "adaptive_softmax_cutoff", None) is not None \
            and safe_getattr(args, "adaptive_input_cutoff", None) is None:
        args.adaptive_input_cutoff = args.adaptive_softmax_cutoff


def base_architecture(args):
    """Applied by ``build_model`` to every arch: no position embeddings, and our fields' dataclass defaults where
    an argparse namespace built outside fairseq's CLI lacks them. Like stock ``transformer_lm``, the plain
    ``alibi_lm`` arch (registered by ``register_model``) uses the dataclass defaults only; the named presets
    below apply fairseq's LM presets (``base_lm_architecture``: pre-norm, ...)."""
    input_cutoff_follows_softmax(args)
    args.no_token_positional_embeddings = True
    args.decoder_learned_pos = False
    for name in _ALIBI_FIELDS:
        if safe_getattr(args, name, None) is None:
            setattr(args, name, AlibiLanguageModelConfig.__dataclass_fields__[name].default)


@register_model_architecture("alibi_lm", "alibi_lm_wiki103")
def alibi_lm_wiki103(args):
    """The paper's 247M WikiText-103 model: fairseq's ``transformer_lm_wiki103`` (Baevski & Auli 2019) exactly,
    16 layers, d=1024, 8 heads, FFN 4096, adaptive input/softmax (20000, 60000) tied; ALiBi instead of positions."""
    input_cutoff_follows_softmax(args)
    transformer_lm_baevski_wiki103(args)
    base_architecture(args)


@register_model_architecture("alibi_lm", "alibi_lm_gpt2_small")
def alibi_lm_gpt2_small(args):
    """fairseq's ``transformer_lm_gpt2_small`` (24 layers, d=1024, 16 heads, gelu) with ALiBi."""
    input_cutoff_follows_softmax(args)
    transformer_lm_gpt2_small(args)
    base_architecture(args)


@register_model_architecture("alibi_lm", "alibi_lm_tiny")
def alibi_lm_tiny(args):
    """Tests and the demo: 2 layers, d=64, 4 heads, FFN 256."""
    input_cutoff_follows_softmax(args)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 2)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 64)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 256)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 4)
    base_lm_architecture(args)
    base_architecture(args)
