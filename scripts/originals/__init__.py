"""Bench-only reproductions of original code bases, each written here from reading the original (which is not part
of this project), so that ``scripts/bench.py --original LABEL`` times a row's configuration both as ours and as the
original algorithm, interleaved, on the same machine:

* ``alibi`` -- the ALiBi fork ofirpress/attention_with_linear_biases (stock fairseq ``TransformerDecoder`` with a
  materialised (B*H, T, T) bias mask);
* ``transformer_xl`` -- kimiyoung/transformer-xl ``mem_transformer.py`` (``MemTransformerLM``, attn_type 0);
* ``sha_rnn`` -- Smerity/sha-rnn ``model.py`` (``SHARNN``);
* ``adaptive_span`` -- not a reproduction: fairseq's own MIT-licensed port of facebookresearch/adaptive-span
  (``fairseq.examples.adaptive_span``, shipped in fairseq), run with the row's weights.

Each reproduction is built from the fairseq-built model of the row and holds its weights (the same parameter
count; tests check equal outputs in eval mode), so only the algorithm differs. The fork is a fairseq model itself;
``OriginalLM`` gives the other three the face of a fairseq language model (``forward``, ``get_normalized_probs``,
``get_targets``, ``decoder.adaptive_softmax``), so fairseq's ``Trainer`` trains every one with the row's optimizer
step. Their loss is the originals' computation, not ``lm_loss`` (``original_criterion``): fairseq's own
``adaptive_loss`` (the fork's training criterion) or ``cross_entropy``, a log-softmax per cluster and the target's
entry picked, which is what Transformer-XL's ``ProjectedAdaptiveLogSoftmax``, SHA-RNN's ``SplitCrossEntropyLoss``
(one split at its character vocabulary) and the adaptive-span example's ``log_softmax`` + NLL compute. Their outputs
and targets are time-first, as the originals compute them, except the adaptive-span port's, batch-first as it
computes them.

Not reproduced: the adaptive-span repository itself (CC-BY-NC; fairseq's port stands in for it) and fast weights
(IDSIA/lmtool-fwms JIT-compiles CUDA kernels for its fast-weight layers; no CPU path to compare with).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional, Tuple

import torch.nn.functional as F
from fairseq.criterions import FairseqCriterion
from fairseq.criterions.adaptive_loss import AdaptiveLoss
from fairseq.criterions.cross_entropy import CrossEntropyCriterion
from fairseq.models import BaseFairseqModel
from torch import Tensor, nn

from fairseq_ext.models.adaptive_span_lm import AdaptiveSpanLanguageModel
from fairseq_ext.models.alibi_lm import AlibiLanguageModel
from fairseq_ext.models.sha_rnn_lm import SHARNNLanguageModel
from fairseq_ext.models.transformer_xl_lm import TransformerXLLanguageModel

from . import adaptive_span, alibi, sha_rnn, transformer_xl


class OriginalLM(BaseFairseqModel):
    """A reproduction ``net`` (``forward(src_tokens (B, T)) -> (T, B, C|V)`` carrying its own state, ``reset()``;
    (B, T, C|V) when ``net.batch_first``) as a fairseq LM; ``adaptive_softmax``: the projected adaptive softmax its
    hidden states go through, or None when ``net`` returns logits."""

    def __init__(self, net: nn.Module, adaptive_softmax: Optional[nn.Module]) -> None:
        super().__init__()
        self.net = net
        self.decoder = SimpleNamespace(adaptive_softmax=adaptive_softmax, carries_state=True)

    def forward(self, src_tokens: Tensor, src_lengths: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Any]]:
        return self.net(src_tokens), {}  # (T, B, C|V)

    def get_normalized_probs(self, net_output: Tuple[Tensor, Dict[str, Any]], log_probs: bool,
                             sample: Optional[Dict[str, Any]] = None) -> Tensor:
        logits = net_output[0].float()  # (T, B, V) or (B, T, V)
        return F.log_softmax(logits, dim=-1) if log_probs else F.softmax(logits, dim=-1)

    def get_targets(self, sample: Dict[str, Any], net_output: Any) -> Tensor:
        target = sample["target"]  # (B, T)
        # laid out as the outputs; contiguous, as fairseq's criteria view it flat
        return target if getattr(self.net, "batch_first", False) else target.t().contiguous()

    def reset(self) -> None:
        self.net.reset()


def _as_lm(wrap: Callable[[Any, nn.Module], Tuple[nn.Module, Optional[nn.Module]]]) -> Callable[..., nn.Module]:
    """A ``wrap(model_cfg, decoder) -> (net, adaptive softmax)`` reproduction as an ``OriginalLM`` builder."""
    def build(model: nn.Module, cfg: Any, task: Any) -> OriginalLM:
        return OriginalLM(*wrap(cfg.model, model.decoder))
    return build


# (our model class, builder(model, cfg, task) -> the original's model holding the same weights)
ORIGINALS = ((AlibiLanguageModel, alibi.fork_of), (TransformerXLLanguageModel, _as_lm(transformer_xl.wrap_original)),
             (SHARNNLanguageModel, _as_lm(sha_rnn.wrap_original)),
             (AdaptiveSpanLanguageModel, _as_lm(adaptive_span.wrap_original)))


def original_of(model: nn.Module, cfg: Any, task: Any) -> nn.Module:
    """The reproduction of ``model``'s original code holding ``model``'s weights (``cfg``: the row's whole
    fairseq config); a clear error for a family whose original is not reproduced here."""
    build = next((b for cls, b in ORIGINALS if isinstance(model, cls)), None)
    if build is None:
        raise ValueError(f"no reproduction of the original code for {type(model).__name__} (--arch "
                         f"{cfg.model._name}): --original works for {', '.join(c.__name__ for c, _ in ORIGINALS)} "
                         f"rows; see scripts/originals/__init__.py for the other families")
    return build(model, cfg, task)


def original_criterion(cfg: Any, task: Any, original: nn.Module) -> FairseqCriterion:
    """The loss an original trains with, for the reproduction ``original``: fairseq's ``adaptive_loss`` over its
    adaptive softmax (the ALiBi fork's ``--criterion adaptive_loss``; built directly, as its DDP-backend check is
    about multi-GPU training) or ``cross_entropy`` over its logits: (N, V) log-probabilities and the target's entry
    picked, where ``lm_loss`` forms none from 8M logits on (``fairseq_ext.ops.cross_entropy``)."""
    sentence_avg = bool(cfg.optimization.sentence_avg)
    if getattr(original.decoder, "adaptive_softmax", None) is not None:
        return AdaptiveLoss(task, sentence_avg)
    return CrossEntropyCriterion(task, sentence_avg)
