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
``layers.{l}.dec_attn.qkv_net`` -> ``self_attn.qkv_proj`` (the same tensor: rows [W_q ; W_k ; W_v]);
``r_net``/``o_net`` ->
``r_proj``/``out_proj``; ``dec_attn.layer_norm`` -> ``self_attn_layer_norm``; ``pos_ff.CoreNet.0/3`` -> ``fc1/fc2``;
``pos_ff.layer_norm`` -> ``final_layer_norm``; ``word_emb.*`` -> ``embed_tokens.*``; ``crit.cluster_{weight,bias}``
unchanged (same row meaning); output biases in vocabulary order -> ``adaptive_softmax.bias`` (one tensor, the
original with div_val 1) or
``adaptive_softmax.biases.{i}`` (one per cluster: the original with div_val > 1, NVIDIA always); output
matrices and projections -> ``adaptive_softmax.weights.{i}`` / ``out_projs.{i}``, where tied ones are the very
tensors of ``embed_tokens`` (one tensor, two keys). ``pos_emb.inv_freq`` is dropped (recomputed).

Vocabulary: a fairseq dictionary always starts ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3. The output
``dict.txt`` lists the original symbols in original order minus those mapped onto fairseq specials (``<eos>`` ->
``</s>``, ``<unk>`` -> ``<unk>``; ``--map-symbol`` adds more). Specials the original lacks are *dead* rows: zero
embedding, zero output row and bias, and the fixed logit ``dead_bias`` (-40: probability below e^-40, far under fp32
resolution of the real tokens, finite in fp16; a spurious ``</s>`` target costs only ~40 nats) in the softmax's
``dead_rows`` buffers, outside every trained tensor (modules/dead_rows.py). Every
mapped symbol must lie in the head cluster; the clusters then keep their members and order, and each cutoff moves
by the number of dead rows. Binarise text with ``fairseq-preprocess --only-source --srcdict <out>/dict.txt``.
"""
import argparse
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .common import (DEAD_BIAS, DEFAULT_SYMBOL_MAP, PREFIX, PREPROCESS_HINT, TIE_PROJ_MODES,  # noqa: F401 (re-exports)
                     Conversion, ConversionError, ConversionFlagError, PickledStub, ShimUnpickler, StateReader,
                     VocabMapping,
                     add_output_arguments, add_vocab_arguments, build_vocab_mapping, convert_adaptive_weights,
                     convert_layer_norms_and_ffn, converter_parser, fairseq_cfg, fairseq_checkpoint,
                     fairseq_dictionary, finish_conversion, gather_rows, load_pickled, module_state, pickled_attr,
                     pickled_child, pickled_class_name, read_vocab_file, report_conversion, same_tensor,
                     parse_on_off, pickled_adaptive_softmax, symbol_map_from_pairs, unwrap_pickled_model, verify_conversion, verify_strict_load, vocab_symbols,
                     write_dictionary)

logger = logging.getLogger(__name__)

SOURCE_FILE = ("the model.pt saved by the original Transformer-XL train.py (kimiyoung/transformer-xl) or an NVIDIA "
               "checkpoint_*.pt (DeepLearningExamples)")

DROPPED_KEYS = ("pos_emb.inv_freq",)  # recomputed by the model


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


def detect_original_ties(state: Mapping[str, Tensor], cfg: OriginalConfig) -> Tuple[bool, List[bool]]:
    """(tie_weight, tie_projs per cluster) of an original-layout state dict, from tensor identity."""
    n = len(cfg.cutoffs) + 1
    n_out = 1 if cfg.div_val == 1 else n
    tied = [same_tensor(state.get(f"crit.out_layers.{i}.weight"), state.get(f"word_emb.emb_layers.{i}.weight"))
            for i in range(n_out)]
    if any(tied) and not all(tied):
        raise ConversionError(f"only some output matrices are tied to the embeddings ({tied}); transformer_xl_lm ties "
                              f"all or none (the original tie_weight)")
    projs = []
    for i in range(n):
        j = 0 if cfg.div_val == 1 else i
        projs.append(same_tensor(state.get(f"crit.out_projs.{i}"), state.get(f"word_emb.emb_projs.{j}")))
    return all(tied), projs


def read_original_model(root: Any) -> SourceCheckpoint:
    """The original ``model.pt`` (a pickled MemTransformerLM, loaded with the shim) -> SourceCheckpoint."""
    root = unwrap_pickled_model(root, "MemTransformerLM", "the original train.py's model.pt")
    state = module_state(root)
    layers = pickled_child(root, "layers")
    layer0 = pickled_child(layers, "0") if layers is not None else None
    attn0 = pickled_child(layer0, "dec_attn") if layer0 is not None else None
    crit = pickled_child(root, "crit")
    word_emb = pickled_child(root, "word_emb")
    attn_type = int(pickled_attr(root, "attn_type", 0))
    sample_softmax = int(pickled_attr(root, "sample_softmax", -1))
    if attn_type != 0:
        _reject_attn_type(attn_type)
    if attn0 is None or "r_w_bias" not in state:
        raise ConversionError("the pickled MemTransformerLM has no layers.0.dec_attn / r_w_bias: not a relative-"
                              "attention (attn_type 0) Transformer-XL")
    n_token, crit_cutoffs = pickled_adaptive_softmax(root, "transformer_xl_lm")
    drop = pickled_child(root, "drop")
    dropatt = pickled_child(attn0, "dropatt")
    cfg = OriginalConfig(
        n_token=n_token, n_layer=int(pickled_attr(root, "n_layer", len(pickled_attr(layers, "_modules", {})))),
        n_head=int(pickled_attr(root, "n_head")), d_model=int(pickled_attr(root, "d_model")), d_head=int(pickled_attr(root, "d_head")),
        d_inner=int(state["layers.0.pos_ff.CoreNet.0.weight"].shape[0]),
        d_embed=int(pickled_attr(root, "d_embed", pickled_attr(word_emb, "d_embed", pickled_attr(root, "d_model")))),
        div_val=int(pickled_attr(crit, "div_val", pickled_attr(word_emb, "div_val", 1))), cutoffs=crit_cutoffs[:-1],
        pre_lnorm=bool(pickled_attr(attn0, "pre_lnorm", False)), tgt_len=int(pickled_attr(root, "tgt_len", 0)),
        ext_len=int(pickled_attr(root, "ext_len", 0)), mem_len=int(pickled_attr(root, "mem_len", 0)),
        same_length=bool(pickled_attr(root, "same_length", False)), attn_type=attn_type,
        clamp_len=int(pickled_attr(root, "clamp_len", -1)), sample_softmax=sample_softmax,
        dropout=float(pickled_attr(drop, "p", 0.0)) if drop is not None else 0.0,
        dropatt=float(pickled_attr(dropatt, "p", 0.0)) if dropatt is not None else 0.0)
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
                            init_std=pickled_attr(args, "init_std"), proj_init_std=pickled_attr(args, "proj_init_std"),
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
        out[dst_p + "self_attn.qkv_proj.weight"] = r.get(src_p + "dec_attn.qkv_net.weight", (3 * hd, d))
        out[dst_p + "self_attn.r_proj.weight"] = r.get(src_p + "dec_attn.r_net.weight", (hd, d))
        out[dst_p + "self_attn.out_proj.weight"] = r.get(src_p + "dec_attn.o_net.weight", (d, hd))
        out.update(convert_layer_norms_and_ffn(r, src_p, dst_p, d, cfg.d_inner))

    out.update(convert_adaptive_weights(r, mapping, n_token=cfg.n_token, cutoffs=cfg.cutoffs, d_model=d, d_embed=de,
                                        div_val=cfg.div_val, tie_weight=cfg.tie_weight,
                                        source_tie_projs=cfg.tie_projs_per_cluster, tie_projs_mode=tie_projs_mode,
                                        dead_bias=dead_bias, layout=layout,
                                        bias_per_cluster=cfg.div_val > 1 or layout == "nvidia"))
    if layout == "nvidia":
        for key in [k for k in src.state if k.startswith("crit.shared_out_projs.")]:
            j = int(key.rsplit(".", 1)[1])
            if not same_tensor(src.state[key], src.state.get(f"word_emb.emb_projs.{j}")) and not torch.equal(
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
        "same_length_convention": convention, "untie_r": False, "adaptive_softmax_bias_layout": src.layout,
        "adaptive_softmax_cutoff": ",".join(map(str, mapping.cutoffs)) if mapping.cutoffs else None,
        "adaptive_softmax_factor": cfg.div_val, "untie_adaptive_weights": not cfg.tie_weight,
        "tie_projs": tie_projs_mode,
        "init_std": float(src.init_std) if src.init_std is not None else 0.02,
        "proj_init_std": float(src.proj_init_std) if src.proj_init_std is not None else 0.01,
        "attn_impl": "auto",
        "tokens_per_sample": int(tokens_per_sample or cfg.tgt_len or 128),
    }
    if fields["same_length"] and fields["mem_len"] < 1:
        raise ConversionFlagError("same_length needs mem_len >= 1; pass --eval-mem-len")
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
        raise ConversionFlagError("no vocabulary: the original model.pt does not contain one; pass --vocab (the "
                                  "original cache.pt, or a text file with one symbol per line in index order)")
    if len(symbols) != cfg.n_token:
        raise ConversionError(f"vocabulary size mismatch: {len(symbols)} symbols, but the model has n_token "
                              f"{cfg.n_token}; pass the vocabulary the model was trained with")
    if dead_bias >= -10:
        raise ConversionFlagError(f"--dead-bias {dead_bias} would give the dead fairseq specials real probability")
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
    add_vocab_arguments(parser, "vocabulary: the original cache.pt (pickled corpus) or a text file with one symbol per "
                                "line in index order; required for the original model.pt, overrides an NVIDIA "
                                "checkpoint's vocab",
                        "allow unpickling SRC / --vocab through the class shim (both formats pickle Python objects; "
                        "only for files you trust)")
    parser.add_argument("--format", choices=("auto", "original", "nvidia"), default="auto",
                        help="source format (auto: detected)")
    parser.add_argument("--eval-mem-len", type=int, help="mem_len stored in the converted config (default: training)")
    parser.add_argument("--eval-clamp-len", type=int, help="clamp_len stored in the converted config")
    parser.add_argument("--eval-same-length", type=parse_on_off, metavar="on|off", help="same_length in the config")
    parser.add_argument("--same-length-convention", choices=("original", "nvidia"),
                        help="same_length window (default: the source's, nvidia for NVIDIA checkpoints)")
    parser.add_argument("--tokens-per-sample", type=int, help="segment length stored in the config (default: the "
                                                              "training tgt_len)")
    add_output_arguments(parser, "output bias of fairseq specials the original vocabulary lacks (default -40)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Conversion:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    src = read_source(load_pickled(args.src, args.trust_pickle, expected=SOURCE_FILE))
    if args.format != "auto" and src.layout != args.format:
        raise ConversionFlagError(f"{args.src} is a {src.layout} checkpoint, not {args.format}: drop --format or "
                                  f"pass --format {src.layout}")
    symbols = read_vocab_file(args.vocab, args.trust_pickle) if args.vocab else None
    out_dir = os.path.abspath(args.out_dir)
    conversion = convert_transformer_xl(
        src, symbols, symbol_map=symbol_map_from_pairs(args.map_symbol), dead_bias=args.dead_bias, data=out_dir,
        same_length_convention=args.same_length_convention, mem_len=args.eval_mem_len,
        clamp_len=args.eval_clamp_len, same_length=args.eval_same_length, tokens_per_sample=args.tokens_per_sample)
    return finish_conversion(conversion, out_dir, "transformer_xl_lm", None if args.no_verify else verify_loads)


if __name__ == "__main__":  # pragma: no cover  (a UserError prints as one line: fairseq_ext.compat.errors)
    main()
