"""Convert Transformer-XL checkpoints of the original PyTorch code and of NVIDIA's to ``transformer_xl_lm``.

Sources (shared/specs/transformer_xl.md §7):

* original ``kimiyoung/transformer-xl`` ``model.pt``: the whole ``MemTransformerLM`` pickled by ``torch.save(model)``.
  It is read through an unpickling shim that maps the original classes (``mem_transformer.*``,
  ``proj_adaptive_softmax.*``, ``vocabulary.Vocab``, ...) onto stubs, so the original code need not be importable;
  the configuration comes from the model's attributes and ties from tensor identity. Its vocabulary is not in the
  file: pass ``--vocab`` (the original ``cache.pt`` corpus, or a text file with one symbol per line in index order).
* NVIDIA DeepLearningExamples ``checkpoint_{best,last}.pt``: a dict with ``model_state``, ``model_config`` (the
  ``MemTransformerLM`` kwargs) and ``vocab`` (a pickled ``Vocab``).

Both hold pickled Python objects, so they are read (with the shim) only with ``trust_pickle`` / ``--trust-pickle``
(``transformer_xl_source.py`` reads them).

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
from dataclasses import asdict
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .cli import (add_output_arguments, add_training_segment_argument, add_vocab_arguments, converter_parser,
                  parse_command_line, parse_on_off, symbol_map_from_pairs)
from .errors import ConversionError, ConversionFlagError
from .output import PREFIX, Conversion, fairseq_cfg, fairseq_checkpoint, finish_conversion, verify_conversion
from .pickled import read_vocab_file, same_tensor
from .state_reader import StateReader
from .transformer_xl_source import (OriginalConfig, SourceCheckpoint, detect_original_ties, read_source,
                                    reject_attn_type)
from .unpickle import load_pickled
from .vocab_mapping import DEAD_BIAS, VocabMapping, build_vocab_mapping, check_dead_bias, check_vocab_size
from .xl_weights import TIE_PROJ_MODES, check_source_cutoffs, convert_adaptive_weights, convert_layer_norms_and_ffn

logger = logging.getLogger(__name__)

SOURCE_FILE = ("the model.pt saved by the original Transformer-XL train.py (kimiyoung/transformer-xl) or an NVIDIA "
               "checkpoint_*.pt (DeepLearningExamples)")

DROPPED_KEYS = ("pos_emb.inv_freq",)  # recomputed by the model


# ======================================================================================================================
# Conversion
# ======================================================================================================================
def validate_source(cfg: OriginalConfig) -> None:
    if cfg.attn_type != 0:
        reject_attn_type(cfg.attn_type)
    if cfg.sample_softmax > 0:
        raise ConversionError(f"sample_softmax {cfg.sample_softmax} > 0: a sampled-softmax model keeps its output "
                              f"layer in 'out_layer', not the adaptive softmax; transformer_xl_lm cannot load it")
    if cfg.ext_len > 0:
        raise ConversionError(f"ext_len {cfg.ext_len} > 0 is not supported (transformer_xl_lm has no extended "
                              f"context; every published configuration uses ext_len 0)")
    check_source_cutoffs(cfg.cutoffs, cfg.n_token)


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
    check_vocab_size(symbols, cfg.n_token)
    check_dead_bias(dead_bias)
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
    add_training_segment_argument(parser)
    add_output_arguments(parser, "output bias of fairseq specials the original vocabulary lacks (default -40)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Conversion:
    args = parse_command_line(build_parser, argv)
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
