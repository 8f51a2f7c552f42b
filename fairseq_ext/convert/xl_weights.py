"""Transformer-XL-style weights (the original code, NVIDIA's, lmtool-fwms): the adaptive embedding and projected
adaptive softmax in fairseq's vocabulary order, and a layer's layer norms and feed-forward."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from fairseq_ext.modules.dead_rows import dead_rows_state

from .errors import ConversionError
from .output import PREFIX
from .state_reader import StateReader
from .vocab_mapping import VocabMapping, gather_rows

@dataclass(kw_only=True)
class MemTransformerShape:
    """The settings every ``MemTransformerLM`` (the original Transformer-XL code, NVIDIA's, lmtool-fwms) stores under
    these original names: sizes, the adaptive clusters, training lengths, normalisation and dropout."""

    n_token: int
    n_layer: int
    n_head: int
    d_model: int
    d_head: int
    d_inner: int
    d_embed: Optional[int] = None  # < 0 or None: d_model
    div_val: int = 1
    cutoffs: List[int] = field(default_factory=list)
    tie_weight: bool = True
    tgt_len: int = 0
    mem_len: int = 0
    clamp_len: int = -1
    pre_lnorm: bool = False
    sample_softmax: int = -1
    dropout: float = 0.0
    dropatt: float = 0.0

    def __post_init__(self) -> None:
        if self.d_embed is None or self.d_embed < 0:
            self.d_embed = self.d_model
        self.cutoffs = [int(c) for c in self.cutoffs]


TIE_PROJ_MODES = {"none": lambda n: [False] * n, "tails": lambda n: [False] + [True] * (n - 1),
                  "all": lambda n: [True] * n}  # tie_projs modes -> one flag per cluster


def check_source_cutoffs(cutoffs: Sequence[int], n_token: int) -> None:
    """The original's adaptive-softmax cutoffs increase and stay below its vocabulary size."""
    if cutoffs and (list(cutoffs) != sorted(set(cutoffs)) or cutoffs[-1] >= n_token):
        raise ConversionError(f"cutoffs {cutoffs} must increase and stay below n_token {n_token}")


def convert_adaptive_weights(r: StateReader, mapping: VocabMapping, *, n_token: int, cutoffs: Sequence[int],
                             d_model: int, d_embed: int, div_val: int, tie_weight: bool, source_tie_projs: Sequence[bool],
                             tie_projs_mode: str, dead_bias: float, layout: str = "original",
                             bias_per_cluster: bool = False) -> Dict[str, Tensor]:
    """Transformer-XL's ``AdaptiveEmbedding`` (``word_emb.*``) and ``ProjectedAdaptiveLogSoftmax`` (``crit.*``; NVIDIA
    names with ``layout="nvidia"``) -> ``decoder.embed_tokens.*`` / ``decoder.adaptive_softmax.*`` in fairseq order.
    ``crit.cluster_{weight,bias}`` keep their rows (the model reads them in reverse, as the original does); the output
    biases are concatenated in vocabulary order; tied output matrices / projections (``tie_weight``,
    ``tie_projs_mode``) are the very tensors of ``embed_tokens`` (one tensor, two keys); a projection tied in the
    source (``source_tie_projs``) but not in the target mode is copied. ``bias_per_cluster``: the target keeps one
    bias tensor per cluster (``adaptive_softmax.biases.{i}``) instead of one (``adaptive_softmax.bias``)."""
    out: Dict[str, Tensor] = {}
    n_clusters = len(list(cutoffs))
    orig_ends = [0] + list(cutoffs) + [n_token]
    fs_ends = [0] + mapping.cutoffs + [len(mapping.symbols)]
    tables = [(0, 0, len(mapping.symbols), 0, n_token, d_embed)] if div_val == 1 else [
        (i, fs_ends[i], fs_ends[i + 1], orig_ends[i], orig_ends[i + 1], d_embed // div_val ** i)
        for i in range(n_clusters + 1)]
    has_projs = div_val > 1 or d_embed != d_model
    # input embeddings and projections
    emb_keys: Dict[int, str] = {}
    proj_keys: Dict[int, str] = {}
    for i, fs_lo, fs_hi, orig_lo, orig_hi, dim in tables:
        table = r.get(f"word_emb.emb_layers.{i}.weight", (orig_hi - orig_lo, dim))
        emb_keys[i] = f"{PREFIX}embed_tokens.emb_layers.{i}.weight"
        out[emb_keys[i]] = gather_rows(table, mapping, fs_lo, fs_hi, orig_lo, 0.0)
        if has_projs:
            proj_keys[i] = f"{PREFIX}embed_tokens.emb_projs.{i}"
            out[proj_keys[i]] = r.get(f"word_emb.emb_projs.{i}", (d_model, dim))
    # softmax: clusters, biases, word matrices
    if n_clusters:
        out[PREFIX + "adaptive_softmax.cluster_weight"] = r.get("crit.cluster_weight", (n_clusters, d_embed))
        out[PREFIX + "adaptive_softmax.cluster_bias"] = r.get("crit.cluster_bias", (n_clusters,))
    biases = []
    for i, fs_lo, fs_hi, orig_lo, orig_hi, dim in tables:
        key = f"crit.out_layers.{i}.bias" if layout == "original" else f"crit.out_layers_biases.{i}"
        biases.append(r.get(key, (orig_hi - orig_lo,)))
    full_bias = torch.cat(biases)  # (V_orig,) in original vocabulary order
    bias = gather_rows(full_bias, mapping, 0, len(mapping.symbols), 0, 0.0)  # (V,) in fairseq order
    if bias_per_cluster:
        out.update({f"{PREFIX}adaptive_softmax.biases.{i}": part.clone()
                    for i, part in enumerate(bias.split([hi - lo for lo, hi in zip(fs_ends, fs_ends[1:])]))})
    else:
        out[PREFIX + "adaptive_softmax.bias"] = bias
    out.update(dead_rows_state(PREFIX + "adaptive_softmax.dead_rows.", len(mapping.symbols), mapping.dead, dead_bias))
    for i, fs_lo, fs_hi, orig_lo, orig_hi, dim in tables:
        dst = f"{PREFIX}adaptive_softmax.weights.{i}"
        if layout == "original":
            key = f"crit.out_layers.{i}.weight"
        else:
            key = f"word_emb.emb_layers.{i}.weight" if tie_weight else f"crit.out_layers_weights.{i}"
        weight = r.get(key, (orig_hi - orig_lo, dim))
        out[dst] = out[emb_keys[i]] if tie_weight else gather_rows(weight, mapping, fs_lo, fs_hi, orig_lo, 0.0)
    # softmax projections (one per cluster when present)
    if has_projs:
        source_flags = list(source_tie_projs)
        target_flags = TIE_PROJ_MODES[tie_projs_mode](n_clusters + 1)
        for i in range(n_clusters + 1):
            j = 0 if div_val == 1 else i  # the embedding projection a tied softmax projection is
            dim = tables[j][5]
            dst = f"{PREFIX}adaptive_softmax.out_projs.{i}"
            if target_flags[i]:
                out[dst] = out[proj_keys[j]]
                if layout == "original":
                    r.get(f"crit.out_projs.{i}", (d_model, dim))  # the same tensor, stored a second time
                continue
            if source_flags[i]:  # tied in the source, copied here
                out[dst] = out[proj_keys[j]].clone()
                if layout == "original":
                    r.get(f"crit.out_projs.{i}", (d_model, dim))
            else:
                out[dst] = r.get(f"crit.out_projs.{i}", (d_model, dim))
    return out


def convert_layer_norms_and_ffn(r: StateReader, src_p: str, dst_p: str, d_model: int, d_inner: int) -> Dict[str, Tensor]:
    """One Transformer-XL-style layer's ``dec_attn.layer_norm`` and ``pos_ff.{CoreNet.0, CoreNet.3, layer_norm}``
    (prefix ``src_p``) -> ``self_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm`` (prefix ``dst_p``)."""
    out: Dict[str, Tensor] = {}
    d = d_model
    for src_name, dst_name, shapes in (
            ("dec_attn.layer_norm", "self_attn_layer_norm", ((d,), (d,))),
            ("pos_ff.CoreNet.0", "fc1", ((d_inner, d), (d_inner,))),
            ("pos_ff.CoreNet.3", "fc2", ((d, d_inner), (d,))),
            ("pos_ff.layer_norm", "final_layer_norm", ((d,), (d,)))):
        out[dst_p + dst_name + ".weight"] = r.get(src_p + src_name + ".weight", shapes[0])
        out[dst_p + dst_name + ".bias"] = r.get(src_p + src_name + ".bias", shapes[1])
    return out
