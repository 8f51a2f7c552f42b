"""The adaptive-span original for the benches: fairseq's own port of facebookresearch/adaptive-span,
``fairseq.examples.adaptive_span`` (MIT licensed, shipped inside fairseq 0.12.3.1; spec §6, "the baseline this
project must beat"), holding the weights of an ``adaptive_span_lm`` row, so that ``scripts/bench.py --original``
times the original algorithm beside ours. The original repository itself is CC-BY-NC and is not reproduced here.

What the port keeps of the original, because it decides the speed (spec §1.3-§1.5): per layer and head, the content
logits over the whole M x (C + M) block (``matmul`` over [cache ; segment]), the pad-and-view ``_unskew`` to the
M x L_pos window and ``_skew`` back to M x (L_pos + M + 1) for the value product, position logits q·key_pe, softmax
in fp32, the span mask as a product, span trimming to multiples of 64 and the adaptive cache (L - trim + 64), four
bias-free projections with the head split as (B·K, S, d) copies, post-LN layers, the untied output layer.

The segment loop (``ExampleLoop.forward``) is the example's ``TransformerSeq.forward`` written out up to the logits:
the example ends with its own ``log_softmax``, and the bench's loss for it (fairseq's ``cross_entropy``) applies
one; every layer call is the example's module. What makes the port *cheaper* than the original: no renormalisation after the
span mask (spec §6.2; ours renormalises, ``--no-span-renorm`` drops it and gives the port's logits, tested), and its
span-loss term is not added to the bench's loss (``lm_loss`` collects ours). The renormalisation also changes the
gradient of the spans, so from the same start ours and the port learn different spans within a few steps (at
``adaptive_span_enwik8_small``, B 8 × 256, after 2 steps: computed windows of 128-256 keys against 64-128) and
compute different amounts; a row with ``--no-span-renorm`` computes the port's function, spans included. Not
supported, with a clear error: persistent memory, adaptive input/softmax, ``--fixed-span`` and
``--no-adapt-span-cache`` (the port has none of them).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn


def _check_supported(model_cfg) -> None:
    unsupported = [flag for flag, on in (("--pers-mem-size", model_cfg.pers_mem_size > 0),
                                         ("--adaptive-softmax-cutoff", bool(model_cfg.adaptive_softmax_cutoff)),
                                         ("--fixed-span", model_cfg.fixed_span),
                                         ("--no-adapt-span-cache", model_cfg.no_adapt_span_cache)) if on]
    if unsupported:
        raise ValueError(f"fairseq's examples/adaptive_span (the adaptive-span original of --original) has no "
                         f"{', '.join(unsupported)}: time this row without --original, or drop "
                         f"{'that flag' if len(unsupported) == 1 else 'those flags'}")


def build_example(model_cfg, decoder: nn.Module) -> nn.Module:
    """fairseq's ``TransformerSeq`` with ``decoder``'s (an ``adaptive_span_lm`` decoder's) weights and spans."""
    from fairseq.examples.adaptive_span.adaptive_span_model import TransformerSeq

    _check_supported(model_cfg)
    att0 = decoder.layers[0].self_attn
    seq = TransformerSeq(vocab_size=decoder.output_projection.out_features, d_model=decoder.embed_dim,
                         n_head=att0.num_heads, n_layer=len(decoder.layers), attn_span=decoder.max_span,
                         emb_dropout=model_cfg.emb_dropout, aux_loss_scaler=0.0,
                         adapt_span_layer=model_cfg.adapt_span_layer, d_inner=decoder.layers[0].fc1.out_features,
                         dropout=model_cfg.dropout, adapt_span_ramp=att0.span.ramp, adapt_span_init=0.0)
    seq.to(decoder.embed_tokens.weight)
    with torch.no_grad():
        seq.in_emb.weight.copy_(decoder.embed_tokens.weight)
        seq.out_emb.weight.copy_(decoder.output_projection.weight)
        seq.out_emb.bias.copy_(decoder.output_projection.bias)
        seq.key_pe.copy_(decoder.key_pe[None])  # (1, d, L), shared by every layer and head
        for theirs, ours in zip(seq.layers, decoder.layers):
            for name, mine in (("query", "q"), ("key", "k"), ("val", "v"), ("out", "out")):
                getattr(theirs.attn, "proj_" + name).weight.copy_(getattr(ours.self_attn, mine + "_proj").weight)
            mask = theirs.attn.attn.adaptive_span._mask
            mask.current_val.copy_(ours.self_attn.span.z.reshape(mask.current_val.shape))  # (K, 1, 1) or (1,)
            for a, b in ((theirs.norm1, ours.self_attn_layer_norm), (theirs.norm2, ours.final_layer_norm),
                         (theirs.ff.fc1, ours.fc1), (theirs.ff.fc2, ours.fc2)):
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
    return seq


class ExampleLoop(nn.Module):
    """The example's ``TransformerSeq`` over consecutive segments, carrying its per-layer caches of layer inputs
    (zeros at a stream start, as the example's ``init_hid_cache``); batch-first logits."""

    batch_first = True

    def __init__(self, seq: nn.Module) -> None:
        super().__init__()
        self.seq = seq
        self.caches: Optional[List[Tensor]] = None

    def reset(self) -> None:
        self.caches = None

    def forward(self, tokens: Tensor) -> Tensor:
        seq, block = self.seq, tokens.size(1)
        h = seq.in_emb(tokens)  # (B, M, H)
        caches = self.caches
        if caches is None or caches[0].size(0) != tokens.size(0):
            caches = [h.new_zeros(tokens.size(0), layer.get_cache_size(), h.size(-1)) for layer in seq.layers]
        if seq.emb_dropout is not None:
            h = seq.emb_dropout(h)
        next_caches = []
        for cache, layer in zip(caches, seq.layers):
            size = layer.get_cache_size()  # the next cache is cut before the layer runs, as in the example
            kept = torch.cat([cache[:, -size + block:], h], dim=1) if size > block else h[:, -size:]  # (B, C', H)
            next_caches.append(kept.detach())
            h = layer(h, cache, seq.key_pe)  # (B, M, H)
        self.caches = next_caches
        if seq.emb_dropout is not None:
            h = seq.emb_dropout(h)
        return seq.out_emb(h)  # (B, M, V)


def wrap_original(model_cfg, decoder: nn.Module) -> Tuple[nn.Module, None]:
    """(the example's model with ``decoder``'s weights, no adaptive softmax) for ``originals.OriginalLM``."""
    return ExampleLoop(build_example(model_cfg, decoder)), None
