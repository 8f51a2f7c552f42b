"""Convert IDSIA/lmtool-fwms checkpoints (Schlag, Irie, Schmidhuber 2021) to ``fast_weight_lm``.

Source (spec fast_weights.md §6): ``train.py`` saves the whole pickled ``MemTransformerLM`` (``best_model.pt`` /
``latest_model.pt``). It is read (fast_weight_source.py) through the unpickling shim (``model_main.*``,
``utils.cuda_fast_weight_layer.*``, ``utils.proj_adaptive_softmax.*``, ``utils.model_utils.*``, ... become stubs), so
neither lmtool nor its CUDA extensions need to be importable; only with ``trust_pickle`` / ``--trust-pickle``. The
configuration comes from module attributes (``attn_type``, ``n_layer``, ``n_head``, ``d_head``, ``d_model``,
``tgt_len``, ``clamp_len``, ``no_pos``; per layer ``normalize_attn_scores``, ``proj_dim``/``proj_matrix``,
``n_roll``, ``use_sum_norm``; dropout rates from the ``Dropout`` modules), ties from tensor identity. The vocabulary is
not in the file (it is in the corpus cache, as for Transformer-XL): pass ``--vocab``.

Weights (spec §1.2; original name -> ``decoder.layers.{i}.``...):

* ``dec_attn.qkvb_net`` (24/25/26/44/45/46) [H (3d+1), C] viewed (H, 3d+1, C), per head rows [q | k | v | beta] ->
  ``self_attn.{q,k,v}_proj`` (H d, C) head-major and ``self_attn.beta_proj`` (H, C);
* ``dec_attn.qkv_net`` (34/35) [H 3d, C] viewed (H, 3d, C), per head [q | k | v];
* ``dec_attn.q_net`` / ``dec_attn.kv_net`` (2/4/5/6): q as is, kv's first half K, second half V (head-major);
  the softmax baseline (2) stores them as one ``self_attn.qkv_proj`` (3 H d, C), rows [q ; k ; v];
* ``o_net`` -> ``out_proj``; ``dec_attn.layer_norm`` / ``pos_ff.*`` as in the Transformer-XL converter;
* Performer (5/25/35/45): Omega is the plain attribute ``proj_matrix`` (d, m) of every attention module, used as
  u = x Omega (§1.3), not in the state dict -> the persistent buffer ``self_attn.feature_map.omega`` (d, m), same
  orientation; ``performer_orthogonal_compat`` is set so later redraws use lmtool's construction;
* ``word_emb.*`` / ``crit.*``: Transformer-XL's adaptive embedding and softmax (``convert_adaptive_weights``; tied
  output matrix = one tensor, two keys; cluster rows unchanged); ``pos_emb.inv_freq`` dropped (recomputed).

Attention semantics go through the model's ``lmtool_attn_type`` alias plus ``skip_attn_normalization`` (read from
the layers' ``normalize_attn_scores``: lmtool passes its CLI flag, default off, so 24/25/26 without the flag are
output-normalised, spec §1.5). The quadratic sum-rule layers 4/5/6 divide the *scaled* scores by their row sum plus
1e-5, which cancels 1/sqrt(d) except inside the epsilon; the model reproduces that exactly for these aliases (output
scale 1, epsilon 1e-5 sqrt(d)), so their weights convert unchanged. Unsupported codes (0/1/3 Transformer-XL family,
10/14/16/36, follow-up codes) are refused with the reason.
"""
import argparse
import logging
import os
from dataclasses import asdict
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .cli import (add_output_arguments, add_training_segment_argument, add_vocab_arguments, converter_parser,
                  parse_command_line, parse_on_off, symbol_map_from_pairs)
from .errors import ConversionError, ConversionFlagError
from .fast_weight_source import (ARCH, LAYOUTS, Q_KV, QKV, QKVB, LmtoolConfig, LmtoolSource,
                                 read_source, reject_attn_type)
from .output import PREFIX, Conversion, fairseq_cfg, fairseq_checkpoint, finish_conversion, verify_conversion
from .pickled import read_vocab_file
from .state_reader import StateReader
from .unpickle import load_pickled
from .vocab_mapping import DEAD_BIAS, VocabMapping, build_vocab_mapping, check_dead_bias, check_vocab_size
from .xl_weights import check_source_cutoffs, convert_adaptive_weights, convert_layer_norms_and_ffn

logger = logging.getLogger(__name__)

SOURCE_FILE = ("lmtool-fwms's pickled model, best_model.pt or latest_model.pt from its work_dir (not the optimizer "
               "state *_opt.pt)")

DROPPED_KEYS = ("pos_emb.inv_freq",)  # recomputed by the model


# ======================================================================================================================
# Conversion
# ======================================================================================================================
def validate_source(cfg: LmtoolConfig) -> None:
    if cfg.attn_type not in LAYOUTS:
        reject_attn_type(cfg.attn_type)
    if cfg.sample_softmax > 0:
        raise ConversionError(f"sample_softmax {cfg.sample_softmax} > 0: the model keeps its output layer in "
                              f"'out_layer', not the adaptive softmax; {ARCH} cannot load it")
    if cfg.pre_lnorm:
        raise ConversionError(f"pre_lnorm checkpoints are not supported: {ARCH} is post-LN, and lmtool's pre-LN fast "
                              f"weight layers add the residual to the normalised input (spec §6)")
    if cfg.mem_len > 0:
        raise ConversionError(f"mem_len {cfg.mem_len} > 0: {ARCH} has no Transformer-XL memory (every lmtool fast "
                              f"weight / standard Transformer script uses mem_len 0; carry-over needs mem_len 0)")
    if cfg.div_val != 1 or cfg.d_embed != cfg.d_model:
        raise ConversionError(f"div_val {cfg.div_val} / d_embed {cfg.d_embed} (d_model {cfg.d_model}): {ARCH} embeds "
                              f"at d_model with div_val 1, as every lmtool script does")
    check_source_cutoffs(cfg.cutoffs, cfg.n_token)
    if cfg.carry_over_fast_weight and LAYOUTS[cfg.attn_type][0] == Q_KV:
        raise ConversionError(f"carry_over_fast_weight needs a CUDA fast weight layer (24/25/26/34/35/44/45/46); "
                              f"lmtool asserts it is off for attn_type {cfg.attn_type}")


def _split_heads(weight: Tensor, heads: int, sizes: Sequence[int]) -> List[Tensor]:
    """(H * sum(sizes), C) with per-head row blocks of ``sizes`` -> one (H * size, C) tensor per block, head-major."""
    parts = weight.view(heads, sum(sizes), weight.shape[-1]).split(list(sizes), dim=1)  # (H, size, C) each
    return [p.reshape(heads * p.shape[1], weight.shape[-1]).clone() for p in parts]


def convert_weights(src: LmtoolSource, mapping: VocabMapping, dead_bias: float,
                    dtype: Optional[torch.dtype] = torch.float32) -> Dict[str, Tensor]:
    """Original-name weights -> fast_weight_lm state dict (keys ``decoder.*``), vocabulary rows permuted."""
    cfg = src.config
    layout, feature_map, _ = LAYOUTS[cfg.attn_type]
    r = StateReader(src.state, dtype, DROPPED_KEYS)
    c, h, d = cfg.d_model, cfg.n_head, cfg.d_head
    out: Dict[str, Tensor] = {}
    for layer in range(cfg.n_layer):
        src_p, dst_p = f"layers.{layer}.", f"{PREFIX}layers.{layer}."
        attn = dst_p + "self_attn."
        if layout == QKVB:
            q, k, v, beta = _split_heads(r.get(src_p + "dec_attn.qkvb_net.weight", (h * (3 * d + 1), c)), h,
                                         (d, d, d, 1))
            out[attn + "beta_proj.weight"] = beta  # (H, C)
        elif layout == QKV:
            q, k, v = _split_heads(r.get(src_p + "dec_attn.qkv_net.weight", (h * 3 * d, c)), h, (d, d, d))
        else:
            q = r.get(src_p + "dec_attn.q_net.weight", (h * d, c))
            k, v = (part.clone() for part in r.get(src_p + "dec_attn.kv_net.weight", (2 * h * d, c)).chunk(2, dim=0))
        if feature_map == "softmax":  # the core's softmax mixer: one qkv_proj, rows [W_q ; W_k ; W_v]
            out[attn + "qkv_proj.weight"] = torch.cat([q, k, v], dim=0)  # (3 H d, C)
        else:
            out[attn + "q_proj.weight"], out[attn + "k_proj.weight"], out[attn + "v_proj.weight"] = q, k, v
        o_net = r.get(src_p + "dec_attn.o_net.weight", (c, h * d))
        out[attn + "out_proj.weight"] = o_net
        if feature_map == "performer":
            omega = src.omegas[layer]
            out[attn + "feature_map.omega"] = omega.to(dtype) if dtype is not None else omega.clone()
        out.update(convert_layer_norms_and_ffn(r, src_p, dst_p, c, cfg.d_inner))
    out.update(convert_adaptive_weights(r, mapping, n_token=cfg.n_token, cutoffs=cfg.cutoffs, d_model=c,
                                        d_embed=c, div_val=1, tie_weight=cfg.tie_weight, source_tie_projs=[False],
                                        tie_projs_mode="tails", dead_bias=dead_bias, layout="original"))
    unused = r.unused()
    if unused:
        raise ConversionError(f"the source has weights this configuration does not use: {unused[:8]}"
                              f"{' ...' if len(unused) > 8 else ''} (wrong n_layer / cutoffs / attn_type?)")
    return out


def model_fields(cfg: LmtoolConfig, cutoffs: Sequence[int], tokens_per_sample: Optional[int] = None
                 ) -> Dict[str, Any]:
    """``FastWeightLMConfig`` values (plain types) for the converted model."""
    feature_map = LAYOUTS[cfg.attn_type][1]
    return {
        "decoder_layers": cfg.n_layer, "decoder_embed_dim": cfg.d_model, "decoder_attention_heads": cfg.n_head,
        "decoder_attention_head_dim": cfg.d_head, "decoder_ffn_embed_dim": cfg.d_inner,
        "dropout": float(cfg.dropout),
        # dropatt acts on softmax probabilities only (0 in every lmtool script)
        "attention_dropout": float(cfg.dropatt) if feature_map == "softmax" else 0.0,
        "lmtool_attn_type": cfg.attn_type, "skip_attn_normalization": bool(cfg.skip_attn_normalization),
        "performer_proj_dim": int(cfg.performer_proj_dim), "performer_orthogonal_compat": feature_map == "performer",
        "dpfp_n_roll": int(cfg.dpfp_n_roll), "no_pos": bool(cfg.no_pos), "clamp_len": int(cfg.clamp_len),
        "carry_over_fast_weight": bool(cfg.carry_over_fast_weight),
        "adaptive_softmax_cutoff": ",".join(map(str, cutoffs)) if cutoffs else None,
        "adaptive_softmax_factor": 1, "untie_adaptive_weights": not cfg.tie_weight,
        "tokens_per_sample": int(tokens_per_sample or cfg.tgt_len or 256),
    }


def convert_fast_weight(src: LmtoolSource, symbols: Optional[Sequence[str]], *,
                        symbol_map: Optional[Mapping[str, str]] = None, dead_bias: float = DEAD_BIAS,
                        data: str = "data-bin", tokens_per_sample: Optional[int] = None,
                        dtype: Optional[torch.dtype] = torch.float32) -> Conversion:
    """LmtoolSource + vocabulary -> fairseq checkpoint for ``fast_weight_lm`` (weights-only safe)."""
    cfg = src.config
    validate_source(cfg)
    symbols = list(symbols or [])
    if not symbols:
        raise ConversionFlagError("no vocabulary: lmtool's model file does not contain one; pass --vocab (the corpus "
                                  "cache.pt of the training data directory, or a text file with one symbol per line "
                                  "in index order)")
    check_vocab_size(symbols, cfg.n_token)
    check_dead_bias(dead_bias)
    mapping = build_vocab_mapping(symbols, cfg.cutoffs, symbol_map)
    weights = convert_weights(src, mapping, dead_bias, dtype)
    fields = model_fields(cfg, mapping.cutoffs, tokens_per_sample)
    provenance = {
        "source": src.description, "source_config": asdict(cfg), "mapped_symbols": dict(mapping.mapped),
        "dead_ids": mapping.dead, "dead_bias": float(dead_bias), "original_cutoffs": list(cfg.cutoffs),
        "fairseq_cutoffs": list(mapping.cutoffs),
    }
    checkpoint = fairseq_checkpoint(fairseq_cfg(fields, data, ARCH, fields["tokens_per_sample"]), weights,
                                    mapping.symbols, "converted_from_lmtool_fwms", provenance)
    logger.info("converted %s: attn_type %d, %d layers, d_model %d, %d x %d heads, vocabulary %d -> %d (mapped %s, "
                "dead ids %s), cutoffs %s -> %s, skip_attn_normalization %s, carry_over_fast_weight %s",
                src.description, cfg.attn_type, cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_head, cfg.n_token,
                len(mapping.symbols), mapping.mapped, mapping.dead, cfg.cutoffs, mapping.cutoffs,
                cfg.skip_attn_normalization, cfg.carry_over_fast_weight)
    return Conversion(checkpoint, mapping, fields)


def verify_loads(conversion: Conversion) -> None:
    """Build fast_weight_lm from the converted config and load the weights strictly."""
    from fairseq_ext.models.fast_weight_lm import FastWeightDecoder, FastWeightLanguageModel

    verify_conversion(conversion, lambda cfg, dictionary: FastWeightLanguageModel(FastWeightDecoder(cfg, dictionary)),
                      ARCH)


# ======================================================================================================================
# Command line
# ======================================================================================================================
def build_parser() -> argparse.ArgumentParser:
    parser = converter_parser(
        "Convert an IDSIA/lmtool-fwms checkpoint (the pickled MemTransformerLM of train.py: best_model.pt / "
        "latest_model.pt) into a fairseq checkpoint for --arch fast_weight_lm plus the fairseq dict.txt it needs.",
        "lmtool best_model.pt or latest_model.pt (pickled MemTransformerLM)",
        "then evaluate, e.g. the paper's sliding window (spec §4):\n"
        "  fairseq-eval-lm <data-bin dir> --user-dir fairseq_ext --path OUT_DIR/model.pt --tokens-per-sample 256 "
        "--context-window 255 --batch-size 1 --gen-subset test\n"
        "or, for carry-over models, --task streaming_lm --batch-size 1. See docs/convert-fast-weight.md.")
    add_vocab_arguments(parser, "vocabulary (required): lmtool's corpus cache.pt (pickled corpus) or a text file with "
                                "one symbol per line in index order",
                        "allow unpickling SRC / --vocab through the class shim (lmtool pickles the whole model; only "
                        "for files you trust)")
    parser.add_argument("--carry-over-fast-weight", type=parse_on_off, metavar="on|off",
                        help="the model was trained with --carry_over_fast_weight (a train.py flag, not stored in the "
                             "model): required for the CUDA fast weight layers (24/25/26/34/35/44/45/46)")
    parser.add_argument("--assume-raw-sum-features", action="store_true",
                        help="attn_type 34/35 without a use_sum_norm attribute: assume raw (not sum-normalised) "
                             "feature maps, as lmtool-fwms' default")
    add_training_segment_argument(parser)
    add_output_arguments(parser, "output bias of fairseq specials the original vocabulary lacks (default -40)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Conversion:
    args = parse_command_line(build_parser, argv)
    src = read_source(load_pickled(args.src, args.trust_pickle, contents="the whole lmtool MemTransformerLM",
                                   expected=SOURCE_FILE),
                      args.carry_over_fast_weight, args.assume_raw_sum_features)
    symbols = read_vocab_file(args.vocab, args.trust_pickle) if args.vocab else None
    out_dir = os.path.abspath(args.out_dir)
    conversion = convert_fast_weight(src, symbols, symbol_map=symbol_map_from_pairs(args.map_symbol),
                                     dead_bias=args.dead_bias, data=out_dir, tokens_per_sample=args.tokens_per_sample)
    return finish_conversion(conversion, out_dir, ARCH, None if args.no_verify else verify_loads)


if __name__ == "__main__":  # pragma: no cover  (a UserError prints as one line: fairseq_ext.compat.errors)
    main()
