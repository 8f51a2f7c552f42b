"""Convert a checkpoint of the original ``Smerity/sha-rnn`` (``main.py``) to ``sha_rnn_lm``.

Merity, "Single Headed Attention RNN: Stop Thinking With Your Head" (arXiv 1911.11423). Spec: shared/specs/sha_rnn.md
§5a (saved format, parameter names), §1 (the model the weights belong to), §4 (vocabulary).

Source: ``main.py``'s ``model_save`` writes ``torch.save([model, criterion], f)``: a list of two whole pickled modules
(``model.SHARNN`` and ``splitcross.SplitCrossEntropyLoss``, which holds no weights for enwik8). It is read through the
class shim of convert/unpickle.py (``--trust-pickle``: the original code need not be importable). A plain state dict of
the ``SHARNN`` (``model.state_dict()``) is accepted as well.

Weights (original name -> ``decoder.``...):

* ``encoder.weight`` (V, d) -> ``embed_tokens.weight``; ``decoder.weight`` must be the same values (tied: the output
  layer reuses ``embed_tokens``); ``decoder.bias`` (V) -> ``output_bias``; rows permuted into the fairseq dictionary,
  dead specials as in convert/vocab_mapping.py;
* ``blocks.{l}.rnn.{weight_ih_l0,weight_hh_l0,bias_ih_l0,bias_hh_l0}`` -> ``layers.{l}.rnn.*`` (same names);
* ``blocks.{l}.{lnstart,lnmid,lnmem,lnff,lnxff}`` -> ``layers.{l}.*``; ``lnout`` is dropped (the original forward
  never calls it);
* ``blocks.{l}.ff.linear1`` -> ``layers.{l}.ff.linear1``;
* attention blocks: ``attn.{qs,ks,vs}`` (1, 1, d) -> (d,); ``attn.q``, ``attn.qln``, ``attn.vq.l1`` as named; after
  ``vq_collapse()`` there is no ``vq.l1`` and ``vs`` is the value gate itself (``collapse_value_gate``); the legacy
  ``attn.qkvs`` and ``attn.r_gate`` are dropped.

Vocabulary: the checkpoint holds none. It is rebuilt from the preprocessed ``train.txt`` exactly as the original
``data.py`` (the awd-lstm ``Corpus``: every line whitespace-split with ``<eos>`` appended, ids in order of first
appearance), with the scanner of convert/text_vocab.py (the same ``data.py``). ``<eos>`` becomes ``</s>``.
"""
import argparse
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from fairseq_ext.models.sha_rnn_lm import check_memory_window
from fairseq_ext.modules.dead_rows import dead_rows_state

from .cli import add_output_arguments, converter_parser, parse_command_line
from .errors import ConversionError
from .output import PREFIX, Conversion, plain_vocab_checkpoint
from .pickled import module_state, pickled_class_name
from .state_reader import StateReader
from .text_vocab import add_text_vocab_arguments, check_text_vocabulary, finish_text_conversion, text_vocabulary
from .unpickle import load_pickled
from .vocab_mapping import DEAD_BIAS, VocabMapping, gather_rows

logger = logging.getLogger(__name__)

ARCH = "sha_rnn_lm"
BPTT = 1024  # --bptt of the README commands
MAX_MEMORY = 5000  # num_max_positions (len(pos_emb)), not stored in the checkpoint
SOURCE_FILE = "the checkpoint Smerity/sha-rnn's main.py saved (--save ENWIK8.pt) or a SHARNN state dict"
LAYER_NORMS = ("lnstart", "lnmid", "lnmem", "lnff", "lnxff")
UNUSED_LAYER_NORM = "lnout"
LSTM_WEIGHTS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
LEGACY_ATTN = ("qkvs", "r_gate")


@dataclass
class ShaRnnSource:
    """The original ``SHARNN`` weights and the sizes inferred from their shapes."""

    state: Dict[str, Tensor]
    vocab_size: int  # V
    dim: int  # d = emsize
    ffn: int  # d_ff = nhid
    layers: int
    attn_layers: List[int]
    collapsed: bool  # vq_collapse() was applied: no vq.l1, vs is the gate as is
    info: Dict[str, Any] = field(default_factory=dict)


def _model_state(obj: Any) -> Dict[str, Tensor]:
    """The SHARNN's state dict from ``[model, criterion]`` (pickled modules), a bare pickled model or a state dict."""
    if isinstance(obj, (list, tuple)):
        if not obj:
            raise ConversionError("the checkpoint is an empty list; expected [model, criterion] (main.py model_save)")
        obj = obj[0]
    if isinstance(obj, Mapping):
        if "cfg" in obj:
            raise ConversionError("this is a fairseq checkpoint (it has 'cfg'), not an original sha-rnn one")
        state = {str(k): v for k, v in obj.items()}
    elif isinstance(obj, torch.nn.Module):
        name = pickled_class_name(obj)
        if name != "SHARNN":
            raise ConversionError(f"expected a pickled model.SHARNN as the first element, got {name}")
        state = module_state(obj)
    else:
        raise ConversionError(f"unrecognised checkpoint ({type(obj).__name__}); expected main.py's [model, criterion] "
                              f"list or a SHARNN state dict")
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise ConversionError(f"model entries {bad[:4]} are not tensors")
    return state


def _shape(state: Mapping[str, Tensor], key: str) -> tuple:
    if key not in state:
        raise ConversionError(f"the checkpoint lacks {key!r}; is this an original sha-rnn SHARNN checkpoint?")
    return tuple(state[key].shape)


def read_source(obj: Any) -> ShaRnnSource:
    """A loaded original checkpoint -> ShaRnnSource (sizes, attention blocks, collapsed or not)."""
    state = _model_state(obj)
    vocab_size, dim = _shape(state, "encoder.weight")
    layer_ids = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    if not layer_ids or layer_ids != list(range(len(layer_ids))):
        raise ConversionError(f"block indices {layer_ids[:8]} are not 0..n-1")
    ffn = _shape(state, "blocks.0.ff.linear1.weight")[0]
    attn = [i for i in layer_ids if f"blocks.{i}.attn.q.weight" in state]
    with_vq = [i for i in attn if f"blocks.{i}.attn.vq.l1.weight" in state]
    if with_vq and with_vq != attn:
        raise ConversionError(f"blocks {with_vq} have the Overparam value gate (attn.vq.l1) and blocks "
                              f"{sorted(set(attn) - set(with_vq))} not: vq_collapse() applies to all or none")
    return ShaRnnSource(state, vocab_size, dim, ffn, len(layer_ids), attn, bool(attn) and not with_vq)


def _tied_output(r: StateReader, src: ShaRnnSource) -> None:
    """``decoder.weight`` must equal ``encoder.weight`` (the original forces tying)."""
    enc = r.get("encoder.weight", (src.vocab_size, src.dim))
    if r.has("decoder.weight"):
        dec = r.get("decoder.weight", (src.vocab_size, src.dim))
        if dec is not enc and not torch.equal(dec, enc):
            raise ConversionError("decoder.weight differs from encoder.weight; sha_rnn_lm ties them (as the original "
                                  "SHARNN, which forces args.tied)")


def convert_weights(src: ShaRnnSource, mapping: VocabMapping, dead_bias: float = DEAD_BIAS,
                    dtype: Optional[torch.dtype] = torch.float32) -> Dict[str, Tensor]:
    """Original SHARNN weights -> sha_rnn_lm state dict, vocabulary rows in fairseq order."""
    dropped = [k for k in src.state if k.split(".")[2:3] == [UNUSED_LAYER_NORM] or
               (len(k.split(".")) == 4 and k.split(".")[2] == "attn" and k.split(".")[3] in LEGACY_ATTN)]
    r = StateReader(src.state, dtype, dropped)
    d, n_fs = src.dim, len(mapping.symbols)
    _tied_output(r, src)
    out: Dict[str, Tensor] = {
        PREFIX + "embed_tokens.weight": gather_rows(r.get("encoder.weight"), mapping, 0, n_fs, 0, 0.0),
        PREFIX + "output_bias": gather_rows(r.get("decoder.bias", (src.vocab_size,)), mapping, 0, n_fs, 0, 0.0),
        **dead_rows_state(PREFIX + "dead_rows.", n_fs, mapping.dead, dead_bias),
    }
    for layer in range(src.layers):
        p, q = f"blocks.{layer}.", f"{PREFIX}layers.{layer}."
        for name in LSTM_WEIGHTS:
            shape = (4 * d, d) if name.startswith("weight") else (4 * d,)
            out[q + "rnn." + name] = r.get(p + "rnn." + name, shape)
        for name in LAYER_NORMS:
            for part in ("weight", "bias"):
                out[f"{q}{name}.{part}"] = r.get(f"{p}{name}.{part}", (d,))
        out[q + "ff.linear1.weight"] = r.get(p + "ff.linear1.weight", (src.ffn, d))
        out[q + "ff.linear1.bias"] = r.get(p + "ff.linear1.bias", (src.ffn,))
        if layer not in src.attn_layers:
            continue
        for name in ("qs", "ks", "vs"):
            out[f"{q}attn.{name}"] = r.get(f"{p}attn.{name}", (1, 1, d)).reshape(d).clone()
        parts = [("q", (d, d), (d,)), ("qln", (d,), (d,))]
        if not src.collapsed:
            parts.append(("vq.l1", (2 * d, d), (2 * d,)))
        for name, w_shape, b_shape in parts:
            out[f"{q}attn.{name}.weight"] = r.get(f"{p}attn.{name}.weight", w_shape)
            out[f"{q}attn.{name}.bias"] = r.get(f"{p}attn.{name}.bias", b_shape)
    unused = r.unused()
    if unused:
        raise ConversionError(f"the checkpoint has weights the conversion does not use: {unused[:8]}"
                              f"{' ...' if len(unused) > 8 else ''}")
    return out


def attn_layers_field(src: ShaRnnSource) -> str:
    """The explicit ``attn_layers`` list ("0,2"); "none" for a model without attention."""
    return ",".join(str(i) for i in src.attn_layers) or "none"


def model_fields(src: ShaRnnSource, *, max_memory: int = MAX_MEMORY, dropout: float = 0.0, dropouti: float = 0.0,
                 dropouth: float = 0.0) -> Dict[str, Any]:
    """``sha_rnn_lm`` config values (plain types). Dropouts default to 0 (the README's 0.1 acts only in training)."""
    return {"decoder_layers": src.layers, "decoder_embed_dim": src.dim, "decoder_ffn_embed_dim": src.ffn,
            "dropout": float(dropout), "dropouti": float(dropouti), "dropouth": float(dropouth),
            "attn_layers": attn_layers_field(src), "max_memory": int(max_memory),
            "collapse_value_gate": bool(src.collapsed)}


def convert_sha_rnn(src: ShaRnnSource, symbols: Sequence[str], *, dead_bias: float = DEAD_BIAS,
                    data: str = "data-bin", tokens_per_sample: int = BPTT, max_memory: int = MAX_MEMORY,
                    dropout: float = 0.0, dropouti: float = 0.0, dropouth: float = 0.0,
                    dtype: Optional[torch.dtype] = torch.float32) -> Conversion:
    """ShaRnnSource + the rebuilt vocabulary -> fairseq checkpoint for ``sha_rnn_lm``."""
    symbols = list(symbols)
    check_text_vocabulary(symbols, src.vocab_size, "encoder",
                          "Pass the preprocessed train.txt the model was trained on (enwik8: 205 types, newlines kept "
                          "as lines); the original dictionary also continues over valid.txt and test.txt "
                          "(--valid-txt, --test-txt)", dead_bias)
    check_memory_window(max_memory, tokens_per_sample)
    fields = model_fields(src, max_memory=max_memory, dropout=dropout, dropouti=dropouti, dropouth=dropouth)
    checkpoint, mapping, _ = plain_vocab_checkpoint(
        symbols, lambda m: convert_weights(src, m, dead_bias, dtype), fields, data=data, arch=ARCH,
        tokens_per_sample=tokens_per_sample, provenance_key="converted_from_sha_rnn",
        source="Smerity/sha-rnn checkpoint", info=src.info, dead_bias=dead_bias,
        sizes={"vocab": src.vocab_size, "dim": src.dim, "ffn": src.ffn, "layers": src.layers,
               "attn_layers": list(src.attn_layers), "collapsed": src.collapsed})
    logger.info("converted: %d blocks, d %d, d_ff %d, attention in %s (%s value gate), vocabulary %d -> %d (dead ids "
                "%s)", src.layers, src.dim, src.ffn, src.attn_layers or "none",
                "collapsed" if src.collapsed else "Overparam", src.vocab_size, len(mapping.symbols), mapping.dead)
    return Conversion(checkpoint, mapping, fields)


# ======================================================================================================================
# Command line
# ======================================================================================================================
def build_parser() -> argparse.ArgumentParser:
    parser = converter_parser(
        "Convert a checkpoint saved by the original Smerity/sha-rnn main.py (torch.save([model, criterion])), or a "
        "SHARNN state dict, into a fairseq checkpoint for --arch sha_rnn_lm plus the fairseq dict.txt it needs. The "
        "vocabulary is rebuilt from the original train.txt.",
        "original checkpoint (e.g. ENWIK8.pt written by main.py --save)",
        "then evaluate as the original (test: 8 streams, T 1024, state carried):\n"
        "  fairseq-eval-lm <data-bin dir> --user-dir fairseq_ext --task streaming_lm --path OUT_DIR/model.pt "
        "--batch-size 8 --tokens-per-sample 1024 --gen-subset test\nSee docs/convert-sha-rnn.md.")
    add_text_vocab_arguments(parser, train_required=True)
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow unpickling SRC (main.py saves whole pickled modules) through the class shim "
                             "(only for files you trust)")
    parser.add_argument("--tokens-per-sample", type=int, default=BPTT,
                        help=f"segment length T stored in the config (default {BPTT}, the README's --bptt)")
    parser.add_argument("--max-memory", type=int, default=MAX_MEMORY,
                        help=f"attention window W (default {MAX_MEMORY}, the original's num_max_positions)")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout stored in the config (default 0)")
    parser.add_argument("--dropouti", type=float, default=0.0, help="dropouti stored in the config (default 0)")
    parser.add_argument("--dropouth", type=float, default=0.0, help="dropouth stored in the config (default 0)")
    add_output_arguments(parser, "output bias of the fairseq specials the original vocabulary lacks (default -40)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Conversion:
    args = parse_command_line(build_parser, argv)
    src = read_source(load_pickled(args.src, args.trust_pickle,
                                   contents="the original model.SHARNN and splitcross.SplitCrossEntropyLoss modules",
                                   expected=SOURCE_FILE))
    symbols = text_vocabulary(args.train_txt, args.valid_txt, args.test_txt)
    out_dir = os.path.abspath(args.out_dir)
    conversion = convert_sha_rnn(src, symbols, dead_bias=args.dead_bias, data=out_dir,
                                 tokens_per_sample=args.tokens_per_sample, max_memory=args.max_memory,
                                 dropout=args.dropout, dropouti=args.dropouti, dropouth=args.dropouth)
    return finish_text_conversion(conversion, out_dir, ARCH, args.no_verify)


if __name__ == "__main__":  # pragma: no cover  (a UserError prints as one line: fairseq_ext.compat.errors)
    main()
