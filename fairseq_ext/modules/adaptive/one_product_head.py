"""fairseq's ``AdaptiveSoftmax`` (Grave et al. 2017, Sec. 4.1: head over the shortlist and one logit per tail
cluster) whose training forward scores a tied head in one product.

fairseq's ``TiedHeadModule`` (the head of adaptive softmax tied to adaptive input, Baevski & Auli 2019) allocates an
(N, shortlist + n) tensor and copies the word logits (N, shortlist) and the cluster logits (N, n) into it; backward
copies the gradient again (``CopySlices``) and slices it. Here the head is one product with the concatenated weights,
``[W_words ; W_clusters] h`` (N, shortlist + n): the same numbers to rounding, no (N, V_0) copies (at the 267k-word
WikiText-103 vocabulary, B 4 x 512, three 164 MB copies per step). Parameters, ``get_log_prob`` (evaluation and
generation) and everything else are fairseq's, so checkpoints and evaluated log-probabilities are unchanged.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.modules import AdaptiveSoftmax
from fairseq.modules.adaptive_softmax import TiedHeadModule, TiedLinear
from torch import Tensor, nn


def _plain(module: nn.Module) -> bool:
    """No hooks (quant-noise adds a forward pre-hook), so its product may be taken without calling it."""
    return not module._forward_pre_hooks and not module._forward_hooks


class OneProductHeadAdaptiveSoftmax(AdaptiveSoftmax):
    """fairseq's ``AdaptiveSoftmax`` (same constructor, parameters and ``get_log_prob``); ``forward`` computes a
    tied ``TiedHeadModule`` head as one product."""

    def head_logits(self, x: Tensor) -> Tensor:
        """x (N, C) -> head logits (N, shortlist + n_clusters): [words | clusters], as ``self.head(x)``."""
        head = self.head
        if (isinstance(head, TiedHeadModule) and isinstance(head.word_proj, TiedLinear) and not
                head.word_proj.transpose and isinstance(head.class_proj, nn.Linear) and head.class_proj.bias is None
                and _plain(head.word_proj) and _plain(head.class_proj)):
            weight = torch.cat([head.word_proj.weight, head.class_proj.weight], dim=0)  # (shortlist + n, C)
            return F.linear(x, weight)  # (N, shortlist + n)
        return head(x)

    def forward(self, input: Tensor, target: Tensor) -> Tuple[List[Optional[Tensor]], List[Optional[Tensor]]]:
        """input (B, T, C), target (B, T) -> ([head logits (N, shortlist + n), tail_i logits (N_i, V_i) or None],
        [head targets (N,), tail_i targets (N_i,) or None]): fairseq's ``AdaptiveSoftmax.forward``."""
        x = self.dropout_module(input.contiguous().view(-1, input.size(-1)))  # (N, C)
        new_target, target_idxs = self.adapt_target(target)
        output: List[Optional[Tensor]] = [self.head_logits(x)]
        for i, rows in enumerate(target_idxs):
            output.append(self.tail[i](x.index_select(0, rows)) if rows is not None else None)  # (N_i, V_i)
        return output, new_target
