"""A toy stateful LM for the tests (registered with fairseq as ``fairseq_ext_test_toy_lm``, never in fairseq_ext).

Its state is the histogram of every input token read so far, so continuity is checkable by hand (after segments
0..j of a stream it equals the token counts of those segments' inputs), plus a differentiable moving average of
the embeddings (so truncated BPTT has a graph to cut). With ``--toy-stateless`` it is stateless (both restart
at every segment): an LM whose context is the current segment only.

    counts_t = counts_before + sum_{s <= t} onehot(x_s)            (B, T, V)
    m_t      = DECAY * m_{t-1} + (1 - DECAY) * embed(x_t)          (B, T, C), m_{-1} = memory_before or 0
    h_t      = embed(x_t) + W_mix log(1 + counts_t) + m_t          (B, T, C)
    logits_t = W_out h_t   (or fairseq's AdaptiveSoftmax on h_t)   (B, T, V)
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from fairseq import options
from fairseq.data import Dictionary
from fairseq.dataclass import FairseqDataclass
from fairseq.models import MODEL_REGISTRY, register_model
from fairseq.modules import AdaptiveSoftmax
from torch import Tensor, nn

from fairseq_ext.models.base import StatefulDecoder, StatefulLanguageModel
from fairseq_ext.models.base.stateful_decoder import SegmentOutput
from fairseq_ext.state import SegmentState
from tests.harness import tiny_dictionary

TOY_ARCH = "fairseq_ext_test_toy_lm"
DECAY = 0.5


@dataclasses.dataclass(frozen=True)
class CountState(SegmentState):
    """counts: (B, V) how often each token id has been an input so far; memory: (B, C) the last m_t."""

    counts: Tensor
    memory: Tensor


class ToyPenalty(nn.Module):
    """Exposes ``aux_loss`` (coef * ||w||^2) and ``log_stats`` like an adaptive-span layer would."""

    def __init__(self, dim: int, coef: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 0.5))
        self.coef = coef

    def aux_loss(self) -> Tensor:
        return self.coef * self.weight.pow(2).sum()

    def log_stats(self) -> Dict[str, float]:
        return {"toy_weight_mean": float(self.weight.detach().mean())}


class ToyDecoder(StatefulDecoder):
    def __init__(self, dictionary: Dictionary, embed_dim: int, carry_state: bool,
                 adaptive_cutoff: Optional[List[int]] = None, aux_coef: float = 0.0) -> None:
        super().__init__(dictionary)
        vocab = len(dictionary)
        self.carry_state = carry_state
        self.embed = nn.Embedding(vocab, embed_dim)
        self.mix = nn.Linear(vocab, embed_dim, bias=False)
        self.out = None if adaptive_cutoff else nn.Linear(embed_dim, vocab)
        if adaptive_cutoff:
            self.adaptive_softmax = AdaptiveSoftmax(vocab, embed_dim, adaptive_cutoff, dropout=0.0)
        self.penalty = ToyPenalty(embed_dim, aux_coef) if aux_coef > 0 else None

    def forward_segment(self, tokens: Tensor, state: Optional[CountState]) -> SegmentOutput:
        onehot = F.one_hot(tokens, self.embed.num_embeddings).to(self.embed.weight.dtype)  # (B, T, V)
        counts = onehot.cumsum(dim=1)  # (B, T, V)
        embedded = self.embed(tokens)  # (B, T, C)
        memory = embedded.new_zeros(embedded.shape[0], embedded.shape[2])  # (B, C)
        if state is not None and self.carry_state:
            counts = counts + state.counts[:, None, :]  # (B, T, V)
            memory = state.memory
        memories = []
        for t in range(tokens.size(1)):
            memory = DECAY * memory + (1 - DECAY) * embedded[:, t]  # (B, C)
            memories.append(memory)
        features = embedded + self.mix(torch.log1p(counts)) + torch.stack(memories, dim=1)  # (B, T, C)
        if self.penalty is not None:
            features = features * self.penalty.weight  # (B, T, C)
        new_state = CountState(counts[:, -1], memory) if self.carry_state else None  # (B, V), (B, C)
        return features, new_state, {}

    def output_layer(self, features: Tensor) -> Tensor:
        return features if self.out is None else self.out(features)  # (B, T, V) or (B, T, C) for adaptive


@dataclass
class ToyLMConfig(FairseqDataclass):
    decoder_embed_dim: int = field(default=16, metadata={"help": "C"})
    toy_stateless: bool = field(default=False, metadata={"help": "no state: the context is the current segment"})
    adaptive_softmax_cutoff: Optional[str] = field(default=None, metadata={"help": "e.g. '6,10'"})
    toy_aux_coef: float = field(default=0.0, metadata={"help": "> 0 adds a ToyPenalty module with aux_loss"})


class ToyLanguageModel(StatefulLanguageModel):
    @classmethod
    def build_model(cls, cfg: ToyLMConfig, task) -> "ToyLanguageModel":
        cutoff = options.eval_str_list(cfg.adaptive_softmax_cutoff, type=int) if cfg.adaptive_softmax_cutoff else None
        return cls(ToyDecoder(task.target_dictionary, cfg.decoder_embed_dim, not cfg.toy_stateless, cutoff,
                              cfg.toy_aux_coef))


if TOY_ARCH not in MODEL_REGISTRY:  # a second import of this file must not register a second class
    register_model(TOY_ARCH, dataclass=ToyLMConfig)(ToyLanguageModel)


def toy_model(num_words: int = 12, embed_dim: int = 16, carry_state: bool = True,
              adaptive_cutoff: Optional[List[int]] = None, aux_coef: float = 0.0, seed: int = 0
              ) -> ToyLanguageModel:
    """A toy model whose batches the tests treat as contiguous streams (``attach_streams``)."""
    torch.manual_seed(seed)
    model = ToyLanguageModel(ToyDecoder(tiny_dictionary(num_words), embed_dim, carry_state, adaptive_cutoff,
                                        aux_coef))
    model.decoder.attach_streams("tests")
    return model
