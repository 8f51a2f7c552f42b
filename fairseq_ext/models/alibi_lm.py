"""``alibi_lm``: fairseq's ``transformer_lm`` decoder with ALiBi attention instead of positional embeddings.

Press, Smith, Lewis 2021, "Train Short, Test Long" (arXiv 2108.12409), Sec. 3: every self-attention logit gets
-m_h * (i - j); no position embedding is added. The layers, embeddings, adaptive input/softmax and all parameter
names are fairseq's own (``TransformerDecoder``), so the ALiBi fork's ``transformer_lm_wiki103`` checkpoints load
after ``scripts/convert_alibi_checkpoint.py``. Unlike the fork, the bias is built per forward from the current
query/key lengths (any evaluation length, any batch size, no ``--model-overrides``), in the relative form in fp32,
and it is applied in incremental decoding too (``fairseq-generate`` / sampling).

Pieces, in the order the forward pass uses them: fairseq's ``TransformerDecoder`` (embeddings, layers, norms,
adaptive input/softmax) with each layer's attention replaced by ``AlibiMultiheadAttention`` (this file) around
``modules/attention/alibi_self_attention.py`` (pure, ``KVCache`` while generating), the slopes in
``modules/positional/alibi.py`` and the kernels in ``ops/alibi/`` (bias.py, naive.py, sdpa.py, chunked.py,
flex.py). ALiBi over Transformer-XL memory or a key/value window is ``composed_lm`` (docs/composed.md).
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from fairseq import options
from fairseq.dataclass import ChoiceEnum
from fairseq.distributed import fsdp_wrap
from fairseq.incremental_decoding_utils import with_incremental_state
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerDecoder
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
    transformer_lm_baevski_wiki103,
    transformer_lm_gpt2_small,
)
from fairseq.modules import AdaptiveInput
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
from fairseq.utils import safe_getattr
import torch
from torch import Tensor

from fairseq_ext.errors import ConfigError
from fairseq_ext.models.base.sliding_estimate import log_sliding_estimate
from fairseq_ext.modules.attention.alibi_self_attention import AlibiSelfAttention
from fairseq_ext.ops.alibi import BIAS_FORMS, IMPLS
from fairseq_ext.state import KVCache

# ALiBi needs no position table, so the model accepts any length; fairseq only uses this for filtering.
MAX_POSITIONS = 1_000_000


@dataclass
class AlibiLanguageModelConfig(TransformerLanguageModelConfig):
    alibi_bias_form: ChoiceEnum(BIAS_FORMS) = field(
        default="relative",
        metadata={"help": "relative: -m*(i-j) (paper; exact in fp16/bf16); key_index: m*j as in the original fork "
                          "(equal in fp32 under the causal mask; only for parity with its checkpoints)"},
    )
    attn_impl: ChoiceEnum(IMPLS) = field(
        default="auto",
        metadata={"help": "attention kernel: naive (explicit reference), sdpa (scaled_dot_product_attention with "
                          "a broadcast (1,H,T,S) bias), chunked (sdpa per block of query rows, bias built per "
                          "block: memory O(chunk x S)), flex (FlexAttention score_mod), auto (sdpa; chunked "
                          "without gradients when T exceeds one chunk; logs its choice)"},
    )
    alibi_chunk_size: int = field(
        default=0,
        metadata={"help": "query rows per block of the chunked kernel; 0: as many as keep one block's fp32 bias "
                          "(H x rows x S) under 16M values (64 MiB)"},
    )


_ALIBI_FIELDS = ("alibi_bias_form", "attn_impl", "alibi_chunk_size")


@with_incremental_state
class AlibiMultiheadAttention(AlibiSelfAttention):
    """Speaks fairseq's MultiheadAttention protocol (time-first, ``incremental_state``) for its decoder layer.

    The KVCache is the same object the pure module returns; incremental decoding stores it in
    ``incremental_state`` and ``reorder_incremental_state`` reorders it for beam search. ``attn_mask`` carries the
    bias AlibiDecoder builds once per forward (``shared_bias``), never a fairseq future mask.
    """

    def forward(self, query: Tensor, key: Optional[Tensor], value: Optional[Tensor],
                key_padding_mask: Optional[Tensor] = None,
                incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
                need_weights: bool = False, attn_mask: Optional[Tensor] = None) -> Tuple[Tensor, None]:
        if need_weights:
            raise ValueError("alibi_lm does not return attention weights (need_weights=True unsupported)")
        state = self._get_cache(incremental_state)
        if attn_mask is not None and state is not None:
            raise ValueError("a shared full-pass ALiBi bias cannot be combined with a KV cache")
        y, cache = super().forward(query.transpose(0, 1), state, key_padding_mask, attn_mask)  # (T,B,C)->(B,T,C)
        if incremental_state is not None:
            self.set_incremental_state(incremental_state, "kv", {"cache": cache})
        return y.transpose(0, 1), None  # (T, B, C)

    def _get_cache(self, incremental_state) -> Optional[KVCache]:
        saved = self.get_incremental_state(incremental_state, "kv")
        return None if saved is None else saved["cache"]

    def _get_input_buffer(self, incremental_state) -> Dict[str, Optional[Tensor]]:
        return {}  # fairseq's layer checks this only for cross_self_attention (unsupported here)

    def reorder_incremental_state(self, incremental_state, new_order: Tensor) -> None:
        cache = self._get_cache(incremental_state)
        if cache is not None:
            self.set_incremental_state(incremental_state, "kv", {"cache": cache.reorder(new_order)})


class AlibiDecoderLayer(TransformerDecoderLayerBase):
    """fairseq's pre-norm decoder layer with ALiBi self-attention."""

    def __init__(self, cfg: TransformerConfig, bias_form: str, attn_impl: str, chunk_size: int = 0) -> None:
        self._alibi_bias_form = bias_form  # read by build_self_attention during the base constructor
        self._attn_impl = attn_impl
        self._chunk_size = chunk_size
        super().__init__(cfg, no_encoder_attn=True)

    def build_self_attention(self, embed_dim, cfg, add_bias_kv=False, add_zero_attn=False):
        if add_bias_kv or add_zero_attn or cfg.cross_self_attention:
            raise ValueError("alibi_lm does not support add_bias_kv, add_zero_attn or cross_self_attention")
        return AlibiMultiheadAttention(embed_dim, cfg.decoder.attention_heads, dropout=cfg.attention_dropout,
                                       bias_form=self._alibi_bias_form, attn_impl=self._attn_impl,
                                       chunk_size=self._chunk_size)


class AlibiDecoder(TransformerDecoder):
    """TransformerDecoder without position embeddings whose layers use ALiBi attention (causal only).

    Like the original fork, the bias is built once per forward and shared by all layers (fairseq asks
    ``buffered_future_mask`` once per layer; it returns the same tensor), so autograd keeps one H x T x T tensor,
    not one per layer. It is dropped when the forward returns: nothing sized by a length outlives a call.
    """

    def __init__(self, args, dictionary, embed_tokens, no_encoder_attn=False, output_projection=None):
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn, output_projection)
        self._shared_bias: Optional[Tensor] = None
        self._shared_bias_key: Optional[Tuple[int, torch.dtype, torch.device]] = None

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        # fairseq's base constructor passes a TransformerConfig, which drops our fields: read them from self.args.
        cfg = TransformerConfig.from_namespace(cfg)
        layer = AlibiDecoderLayer(cfg, self.args.alibi_bias_form, self.args.attn_impl, self.args.alibi_chunk_size)
        if cfg.checkpoint_activations:
            layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
        return fsdp_wrap(layer, min_num_params=0 if cfg.checkpoint_activations else cfg.min_params_to_wrap)

    def buffered_future_mask(self, tensor: Tensor) -> Optional[Tensor]:
        """tensor: (T, B, C) layer input. Returns the shared (1, H, T, T) bias (None for kernels that build none)."""
        t, device = tensor.size(0), tensor.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else tensor.dtype
        if self._shared_bias_key != (t, dtype, device):  # first layer of this forward
            attention = next(m for m in self.layers.modules() if isinstance(m, AlibiMultiheadAttention))
            self._shared_bias = attention.shared_bias(t, t, dtype, device)
            self._shared_bias_key = (t, dtype, device)
        return self._shared_bias

    def extract_features_scriptable(self, prev_output_tokens, encoder_out=None, incremental_state=None,
                                    full_context_alignment: bool = False, alignment_layer=None,
                                    alignment_heads=None):
        if full_context_alignment:
            raise ValueError("alibi_lm is a causal decoder; full_context_alignment is not supported")
        try:
            return super().extract_features_scriptable(prev_output_tokens, encoder_out, incremental_state,
                                                       full_context_alignment, alignment_layer, alignment_heads)
        finally:
            self._shared_bias, self._shared_bias_key = None, None

    def max_positions(self) -> int:
        return MAX_POSITIONS


@register_model("alibi_lm", dataclass=AlibiLanguageModelConfig)
class AlibiLanguageModel(TransformerLanguageModel):
    @classmethod
    def build_model(cls, args, task):
        base_architecture(args)
        if args.decoder_layers_to_keep:
            args.decoder_layers = len(args.decoder_layers_to_keep.split(","))
        if args.character_embeddings:
            raise ValueError("alibi_lm does not support --character-embeddings")
        if safe_getattr(args, "quant_noise_pq", 0) > 0:
            raise ValueError("alibi_lm does not support --quant-noise-pq")
        check_adaptive_cutoffs(args, len(task.source_dictionary))
        if args.adaptive_input:
            embed_tokens = AdaptiveInput(
                len(task.source_dictionary), task.source_dictionary.pad(), args.decoder_input_dim,
                args.adaptive_input_factor, args.decoder_embed_dim,
                options.eval_str_list(args.adaptive_input_cutoff, type=int),
                args.quant_noise_pq, args.quant_noise_pq_block_size,
            )
        else:
            embed_tokens = cls.build_embedding(args, task.source_dictionary, args.decoder_input_dim)
        if args.tie_adaptive_weights:
            if not args.adaptive_input:
                raise ValueError("--tie-adaptive-weights needs --adaptive-input")
            if (args.adaptive_input_factor != args.adaptive_softmax_factor
                    or args.adaptive_softmax_cutoff != args.adaptive_input_cutoff
                    or args.decoder_input_dim != args.decoder_output_dim):
                raise ValueError("--tie-adaptive-weights needs equal adaptive input/softmax cutoffs and factors "
                                 "and decoder_input_dim == decoder_output_dim")
        decoder = AlibiDecoder(args, task.target_dictionary, embed_tokens, no_encoder_attn=True)
        return cls(decoder)

    def prepare_for_inference_(self, cfg) -> None:
        """fairseq-eval-lm --context-window: log the sliding evaluation's estimated duration first."""
        super().prepare_for_inference_(cfg)
        eval_lm = getattr(cfg, "eval_lm", None)
        if eval_lm is not None and getattr(eval_lm, "context_window", 0) > 0:
            log_sliding_estimate(self, cfg)


def check_adaptive_cutoffs(args, vocab_size: int) -> None:
    """fairseq's adaptive input / softmax assert ``cannot specify cutoff larger than vocab size``; name the flags."""
    flags = [("--adaptive-input-cutoff", args.adaptive_input_cutoff if args.adaptive_input else None),
             ("--adaptive-softmax-cutoff", args.adaptive_softmax_cutoff)]
    for flag, value in flags:
        if value is None:
            continue
        cutoffs = options.eval_str_list(value, type=int)
        if cutoffs != sorted(set(cutoffs)) or cutoffs[0] < 1 or cutoffs[-1] > vocab_size:
            raise ConfigError(
                f"alibi_lm: {flag} {value} must be strictly increasing, positive and at most the dictionary size "
                f"{vocab_size} (the presets' cutoffs are WikiText-103's). Set --adaptive-input-cutoff and "
                f"--adaptive-softmax-cutoff below it (equal, with --tie-adaptive-weights), e.g. "
                f"{max(1, vocab_size // 4)},{max(2, vocab_size // 2)}; fairseq's transformer_lm flags, where the "
                f"other families take one --adaptive-softmax-cutoff for both")


def base_architecture(args):
    """Applied by ``build_model`` to every arch: no position embeddings, and our fields' dataclass defaults where
    an argparse namespace built outside fairseq's CLI lacks them. Like stock ``transformer_lm``, the plain
    ``alibi_lm`` arch (registered by ``register_model``) uses the dataclass defaults only; the named presets
    below apply fairseq's LM presets (``base_lm_architecture``: pre-norm, ...)."""
    args.no_token_positional_embeddings = True
    args.decoder_learned_pos = False
    for name in _ALIBI_FIELDS:
        if safe_getattr(args, name, None) is None:
            setattr(args, name, AlibiLanguageModelConfig.__dataclass_fields__[name].default)


@register_model_architecture("alibi_lm", "alibi_lm_wiki103")
def alibi_lm_wiki103(args):
    """The paper's 247M WikiText-103 model: fairseq's ``transformer_lm_wiki103`` (Baevski & Auli 2019) exactly,
    16 layers, d=1024, 8 heads, FFN 4096, adaptive input/softmax (20000, 60000) tied; ALiBi instead of positions."""
    transformer_lm_baevski_wiki103(args)
    base_architecture(args)


@register_model_architecture("alibi_lm", "alibi_lm_gpt2_small")
def alibi_lm_gpt2_small(args):
    """fairseq's ``transformer_lm_gpt2_small`` (24 layers, d=1024, 16 heads, gelu) with ALiBi."""
    transformer_lm_gpt2_small(args)
    base_architecture(args)


@register_model_architecture("alibi_lm", "alibi_lm_tiny")
def alibi_lm_tiny(args):
    """Tests and the demo: 2 layers, d=64, 4 heads, FFN 256."""
    args.decoder_layers = safe_getattr(args, "decoder_layers", 2)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 64)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 256)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 4)
    base_lm_architecture(args)
    base_architecture(args)
