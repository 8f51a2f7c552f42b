"""Bench-only reproductions of original code bases, each written here from reading the original (which is not part
of this project), so that ``scripts/bench.py --original LABEL`` times a row's configuration both as ours and as the
original algorithm, interleaved, on the same machine:

* ``transformer_xl`` -- kimiyoung/transformer-xl ``mem_transformer.py`` (``MemTransformerLM``, attn_type 0);
* ``sha_rnn`` -- Smerity/sha-rnn ``model.py`` (``SHARNN``).

Each reproduction is built from the fairseq-built model of the row and holds its weights (the same parameter
count; tests check equal outputs in eval mode), so only the algorithm differs. ``OriginalLM`` gives it the face of a
fairseq language model (``forward``, ``get_normalized_probs``, ``get_targets``, ``decoder.adaptive_softmax``), so
fairseq's ``Trainer`` and the same ``lm_loss`` train it with the same optimizer step. Its outputs and targets are
time-first, as the originals compute them.

Not reproduced: adaptive span (facebookresearch/adaptive-span is CC-BY-NC), fast weights (IDSIA/lmtool-fwms
JIT-compiles CUDA kernels for its fast-weight layers; no CPU path to compare with), and ALiBi (its original is a
fairseq fork: stock fairseq's ``transformer_lm`` is that code without the bias, and ``scripts/bench_alibi.py`` times
the fork's bias beside ours).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, Optional, Tuple

import torch.nn.functional as F
from fairseq.models import BaseFairseqModel
from torch import Tensor, nn

from fairseq_ext.models.sha_rnn_lm import SHARNNLanguageModel
from fairseq_ext.models.transformer_xl_lm import TransformerXLLanguageModel

from . import sha_rnn, transformer_xl

WRAPPERS = ((TransformerXLLanguageModel, transformer_xl.wrap_original), (SHARNNLanguageModel, sha_rnn.wrap_original))


class OriginalLM(BaseFairseqModel):
    """A reproduction ``net`` (``forward(src_tokens (B, T)) -> (T, B, C|V)`` carrying its own state, ``reset()``)
    as a fairseq LM; ``adaptive_softmax``: the projected adaptive softmax its hidden states go through, or None when
    ``net`` returns logits."""

    def __init__(self, net: nn.Module, adaptive_softmax: Optional[nn.Module]) -> None:
        super().__init__()
        self.net = net
        self.decoder = SimpleNamespace(adaptive_softmax=adaptive_softmax, carries_state=True)

    def forward(self, src_tokens: Tensor, src_lengths: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Any]]:
        return self.net(src_tokens), {}  # (T, B, C|V)

    def get_normalized_probs(self, net_output: Tuple[Tensor, Dict[str, Any]], log_probs: bool,
                             sample: Optional[Dict[str, Any]] = None) -> Tensor:
        logits = net_output[0].float()  # (T, B, V)
        return F.log_softmax(logits, dim=-1) if log_probs else F.softmax(logits, dim=-1)

    def get_targets(self, sample: Dict[str, Any], net_output: Any) -> Tensor:
        return sample["target"].t()  # (T, B), time-first as the outputs

    def reset(self) -> None:
        self.net.reset()


def original_of(model: nn.Module, model_cfg: Any) -> OriginalLM:
    """The reproduction of ``model``'s original code holding ``model``'s weights; a clear error for a family whose
    original is not reproduced here."""
    wrap = next((w for cls, w in WRAPPERS if isinstance(model, cls)), None)
    if wrap is None:
        raise ValueError(f"no reproduction of the original code for {type(model).__name__} (--arch "
                         f"{model_cfg._name}): --original works for transformer_xl_lm and sha_rnn_lm rows; see "
                         f"scripts/originals/__init__.py for the other families")
    net, adaptive_softmax = wrap(model_cfg, model.decoder)
    return OriginalLM(net, adaptive_softmax)
