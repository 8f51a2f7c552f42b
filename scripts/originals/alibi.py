"""A bench-only reproduction of the original ALiBi fork (ofirpress/attention_with_linear_biases @ 3b7c2ec), written
here from the spec (specs/alibi.md Sec. 1.3) so that the benches time the fork's algorithm beside ``alibi_lm``.

The fork is stock fairseq: ``TransformerDecoder`` without position embeddings, whose ``buffered_future_mask`` returns
a materialised 3-D float mask (B*H, T, T) = causal -inf + m_h * j (key-index form, row b*H + h), built from a
``(max_tokens // tokens_per_sample) * H`` bias buffer, cached, and passed to every layer as ``self_attn_mask``
through stock ``MultiheadAttention``. ``fork_of`` builds that decoder over the fairseq-built ``alibi_lm``'s own
embedding and loads its weights (the parameter names are stock fairseq's), so only the attention path differs; a
test checks equal logits.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from fairseq import utils
from fairseq.models.transformer import TransformerDecoder
from fairseq.models.transformer_lm import TransformerLanguageModel
from omegaconf import open_dict
from torch import Tensor, nn

from fairseq_ext.ops.alibi import alibi_slopes


def fork_alibi_tile(slopes: Tensor, maxpos: int, batch: int) -> Tensor:
    """The fork's bias buffer: (batch*H, 1, maxpos) with row b*H + h = m_h * j, j = 0..maxpos-1 (key-index form)."""
    heads = slopes.numel()
    alibi = slopes.unsqueeze(1).unsqueeze(1) * torch.arange(maxpos).unsqueeze(0).unsqueeze(0).expand(heads, -1, -1)
    alibi = alibi.view(heads, 1, maxpos)  # (H, 1, maxpos)
    return alibi.repeat(batch, 1, 1)  # tiles the (H, 1, maxpos) block: index b*H + h


class ForkAlibiDecoder(TransformerDecoder):
    """Stock ``TransformerDecoder`` with the fork's ``buffered_future_mask`` (commit 3b7c2ec, transformer.py).

    The bias buffer is a plain attribute sized from ``max_tokens // tokens_per_sample`` at construction (not a
    registered buffer); the mask is (B_max*H, T_max, T_max) with T_max = ``tokens_per_sample``, built once, cached,
    and sliced to [:B*H, :T, :T]. Stock fairseq calls this per layer on x (T, B, C); the fork called it once before
    the layer loop on x (B, T, C). Both return the same cached tensor, so the cost is identical. ``.to(tensor)``
    follows x's dtype (fp16 when the whole model is cast to half, the paper's ``--fp16`` runs).
    """

    def __init__(self, args: Any, dictionary: Any, embed_tokens: nn.Module, maxpos: int, max_batch: int) -> None:
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn=True)
        self.maxpos = maxpos
        self.fork_heads = args.decoder_attention_heads
        self.alibi = fork_alibi_tile(alibi_slopes(self.fork_heads), maxpos, max_batch)  # (B_max*H, 1, T_max)

    def buffered_future_mask(self, tensor: Tensor) -> Tensor:
        dim, bsz = tensor.size(0), tensor.size(1)  # x is (T, B, C) at fairseq 0.12's call site
        if (self._future_mask.size(0) == 0 or not self._future_mask.device == tensor.device
                or self._future_mask.size(1) < self.maxpos):
            causal = torch.triu(utils.fill_with_neg_inf(torch.zeros([self.maxpos, self.maxpos])), 1)
            self._future_mask = causal.unsqueeze(0) + self.alibi  # (B_max*H, T_max, T_max)
        self._future_mask = self._future_mask.to(tensor)
        return self._future_mask[: bsz * self.fork_heads, :dim, :dim]


def fork_of(model: nn.Module, cfg: Any, task: Any) -> TransformerLanguageModel:
    """The fork's model holding ``model``'s weights (an ``alibi_lm`` built from ``cfg``): its bias buffer sized as
    the fork sizes it, from ``--max-tokens`` (or B x T) over ``--tokens-per-sample``."""
    maxpos = int(cfg.task.tokens_per_sample)
    max_tokens = cfg.dataset.max_tokens or int(cfg.dataset.batch_size) * maxpos
    args = copy.deepcopy(cfg.model)
    with open_dict(args):
        args.no_token_positional_embeddings = True  # the fork never adds them (alibi_lm sets it at build time)
    decoder = ForkAlibiDecoder(args, task.target_dictionary, model.decoder.embed_tokens, maxpos,
                               max(1, max_tokens // maxpos))
    fork = TransformerLanguageModel(decoder)
    fork.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")},
                         strict=True)
    return fork
