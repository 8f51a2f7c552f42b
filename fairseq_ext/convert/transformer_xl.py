"""Convert Transformer-XL checkpoints of the original PyTorch code and of NVIDIA's to ``transformer_xl_lm``.

Sources (shared/specs/transformer_xl.md §7):

* original ``kimiyoung/transformer-xl`` ``model.pt``: the whole ``MemTransformerLM`` pickled by ``torch.save(model)``.
  It is read through an unpickling shim that maps the original classes (``mem_transformer.*``,
  ``proj_adaptive_softmax.*``, ``vocabulary.Vocab``, ...) onto stubs, so the original code need not be importable;
  the configuration comes from the model's attributes and ties from tensor identity. Its vocabulary is not in the
  file: pass ``--vocab`` (the original ``cache.pt`` corpus, or a text file with one symbol per line in index order).
* NVIDIA DeepLearningExamples ``checkpoint_{best,last}.pt``: a dict with ``model_state``, ``model_config`` (the
  ``MemTransformerLM`` kwargs) and ``vocab`` (a pickled ``Vocab``).

Both hold pickled Python objects, so they are read (with the shim) only with ``trust_pickle`` / ``--trust-pickle``.

Weights (original name -> ``decoder.``...): ``r_w_bias``/``r_r_bias`` -> ``content_bias``/``position_bias``;
``layers.{l}.dec_attn.qkv_net`` rows split in thirds -> ``self_attn.{q,k,v}_proj``; ``r_net``/``o_net`` ->
``r_proj``/``out_proj``; ``dec_attn.layer_norm`` -> ``self_attn_layer_norm``; ``pos_ff.CoreNet.0/3`` -> ``fc1/fc2``;
``pos_ff.layer_norm`` -> ``final_layer_norm``; ``word_emb.*`` -> ``embed_tokens.*``; ``crit.cluster_{weight,bias}``
unchanged (same row meaning); output biases concatenated in vocabulary order -> ``adaptive_softmax.bias``; output
matrices and projections -> ``adaptive_softmax.weights.{i}`` / ``out_projs.{i}``, where tied ones are the very
tensors of ``embed_tokens`` (one tensor, two keys). ``pos_emb.inv_freq`` is dropped (recomputed).

Vocabulary: a fairseq dictionary always starts ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3. The output
``dict.txt`` lists the original symbols in original order minus those mapped onto fairseq specials (``<eos>`` ->
``</s>``, ``<unk>`` -> ``<unk>``; ``--map-symbol`` adds more). Specials the original lacks are *dead* rows: zero
embedding, zero output row and output bias ``dead_bias`` (-40: probability below e^-40, far under fp32 resolution of the real tokens, finite in fp16; a spurious ``</s>`` target costs only ~40 nats). Every
mapped symbol must lie in the head cluster; the clusters then keep their members and order, and each cutoff moves
by the number of dead rows. Binarise text with ``fairseq-preprocess --only-source --srcdict <out>/dict.txt``.
"""
import argparse
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .common import (DEAD_BIAS, DEFAULT_SYMBOL_MAP, PREFIX, PREPROCESS_HINT,  # noqa: F401 (re-exports)
                     Conversion, ConversionError, PickledStub, ShimUnpickler, StateReader, VocabMapping,
                     add_output_arguments, build_vocab_mapping, converter_parser, fairseq_cfg, fairseq_checkpoint,
                     fairseq_dictionary, finish_conversion, gather_rows, load_pickled, report_conversion,
                     verify_conversion, verify_strict_load, write_dictionary)

logger = logging.getLogger(__name__)

DROPPED_KEYS = ("pos_emb.inv_freq",)  # recomputed by the model
TIE_PROJ_MODES = {"none": lambda n: [False] * n, "tails": lambda n: [False] + [True] * (n - 1),
                  "all": lambda n: [True] * n}


# ======================================================================================================================
# Reading the sources
# ======================================================================================================================
@dataclass
class OriginalConfig:
    """The ``MemTransformerLM`` settings the conversion needs (original names; NVIDIA's ``model_config`` keys)."""

    n_token: int
    n_layer: int
    n_head: int
    d_model: int
    d_head: int
    d_inner: int
    d_embed: Optional[int] = None
    div_val: int = 1
    cutoffs: List[int] = field(default_factory=list)
    tie_weight: bool = True
    tie_projs: List[bool] = field(default_factory=lambda: [False])
    pre_lnorm: bool = False
    tgt_len: int = 0
    ext_len: int = 0
    mem_len: int = 0
    same_length: bool = False
    attn_type: int = 0
    clamp_len: int = -1
    sample_softmax: int = -1
    dropout: float = 0.0
    dropatt: float = 0.0

    def __post_init__(self) -> None:
        if self.d_embed is None or self.d_embed < 0:
            self.d_embed = self.d_model
        self.cutoffs = [int(c) for c in self.cutoffs]
        self.tie_projs = [bool(t) for t in self.tie_projs]

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> "OriginalConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known - {"dtype", "adapt_inp"})
        if unknown:
            logger.warning("ignoring unknown model_config keys: %s", ", ".join(unknown))
        missing = [k for k in ("n_token", "n_layer", "n_head", "d_model", "d_head", "d_inner") if k not in kwargs]
        if missing:
            raise ConversionError(f"model_config lacks {missing}; is this a Transformer-XL MemTransformerLM config?")
        values = {k: v for k, v in kwargs.items() if k in known and v is not None}
        return cls(**values)

    @property
    def tie_projs_per_cluster(self) -> List[bool]:
        """tie_projs padded with False to one flag per cluster (the original enumerates a possibly shorter list)."""
        n = len(self.cutoffs) + 1
        return (list(self.tie_projs) + [False] * n)[:n]


@dataclass
class SourceCheckpoint:
    """A Transformer-XL checkpoint in original key names, with its configuration and vocabulary."""

    layout: str  # "original" (kimiyoung) | "nvidia"
    config: OriginalConfig
    state: Dict[str, Tensor]
    symbols: Optional[List[str]] = None
    init_std: Optional[float] = None
    proj_init_std: Optional[float] = None
    description: str = ""


def module_state(module: nn.Module, prefix: str = "") -> Dict[str, Tensor]:
    """state_dict read straight from ``_parameters`` / ``_buffers`` / ``_modules`` (robust to stubs and to modules
    pickled by old torch versions); None entries (the original's empty ParameterList slots) are skipped."""
    out: Dict[str, Tensor] = {}
    state = module.__dict__
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None:
                continue
            if not torch.is_tensor(value):
                raise ConversionError(f"{prefix}{name} is a {type(value).__name__}, not a tensor: the pickle rebuilt "
                                      f"it with a function the shim does not allow ({sorted(ShimUnpickler.stubbed)})")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state(child, f"{prefix}{name}."))
    return out


def _attr(obj: Any, name: str, default: Any = None) -> Any:
    value = obj.__dict__.get(name, default) if hasattr(obj, "__dict__") else default
    return default if value is None else value


def _child(module: Any, name: str) -> Any:
    return (module.__dict__.get("_modules") or {}).get(name)


def _class_name(obj: Any) -> str:
    return getattr(type(obj), "_stub_name", type(obj).__name__).rsplit(".", 1)[-1]


def _aliases(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    """Same storage, same view (tied tensors survive torch.save/torch.load this way)."""
    return (a is not None and b is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape
            and a.stride() == b.stride() and a.dtype == b.dtype)


def detect_original_ties(state: Mapping[str, Tensor], cfg: OriginalConfig) -> Tuple[bool, List[bool]]:
    """(tie_weight, tie_projs per cluster) of an original-layout state dict, from tensor identity."""
    n = len(cfg.cutoffs) + 1
    n_out = 1 if cfg.div_val == 1 else n
    tied = [_aliases(state.get(f"crit.out_layers.{i}.weight"), state.get(f"word_emb.emb_layers.{i}.weight"))
            for i in range(n_out)]
    if any(tied) and not all(tied):
        raise ConversionError(f"only some output matrices are tied to the embeddings ({tied}); transformer_xl_lm ties "
                              f"all or none (the original tie_weight)")
    projs = []
    for i in range(n):
        j = 0 if cfg.div_val == 1 else i
        projs.append(_aliases(state.get(f"crit.out_projs.{i}"), state.get(f"word_emb.emb_projs.{j}")))
    return all(tied), projs


def read_original_model(root: Any) -> SourceCheckpoint:
    """The original ``model.pt`` (a pickled MemTransformerLM, loaded with the shim) -> SourceCheckpoint."""
    if "DataParallel" in _class_name(root) and _child(root, "module") is not None:
        root = _child(root, "module")
    if _class_name(root) != "MemTransformerLM":
        raise ConversionError(f"expected a pickled MemTransformerLM (the original train.py's model.pt), got "
                              f"{_class_name(root)}")
    state = module_state(root)
    layers = _child(root, "layers")
    layer0 = _child(layers, "0") if layers is not None else None
    attn0 = _child(layer0, "dec_attn") if layer0 is not None else None
    crit = _child(root, "crit")
    word_emb = _child(root, "word_emb")
    attn_type = int(_attr(root, "attn_type", 0))
    sample_softmax = int(_attr(root, "sample_softmax", -1))
    if attn_type != 0:
        _reject_attn_type(attn_type)
    if attn0 is None or "r_w_bias" not in state:
        raise ConversionError("the pickled MemTransformerLM has no layers.0.dec_attn / r_w_bias: not a relative-"
                              "attention (attn_type 0) Transformer-XL")
    if crit is None:
        raise ConversionError("the model has no adaptive softmax 'crit' (sampled softmax, sample_softmax > 0?): "
                              "transformer_xl_lm needs the full / adaptive softmax weights")
    n_token = int(_attr(root, "n_token"))
    crit_cutoffs = list(_attr(crit, "cutoffs", [n_token]))
    if not crit_cutoffs or crit_cutoffs[-1] != n_token:
        raise ConversionError(f"crit.cutoffs {crit_cutoffs} should end with n_token {n_token}")
    drop = _child(root, "drop")
    dropatt = _child(attn0, "dropatt")
    cfg = OriginalConfig(
        n_token=n_token, n_layer=int(_attr(root, "n_layer", len(_attr(layers, "_modules", {})))),
        n_head=int(_attr(root, "n_head")), d_model=int(_attr(root, "d_model")), d_head=int(_attr(root, "d_head")),
        d_inner=int(state["layers.0.pos_ff.CoreNet.0.weight"].shape[0]),
        d_embed=int(_attr(root, "d_embed", _attr(word_emb, "d_embed", _attr(root, "d_model")))),
        div_val=int(_attr(crit, "div_val", _attr(word_emb, "div_val", 1))), cutoffs=crit_cutoffs[:-1],
        pre_lnorm=bool(_attr(attn0, "pre_lnorm", False)), tgt_len=int(_attr(root, "tgt_len", 0)),
        ext_len=int(_attr(root, "ext_len", 0)), mem_len=int(_attr(root, "mem_len", 0)),
        same_length=bool(_attr(root, "same_length", False)), attn_type=attn_type,
        clamp_len=int(_attr(root, "clamp_len", -1)), sample_softmax=sample_softmax,
        dropout=float(_attr(drop, "p", 0.0)) if drop is not None else 0.0,
        dropatt=float(_attr(dropatt, "p", 0.0)) if dropatt is not None else 0.0)
    cfg.tie_weight, cfg.tie_projs = detect_original_ties(state, cfg)
    return SourceCheckpoint("original", cfg, state, description="original MemTransformerLM (pickled model.pt)")


def read_nvidia_checkpoint(ckpt: Mapping[str, Any]) -> SourceCheckpoint:
    """NVIDIA ``checkpoint_*.pt`` (dict with model_state, model_config, vocab, args, ...) -> SourceCheckpoint."""
    config = ckpt["model_config"]
    if not isinstance(config, Mapping):
        raise ConversionError(f"model_config is a {type(config).__name__}, expected the MemTransformerLM kwargs dict")
    cfg = OriginalConfig.from_kwargs(config)
    state = dict(ckpt["model_state"])
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP / DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    args = ckpt.get("args")
    return SourceCheckpoint("nvidia", cfg, state, symbols=vocab_symbols(ckpt.get("vocab"), "the checkpoint's vocab"),
                            init_std=_attr(args, "init_std"), proj_init_std=_attr(args, "proj_init_std"),
                            description="NVIDIA DeepLearningExamples checkpoint")


def read_source(obj: Any) -> SourceCheckpoint:
    """Detect the format of a loaded checkpoint object."""
    if isinstance(obj, Mapping) and "model_state" in obj and "model_config" in obj:
        return read_nvidia_checkpoint(obj)
    if isinstance(obj, nn.Module):
        return read_original_model(obj)
    if isinstance(obj, Mapping) and any(str(k).startswith("word_emb.") for k in obj):
        raise ConversionError("this file is a bare MemTransformerLM state dict without its configuration; convert "
                              "the pickled model.pt (original train.py) or the NVIDIA checkpoint_*.pt instead, or call "
                              "convert_transformer_xl() with an OriginalConfig from Python")
    if isinstance(obj, Mapping) and "cfg" in obj and "model" in obj:
        raise ConversionError("this is already a fairseq checkpoint (it has 'cfg' and 'model')")
    raise ConversionError(f"unrecognised checkpoint ({type(obj).__name__}"
                          f"{' with keys ' + str(sorted(map(str, obj))[:10]) if isinstance(obj, Mapping) else ''}); "
                          f"expected the original model.pt or an NVIDIA checkpoint_*.pt")


def vocab_symbols(vocab: Any, what: str) -> Optional[List[str]]:
    """Symbols in index order from a (stubbed) Vocab / Corpus object, a list, or None."""
    if vocab is None:
        return None
    if isinstance(vocab, (list, tuple)):
        return [str(s) for s in vocab]
    inner = _attr(vocab, "vocab")  # a pickled Corpus (the original cache.pt)
    if inner is not None and _attr(vocab, "idx2sym") is None:
        return vocab_symbols(inner, what)
    idx2sym = _attr(vocab, "idx2sym")
    if idx2sym is None:
        raise ConversionError(f"{what} ({_class_name(vocab)}) has no idx2sym list (a BPE OpenAIVocab?); pass the "
                              f"symbols in index order with --vocab <file with one symbol per line>")
    return [str(s) for s in idx2sym]


def read_vocab_file(path: str, trust_pickle: bool = False) -> List[str]:
    """``--vocab``: the original ``cache.pt`` (pickled Corpus) or a text file, one symbol per line in index order
    (the first whitespace-separated field of each line, as the original ``Vocab._build_from_file`` reads it)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch zip or legacy pickle
        return vocab_symbols(load_pickled(path, trust_pickle, "vocabulary"), path)
    symbols = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                raise ConversionError(f"{path}:{number} is empty; the vocabulary file needs one symbol per line")
            symbols.append(fields[0])
    return symbols


# ======================================================================================================================
# Conversion
# ======================================================================================================================
def _reject_attn_type(attn_type: Any) -> None:
    raise ConversionError(f"attn_type {attn_type} is not supported: transformer_xl_lm implements the Transformer-XL "
                          f"relative attention (attn_type 0) only (1 = Shaw, 2 = vanilla absolute, 3 = Al-Rfou)")


def validate_source(cfg: OriginalConfig) -> None:
    if cfg.attn_type != 0:
        _reject_attn_type(cfg.attn_type)
    if cfg.sample_softmax > 0:
        raise ConversionError(f"sample_softmax {cfg.sample_softmax} > 0: a sampled-softmax model keeps its output "
                              f"layer in 'out_layer', not the adaptive softmax; transformer_xl_lm cannot load it")
    if cfg.ext_len > 0:
        raise ConversionError(f"ext_len {cfg.ext_len} > 0 is not supported (transformer_xl_lm has no extended "
                              f"context; every published configuration uses ext_len 0)")
    if cfg.cutoffs and (cfg.cutoffs != sorted(set(cfg.cutoffs)) or cfg.cutoffs[-1] >= cfg.n_token):
        raise ConversionError(f"cutoffs {cfg.cutoffs} must increase and stay below n_token {cfg.n_token}")


def choose_tie_projs(source_flags: Sequence[bool], tie_weight: bool) -> str:
    """transformer_xl_lm's tie_projs mode for the source's per-cluster flags; irregular patterns (or tied
    projections without tied weights) become "none" with the tied projections copied."""
    n = len(source_flags)
    if tie_weight:
        for mode in ("none", "tails", "all"):
            if TIE_PROJ_MODES[mode](n) == list(source_flags):
                return mode
    if any(source_flags):
        logger.warning("tie_projs %s%s is not a transformer_xl_lm pattern (none | tails | all with tied weights): "
                       "the tied projections are copied, so outputs are identical but fine-tuning updates them "
                       "separately", list(source_flags), "" if tie_weight else " without tie_weight")
    return "none"


def convert_weights(src: SourceCheckpoint, mapping: VocabMapping, tie_projs_mode: str, dead_bias: float,
                    dtype: Optional[torch.dtype] = torch.float32) -> Dict[str, Tensor]:
    """Original-name weights -> transformer_xl_lm state dict (keys ``decoder.*``), vocabulary rows permuted."""
    cfg, layout = src.config, src.layout
    r = StateReader(src.state, dtype, DROPPED_KEYS)
    d, de, hd = cfg.d_model, cfg.d_embed, cfg.n_head * cfg.d_head
    out: Dict[str, Tensor] = {}
    out[PREFIX + "content_bias"] = r.get("r_w_bias", (cfg.n_head, cfg.d_head))
    out[PREFIX + "position_bias"] = r.get("r_r_bias", (cfg.n_head, cfg.d_head))
    for layer in range(cfg.n_layer):
        src_p, dst_p = f"layers.{layer}.", f"{PREFIX}layers.{layer}."
        qkv = r.get(src_p + "dec_attn.qkv_net.weight", (3 * hd, d))
        for name, part in zip("qkv", torch.chunk(qkv, 3, dim=0)):  # the original chunks the output in thirds
            out[dst_p + f"self_attn.{name}_proj.weight"] = part.clone()
        out[dst_p + "self_attn.r_proj.weight"] = r.get(src_p + "dec_attn.r_net.weight", (hd, d))
        out[dst_p + "self_attn.out_proj.weight"] = r.get(src_p + "dec_attn.o_net.weight", (d, hd))
        for src_name, dst_name, shapes in (
                ("dec_attn.layer_norm", "self_attn_layer_norm", ((d,), (d,))),
                ("pos_ff.CoreNet.0", "fc1", ((cfg.d_inner, d), (cfg.d_inner,))),
                ("pos_ff.CoreNet.3", "fc2", ((d, cfg.d_inner), (d,))),
                ("pos_ff.layer_norm", "final_layer_norm", ((d,), (d,)))):
            out[dst_p + dst_name + ".weight"] = r.get(src_p + src_name + ".weight", shapes[0])
            out[dst_p + dst_name + ".bias"] = r.get(src_p + src_name + ".bias", shapes[1])

    n_clusters = len(cfg.cutoffs)
    orig_ends = [0] + cfg.cutoffs + [cfg.n_token]
    fs_ends = [0] + mapping.cutoffs + [len(mapping.symbols)]
    tables = [(0, 0, len(mapping.symbols), 0, cfg.n_token, de)] if cfg.div_val == 1 else [
        (i, fs_ends[i], fs_ends[i + 1], orig_ends[i], orig_ends[i + 1], de // cfg.div_val ** i)
        for i in range(n_clusters + 1)]
    has_projs = cfg.div_val > 1 or de != d
    # input embeddings and projections
    emb_keys: Dict[int, str] = {}
    proj_keys: Dict[int, str] = {}
    for i, fs_lo, fs_hi, orig_lo, orig_hi, dim in tables:
        table = r.get(f"word_emb.emb_layers.{i}.weight", (orig_hi - orig_lo, dim))
        emb_keys[i] = f"{PREFIX}embed_tokens.emb_layers.{i}.weight"
        out[emb_keys[i]] = gather_rows(table, mapping, fs_lo, fs_hi, orig_lo, 0.0)
        if has_projs:
            proj_keys[i] = f"{PREFIX}embed_tokens.emb_projs.{i}"
            out[proj_keys[i]] = r.get(f"word_emb.emb_projs.{i}", (d, dim))
    # softmax: clusters, biases, word matrices
    if n_clusters:
        out[PREFIX + "adaptive_softmax.cluster_weight"] = r.get("crit.cluster_weight", (n_clusters, de))
        out[PREFIX + "adaptive_softmax.cluster_bias"] = r.get("crit.cluster_bias", (n_clusters,))
    biases = []
    for i, fs_lo, fs_hi, orig_lo, orig_hi, dim in tables:
        key = f"crit.out_layers.{i}.bias" if layout == "original" else f"crit.out_layers_biases.{i}"
        biases.append(r.get(key, (orig_hi - orig_lo,)))
    full_bias = torch.cat(biases)  # (V_orig,) in original vocabulary order
    out[PREFIX + "adaptive_softmax.bias"] = gather_rows(full_bias, mapping, 0, len(mapping.symbols), 0, dead_bias)
    for i, fs_lo, fs_hi, orig_lo, orig_hi, dim in tables:
        dst = f"{PREFIX}adaptive_softmax.weights.{i}"
        if layout == "original":
            key = f"crit.out_layers.{i}.weight"
        else:
            key = f"word_emb.emb_layers.{i}.weight" if cfg.tie_weight else f"crit.out_layers_weights.{i}"
        weight = r.get(key, (orig_hi - orig_lo, dim))
        out[dst] = out[emb_keys[i]] if cfg.tie_weight else gather_rows(weight, mapping, fs_lo, fs_hi, orig_lo, 0.0)
    # softmax projections (one per cluster when present)
    if has_projs:
        source_flags = cfg.tie_projs_per_cluster
        target_flags = TIE_PROJ_MODES[tie_projs_mode](n_clusters + 1)
        for i in range(n_clusters + 1):
            j = 0 if cfg.div_val == 1 else i  # the embedding projection a tied softmax projection is
            dim = tables[j][5]
            dst = f"{PREFIX}adaptive_softmax.out_projs.{i}"
            if target_flags[i]:
                out[dst] = out[proj_keys[j]]
                if layout == "original":
                    r.get(f"crit.out_projs.{i}", (d, dim))  # the same tensor, stored a second time
                continue
            if source_flags[i]:  # tied in the source, copied here
                out[dst] = out[proj_keys[j]].clone()
                if layout == "original":
                    r.get(f"crit.out_projs.{i}", (d, dim))
            else:
                out[dst] = r.get(f"crit.out_projs.{i}", (d, dim))
    if layout == "nvidia":
        for key in [k for k in src.state if k.startswith("crit.shared_out_projs.")]:
            j = int(key.rsplit(".", 1)[1])
            if not _aliases(src.state[key], src.state.get(f"word_emb.emb_projs.{j}")) and not torch.equal(
                    src.state[key], src.state.get(f"word_emb.emb_projs.{j}", torch.empty(0))):
                raise ConversionError(f"{key} differs from word_emb.emb_projs.{j}; NVIDIA's shared_out_projs must be "
                                      f"the embedding projections")
            r.used.add(key)
    unused = r.unused()
    if unused:
        raise ConversionError(f"the source has weights this configuration does not use: {unused[:8]}"
                              f"{' ...' if len(unused) > 8 else ''} (wrong n_layer / cutoffs / div_val, or not an "
                              f"attn_type 0 Transformer-XL?)")
    return out


def model_fields(src: SourceCheckpoint, mapping: VocabMapping, tie_projs_mode: str, *,
                 same_length_convention: Optional[str] = None, mem_len: Optional[int] = None,
                 clamp_len: Optional[int] = None, same_length: Optional[bool] = None,
                 tokens_per_sample: Optional[int] = None) -> Dict[str, Any]:
    """``TransformerXLConfig`` values (plain types) for the converted model."""
    cfg = src.config
    convention = same_length_convention or ("nvidia" if src.layout == "nvidia" else "original")
    fields = {
        "decoder_layers": cfg.n_layer, "decoder_embed_dim": cfg.d_model, "decoder_input_dim": cfg.d_embed,
        "decoder_ffn_embed_dim": cfg.d_inner, "decoder_attention_heads": cfg.n_head,
        "decoder_attention_head_dim": cfg.d_head, "decoder_normalize_before": cfg.pre_lnorm,
        "dropout": float(cfg.dropout), "attention_dropout": float(cfg.dropatt),
        "mem_len": cfg.mem_len if mem_len is None else mem_len,
        "clamp_len": cfg.clamp_len if clamp_len is None else clamp_len,
        "same_length": cfg.same_length if same_length is None else same_length,
        "same_length_convention": convention, "untie_r": False,
        "adaptive_softmax_cutoff": ",".join(map(str, mapping.cutoffs)) if mapping.cutoffs else None,
        "adaptive_softmax_factor": cfg.div_val, "untie_adaptive_weights": not cfg.tie_weight,
        "tie_projs": tie_projs_mode,
        "init_std": float(src.init_std) if src.init_std is not None else 0.02,
        "proj_init_std": float(src.proj_init_std) if src.proj_init_std is not None else 0.01,
        "attn_impl": "auto",
        "tokens_per_sample": int(tokens_per_sample or cfg.tgt_len or 128),
    }
    if fields["same_length"] and fields["mem_len"] < 1:
        raise ConversionError("same_length needs mem_len >= 1; pass --eval-mem-len")
    return fields


def convert_transformer_xl(src: SourceCheckpoint, symbols: Optional[Sequence[str]] = None, *,
                           symbol_map: Optional[Mapping[str, str]] = None, dead_bias: float = DEAD_BIAS,
                           data: str = "data-bin", same_length_convention: Optional[str] = None,
                           mem_len: Optional[int] = None, clamp_len: Optional[int] = None,
                           same_length: Optional[bool] = None, tokens_per_sample: Optional[int] = None,
                           dtype: Optional[torch.dtype] = torch.float32) -> Conversion:
    """SourceCheckpoint (+ vocabulary) -> fairseq checkpoint for ``transformer_xl_lm`` (weights-only safe)."""
    cfg = src.config
    validate_source(cfg)
    symbols = list(symbols if symbols is not None else (src.symbols or []))
    if not symbols:
        raise ConversionError("no vocabulary: the original model.pt does not contain one; pass --vocab (the original "
                              "cache.pt, or a text file with one symbol per line in index order)")
    if len(symbols) != cfg.n_token:
        raise ConversionError(f"vocabulary size mismatch: {len(symbols)} symbols, but the model has n_token "
                              f"{cfg.n_token}; pass the vocabulary the model was trained with")
    if dead_bias >= -10:
        raise ConversionError(f"--dead-bias {dead_bias} would give the dead fairseq specials real probability")
    mapping = build_vocab_mapping(symbols, cfg.cutoffs, symbol_map)
    if src.layout == "original":
        tie_weight, flags = detect_original_ties(src.state, cfg)
        cfg.tie_weight, cfg.tie_projs = tie_weight, flags
    elif not cfg.tie_weight and not any(k.startswith("crit.out_layers_weights.") for k in src.state):
        raise ConversionError("model_config says tie_weight False but the state has no crit.out_layers_weights.*")
    has_projs = cfg.div_val > 1 or cfg.d_embed != cfg.d_model
    mode = choose_tie_projs(cfg.tie_projs_per_cluster, cfg.tie_weight) if has_projs else (
        "tails" if cfg.tie_weight else "none")
    weights = convert_weights(src, mapping, mode, dead_bias, dtype)
    fields = model_fields(src, mapping, mode, same_length_convention=same_length_convention, mem_len=mem_len,
                          clamp_len=clamp_len, same_length=same_length, tokens_per_sample=tokens_per_sample)
    provenance = {
        "source": src.description, "source_layout": src.layout,
        "source_config": {k: v for k, v in asdict(cfg).items()},
        "mapped_symbols": dict(mapping.mapped), "dead_ids": mapping.dead, "dead_bias": float(dead_bias),
        "original_cutoffs": list(cfg.cutoffs), "fairseq_cutoffs": list(mapping.cutoffs),
    }
    checkpoint = fairseq_checkpoint(fairseq_cfg(fields, data, "transformer_xl_lm", fields["tokens_per_sample"]),
                                    weights, mapping.symbols, "converted_from_transformer_xl", provenance)
    logger.info("converted %s: %d layers, d_model %d, vocabulary %d -> %d (mapped %s, dead ids %s), cutoffs %s -> "
                "%s, tie_weight %s, tie_projs %s", src.description, cfg.n_layer, cfg.d_model, cfg.n_token,
                len(mapping.symbols), mapping.mapped, mapping.dead, cfg.cutoffs, mapping.cutoffs, cfg.tie_weight,
                mode)
    return Conversion(checkpoint, mapping, fields)


def verify_loads(conversion: Conversion) -> None:
    """Build transformer_xl_lm from the converted config and load the weights strictly (catches any name/shape
    disagreement between converter and model before the user does)."""
    from fairseq_ext.models.transformer_xl_lm import TransformerXLDecoder, TransformerXLLanguageModel

    verify_conversion(conversion, lambda cfg, dictionary: TransformerXLLanguageModel(TransformerXLDecoder(cfg,
                                                                                                       dictionary)),
                      "transformer_xl_lm")


# ======================================================================================================================
# Command line
# ======================================================================================================================
def _symbol_map(pairs: Sequence[str]) -> Dict[str, str]:
    mapping = dict(DEFAULT_SYMBOL_MAP)
    for pair in pairs:
        if "=" not in pair:
            raise ConversionError(f"--map-symbol {pair!r}: expected ORIGINAL=FAIRSEQ_SPECIAL (or ORIGINAL= to unmap)")
        orig, special = pair.split("=", 1)
        mapping[orig] = special
    return mapping


def _on_off(value: str) -> bool:
    if value.lower() in ("on", "true", "1", "yes"):
        return True
    if value.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = converter_parser(
        "Convert a Transformer-XL checkpoint (original kimiyoung/transformer-xl model.pt, or NVIDIA "
        "DeepLearningExamples checkpoint_*.pt) into a fairseq checkpoint for --arch transformer_xl_lm plus the "
        "fairseq dict.txt it needs.",
        "original model.pt (pickled MemTransformerLM) or NVIDIA checkpoint_*.pt",
        "then evaluate, e.g. NVIDIA base at 64/640/400 with NVIDIA's warm-up protocol:\n"
        "  fairseq-eval-lm <data-bin dir> --user-dir fairseq_ext --task streaming_lm --path OUT_DIR/model.pt "
        "--tokens-per-sample 64 --batch-size 16 --eval-warmup-tokens 640 --gen-subset test\n"
        "(with --eval-mem-len 640 --eval-clamp-len 400 --eval-same-length on given here, or the same values in "
        "--model-overrides). See docs/convert-transformer-xl.md.")
    parser.add_argument("--vocab", help="vocabulary: the original cache.pt (pickled corpus) or a text file with one "
                                        "symbol per line in index order; required for the original model.pt, "
                                        "overrides an NVIDIA checkpoint's vocab")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow unpickling SRC / --vocab through the class shim (both formats pickle Python "
                             "objects; only for files you trust)")
    parser.add_argument("--format", choices=("auto", "original", "nvidia"), default="auto",
                        help="source format (auto: detected)")
    parser.add_argument("--map-symbol", action="append", default=[], metavar="ORIG=SPECIAL",
                        help="map an original symbol onto a fairseq special (<s>, <pad>, </s>, <unk>); defaults: "
                             "<eos>=</s>, <unk>=<unk> (<UNK>=<unk> for lm1b); ORIG= removes a default")
    parser.add_argument("--eval-mem-len", type=int, help="mem_len stored in the converted config (default: training)")
    parser.add_argument("--eval-clamp-len", type=int, help="clamp_len stored in the converted config")
    parser.add_argument("--eval-same-length", type=_on_off, metavar="on|off", help="same_length in the config")
    parser.add_argument("--same-length-convention", choices=("original", "nvidia"),
                        help="same_length window (default: the source's, nvidia for NVIDIA checkpoints)")
    parser.add_argument("--tokens-per-sample", type=int, help="segment length stored in the config (default: the "
                                                              "training tgt_len)")
    add_output_arguments(parser, "output bias of fairseq specials the original vocabulary lacks (default -40)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Conversion:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    src = read_source(load_pickled(args.src, args.trust_pickle))
    if args.format != "auto" and src.layout != args.format:
        raise ConversionError(f"{args.src} is a {src.layout} checkpoint, not {args.format}")
    symbols = read_vocab_file(args.vocab, args.trust_pickle) if args.vocab else None
    out_dir = os.path.abspath(args.out_dir)
    conversion = convert_transformer_xl(
        src, symbols, symbol_map=_symbol_map(args.map_symbol), dead_bias=args.dead_bias, data=out_dir,
        same_length_convention=args.same_length_convention, mem_len=args.eval_mem_len,
        clamp_len=args.eval_clamp_len, same_length=args.eval_same_length, tokens_per_sample=args.tokens_per_sample)
    return finish_conversion(conversion, out_dir, "transformer_xl_lm", None if args.no_verify else verify_loads)


if __name__ == "__main__":  # pragma: no cover
    try:
        main()
    except ConversionError as err:
        sys.exit(f"error: {err}")
