"""``sha_rnn_lm``: the Single Headed Attention RNN (Merity 2019, "Single Headed Attention RNN: Stop Thinking With
Your Head", arXiv 1911.11423) as a fairseq language model, written from the spec (sha_rnn.md §1).

Stack (§1.1): embedding V x d -> dropouti -> n ``SHARNNBlock``s (LSTM, optional single-headed attention over a
memory of up to ``max_memory`` positions, Boom) -> dropout -> output tied to the embedding with its own bias. No
positional encoding. Init (§1.4): every Linear / Embedding weight N(0, 0.1/sqrt(d)), biases 0, LayerNorm gains 1
and biases 0 (the original's apex LayerNorm escapes its init; this project keeps gains at 1), gates qs/ks/vs 0,
the LSTM at PyTorch's default.

Attention placement (``--attn-layers``): "auto" = block n-2 only (the published single-head model), "all" (one
head per layer), "none", or a comma list of block indices. ``--collapse-value-gate`` builds the attention with the
Overparam value gate already collapsed (``vs`` used as is, no ``vq``: the form of a collapsed checkpoint);
``SHARNNDecoder.collapse_value_gate()`` folds a trained gate.

State: a ``DecoderState`` of one ``SHARNNBlockState`` per block (LSTM (h, c), attention memory); streaming carries it
across segments and the decoder base stores it detached after every call (the original detaches after each step).
The attention memory is trimmed to ``max_memory - T`` at the start of every segment of T tokens, so what a query
sees depends on where segments start; ``max_memory`` below the segment length (``--tokens-per-sample``, at training or
evaluation) is refused (``check_memory_window``): no memory would survive the trim and queries would see more than
``max_memory`` keys. Incremental decoding (``forward_incremental``) therefore reproduces the
streaming pass over segments of ``tokens_per_sample`` tokens exactly: the memory is trimmed for a segment of
``tokens_per_sample`` tokens whenever a new segment starts (offset 0) and grows untrimmed inside it.

Pieces, in the order the forward pass uses them: ``models/base/core_decoder.py`` (the loop and the state; the
trim length is the blocks' per-call context), the embedding, ``modules/blocks/sha_rnn_block.py`` (LSTM, Boom)
-> ``modules/attention/single_head_attention.py``, the tied output with ``modules/dead_rows.py``; state
SHARNNBlockState in a ``DecoderState`` (``fairseq_ext/state.py``), held by ``models/base``.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model, register_model_architecture
from fairseq.utils import safe_getattr
from omegaconf import II
from torch import Tensor, nn

from fairseq_ext.errors import ConfigError
from fairseq_ext.models.base import StatefulLanguageModel
from fairseq_ext.models.base.compile import CompileOptions
from fairseq_ext.models.base.core_decoder import CoreDecoder
from fairseq_ext.models.base.presets import set_defaults
from fairseq_ext.modules.attention.single_head_attention import IMPLS as ATTN_IMPLS
from fairseq_ext.modules.attention.single_head_attention import SingleHeadAttention
from fairseq_ext.modules.dead_rows import DeadRows
from fairseq_ext.modules.blocks.sha_rnn_block import SHARNNBlock
from fairseq_ext.modules.composed.positions import PositionTerm
from fairseq_ext.state import SegmentState



@dataclass
class SHARNNConfig(CompileOptions):
    """Defaults are the published enwik8 model (spec §1, §2)."""

    decoder_layers: int = field(default=4, metadata={"help": "number of blocks n (original --nlayers)"})
    decoder_embed_dim: int = field(default=1024, metadata={"help": "model dim d (--emsize)"})
    decoder_ffn_embed_dim: int = field(default=4096, metadata={"help": "Boom inner dim d_ff (--nhid), a multiple "
                                                                       "of d"})
    dropout: float = field(default=0.1, metadata={"help": "final dropout before the output layer"})
    dropouti: float = field(default=0.1, metadata={"help": "dropout after the embedding"})
    dropouth: float = field(default=0.1, metadata={"help": "dropout after the LSTM, on q, v and the attention "
                                                           "probabilities, after attention, inside and after Boom"})
    attn_layers: str = field(default="auto", metadata={"help": "blocks with attention: auto (block n-2), all, "
                                                               "none, or comma-separated indices"})
    max_memory: int = field(default=5000, metadata={"help": "attention window W: keys seen by a query"})
    collapse_value_gate: bool = field(default=False, metadata={"help": "build the Overparam value gate collapsed "
                                                                       "(vs used as is, no vq)"})
    attn_impl: ChoiceEnum(ATTN_IMPLS) = field(
        default="auto", metadata={"help": "attention kernel: naive (written-out softmax, the reference), split "
                                          "(gates on the query side, no key/value gradient products for the "
                                          "detached memory), sdpa (scaled_dot_product_attention with its own "
                                          "dropout: fused kernels on CUDA), auto (sdpa on CUDA, split in CPU "
                                          "training, naive in CPU evaluation; logged)"})
    tokens_per_sample: int = II("task.tokens_per_sample")


def parse_attn_layers(spec: str, num_layers: int) -> List[int]:
    """``--attn-layers`` -> sorted block indices with attention."""
    spec = spec.strip().lower()
    if spec == "auto":
        return [max(num_layers - 2, 0)]
    if spec == "all":
        return list(range(num_layers))
    if spec in ("none", ""):
        return []
    try:
        indices = sorted({int(i) for i in spec.split(",")})
    except ValueError:
        raise ValueError(f"--attn-layers {spec!r}: expected auto, all, none or comma-separated block indices")
    if indices[0] < 0 or indices[-1] >= num_layers:
        raise ValueError(f"--attn-layers {spec!r}: indices must lie in [0, {num_layers - 1}]")
    return indices


def check_memory_window(max_memory: int, tokens_per_sample: Optional[int]) -> None:
    """Refuse an attention window W = ``max_memory`` below the segment length T = ``tokens_per_sample`` (None: not
    known here). Before every segment the memory is trimmed to its last max(W - T, 0) positions, so with W < T a query
    would see up to T keys of its own segment (more than W) and never a position of an earlier segment."""
    if max_memory < 1:
        raise ConfigError(f"--max-memory {max_memory} must be >= 1 (the attention window: keys a query sees)")
    if tokens_per_sample is not None and max_memory < tokens_per_sample:
        raise ConfigError(
            f"--max-memory {max_memory} is smaller than --tokens-per-sample {tokens_per_sample}: SHA-RNN trims its "
            f"attention memory to max_memory - T positions before every segment of T tokens, so queries would see up "
            f"to {tokens_per_sample} keys of their own segment and no memory at all. Use --max-memory >= "
            f"{tokens_per_sample} (the published model: 5000 with T 1024; for a trained checkpoint --model-overrides "
            f"\"{{'max_memory': N}}\"), or a shorter --tokens-per-sample")


class SHARNNDecoder(CoreDecoder):
    """Embedding -> dropouti -> blocks -> dropout -> tied output with its own bias, on the one decoder loop
    (``models/base/core_decoder.py``); the blocks' per-call context is how far to trim the attention memory."""

    def __init__(self, cfg: SHARNNConfig, dictionary) -> None:
        vocab, dim = len(dictionary), cfg.decoder_embed_dim
        if cfg.decoder_layers < 1 or dim < 1:
            raise ValueError("decoder_layers and decoder_embed_dim must be >= 1")
        tokens_per_sample: Optional[int] = safe_getattr(cfg, "tokens_per_sample", None)
        check_memory_window(cfg.max_memory, tokens_per_sample)
        attn_layers = parse_attn_layers(cfg.attn_layers, cfg.decoder_layers)
        super().__init__(
            dictionary, nn.Embedding(vocab, dim), PositionTerm(),
            layers=[SHARNNBlock(dim, cfg.decoder_ffn_embed_dim, cfg.dropouth, i in attn_layers, cfg.max_memory,
                                collapsed=cfg.collapse_value_gate,
                                attn_impl=str(safe_getattr(cfg, "attn_impl", "auto")))
                    for i in range(cfg.decoder_layers)],
            layer_norm=None, adaptive_softmax=None, dropout=cfg.dropout, tokens_per_sample=tokens_per_sample,
            input_dropout=cfg.dropouti)
        self.embed_dim = dim
        self.max_memory = cfg.max_memory
        self.attn_layers = attn_layers
        self.output_bias = nn.Parameter(torch.zeros(vocab))
        self.dead_rows = DeadRows(vocab, bias="output_bias", weight="embed_tokens.weight")  # converted checkpoints
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Spec §1.4: Linear / Embedding weights N(0, 0.1/sqrt(d)), biases 0, LN (1, 0), gates 0, LSTM default."""
        std = 0.1 / math.sqrt(self.embed_dim)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, SingleHeadAttention):
                for gate in (module.qs, module.ks, module.vs):
                    nn.init.zeros_(gate)
        nn.init.zeros_(self.output_bias)

    def collapse_value_gate(self) -> None:
        """Fold every attention's Overparam value gate into its ``vs`` (the original's ``vq_collapse``)."""
        for layer in self.layers:
            if layer.attn is not None:
                layer.attn.collapse_value_gate()

    def output_layer(self, features: Tensor) -> Tensor:
        """features (B, T, d) -> logits (B, T, V) through the tied embedding and the output bias."""
        return self.dead_rows(F.linear(features, self.embed_tokens.weight, self.output_bias))

    @property
    def memory_description(self) -> str:
        attention = f", attention memory of max_memory {self.max_memory}" if self.attn_layers else ""
        return f"LSTM state{attention}"

    def layer_context(self, tokens: Tensor, x: Tensor, layer_states: Tuple[Optional[SegmentState], ...], offset: int,
                      segment_length: int) -> int:
        """How many tokens to trim each block's memory for (``SHARNNBlock.forward``): a whole segment of
        ``segment_length`` when the call starts one (streaming: the call's T; incremental decoding: tokens_per_sample),
        none (0) when it continues an unfinished segment."""
        return segment_length if offset == 0 else 0


@register_model("sha_rnn_lm", dataclass=SHARNNConfig)
class SHARNNLanguageModel(StatefulLanguageModel):
    """SHA-RNN LM; see the module docstring. Presets: ``sha_rnn_enwik8``, ``sha_rnn_enwik8_full_attn``,
    ``sha_rnn_tiny``."""

    decoder_class = SHARNNDecoder

    @classmethod
    def build_model(cls, cfg: SHARNNConfig, task) -> "SHARNNLanguageModel":
        """The model for ``task``; its segment length (the task's --tokens-per-sample, which fairseq-eval-lm may set
        apart from the checkpoint's) must fit the attention window as well (``check_memory_window``)."""
        check_memory_window(cfg.max_memory, safe_getattr(safe_getattr(task, "cfg", None), "tokens_per_sample", None))
        return super().build_model(cfg, task)


@register_model_architecture("sha_rnn_lm", "sha_rnn_enwik8")
def sha_rnn_enwik8(args):
    """The published single-head model: 4 blocks, d 1024, d_ff 4096, attention in block 2 only, W 5000, dropouts
    0.1 (53.8M parameters with V = 205; 51.7M collapsed)."""
    set_defaults(args, decoder_layers=4, decoder_embed_dim=1024, decoder_ffn_embed_dim=4096, attn_layers="auto",
                 max_memory=5000, dropout=0.1, dropouti=0.1, dropouth=0.1)


@register_model_architecture("sha_rnn_lm", "sha_rnn_enwik8_full_attn")
def sha_rnn_enwik8_full_attn(args):
    """Attention in every block (the paper's 4-head variant; 63.3M, 54.9M collapsed)."""
    set_defaults(args, attn_layers="all")
    sha_rnn_enwik8(args)


@register_model_architecture("sha_rnn_lm", "sha_rnn_tiny")
def sha_rnn_tiny(args):
    """Tests and the demo: 2 blocks, d 32, d_ff 128, attention in both, W 40."""
    set_defaults(args, decoder_layers=2, decoder_embed_dim=32, decoder_ffn_embed_dim=128, attn_layers="all",
                 max_memory=40)
