"""The fairseq side of a conversion: the dictionary and ``dict.txt``, a complete config for ``--task streaming_lm``,
the weights-only-loadable checkpoint (``Conversion``), a strict load check, and the files written."""
import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .vocab_mapping import DEFAULT_SYMBOL_MAP, FAIRSEQ_SPECIALS, VocabMapping, build_vocab_mapping

PREFIX = "decoder."  # every converted weight's key: the fairseq model's decoder
PREPROCESS_HINT = ("fairseq-preprocess --only-source --srcdict {dict} --trainpref <train.txt> --validpref "
                   "<valid.txt> --testpref <test.txt> --destdir <data-bin dir>")


@dataclass
class Conversion:
    """The converted checkpoint (weights-only safe), the fairseq dictionary and the id mapping."""

    checkpoint: Dict[str, Any]
    mapping: VocabMapping
    model_cfg: Dict[str, Any]


def fairseq_dictionary(symbols: Sequence[str]) -> Any:
    """A fairseq Dictionary holding exactly ``symbols`` (the 4 specials first) in this order."""
    from fairseq.data import Dictionary

    dictionary = Dictionary()
    for sym in symbols[len(FAIRSEQ_SPECIALS):]:
        dictionary.add_symbol(sym)
    if dictionary.symbols != list(symbols):
        raise RuntimeError("fairseq's Dictionary reorders the converted symbols; this is a converter bug")
    return dictionary


def fairseq_cfg(fields: Mapping[str, Any], data: str, arch: str, tokens_per_sample: int) -> Dict[str, Any]:
    """A complete fairseq config (plain containers) for --task streaming_lm --arch ARCH --criterion lm_loss, with
    the model fields replaced by ``fields`` (each must be a field of the model's config)."""
    import fairseq_ext  # noqa: F401  (registers the model, task and criterion)
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data, "--task", "streaming_lm", "--arch", arch, "--criterion",
                                                "lm_loss", "--tokens-per-sample", str(tokens_per_sample)])
    cfg = OmegaConf.to_container(convert_namespace_to_omegaconf(args), resolve=True)
    unknown = set(fields) - set(cfg["model"])
    if unknown:
        raise RuntimeError(f"{arch} has no config fields {sorted(unknown)}; converter and model disagree (a bug)")
    cfg["model"].update(fields)
    return cfg


def fairseq_checkpoint(cfg: Dict[str, Any], weights: Dict[str, Tensor], symbols: Sequence[str],
                       provenance_key: str, provenance: Dict[str, Any]) -> Dict[str, Any]:
    """A fairseq checkpoint of plain containers and tensors (weights-only loadable) without optimizer state; the task
    state holds the dictionary fingerprint that ``--task streaming_lm`` checks against the data."""
    from fairseq_ext.tasks.dictionary_check import STATE_KEY, dictionary_fingerprint

    return {
        "args": None,
        "cfg": cfg,
        "model": weights,
        "optimizer_history": [{"criterion_name": "LMLossCriterion", "optimizer_name": "converted",
                               "lr_scheduler_state": {"best": None}, "num_updates": 0}],
        "task_state": {STATE_KEY: dictionary_fingerprint(fairseq_dictionary(symbols))},
        "extra_state": {provenance_key: provenance},
        "last_optimizer_state": None,
    }


def plain_vocab_checkpoint(symbols: Sequence[str], convert: Callable[[VocabMapping], Dict[str, Tensor]],
                           fields: Dict[str, Any], *, data: str, arch: str, tokens_per_sample: int,
                           provenance_key: str, source: str, info: Mapping[str, Any], sizes: Dict[str, Any],
                           dead_bias: float) -> Tuple[Dict[str, Any], VocabMapping, Dict[str, Tensor]]:
    """Map a rebuilt vocabulary without clusters (default specials), convert the weights into it (``convert``) and
    wrap them in a fairseq checkpoint with the usual provenance. Returns (checkpoint, mapping, weights)."""
    mapping = build_vocab_mapping(symbols, [], DEFAULT_SYMBOL_MAP)
    weights = convert(mapping)
    provenance = {
        "source": source, **info, "sizes": sizes,
        "mapped_symbols": dict(mapping.mapped), "dead_ids": mapping.dead, "dead_bias": float(dead_bias),
    }
    checkpoint = fairseq_checkpoint(fairseq_cfg(fields, data, arch, tokens_per_sample), weights, mapping.symbols,
                                    provenance_key, provenance)
    return checkpoint, mapping, weights


def write_dictionary(path: str, symbols: Sequence[str]) -> None:
    """fairseq dict.txt: every symbol after the 4 specials, in id order; counts decrease so that even a
    count-sorting ``Dictionary.finalize`` would keep the order."""
    body = symbols[len(FAIRSEQ_SPECIALS):]
    with open(path, "w", encoding="utf-8") as f:
        for rank, sym in enumerate(body):
            f.write(f"{sym} {len(body) - rank}\n")


def verify_strict_load(build: Callable[[], nn.Module], weights: Mapping[str, Tensor], arch: str) -> None:
    """Build the model (on the meta device: no memory, no init cost) and load ``weights`` strictly; any name or shape
    disagreement between converter and model is reported before the user meets it."""
    with torch.device("meta"):
        model = build()
    try:  # nn.Module's own loader (fairseq's takes no ``assign``); assign: the meta model gets the real tensors
        missing, unexpected = nn.Module.load_state_dict(model, weights, strict=False, assign=True)
    except RuntimeError as err:
        raise RuntimeError(f"converted weights do not fit {arch} (a converter bug): {err}") from err
    if missing or unexpected:
        raise RuntimeError(f"converted weights do not fit {arch} (a converter bug): missing {missing[:8]}, "
                           f"unexpected {unexpected[:8]}")


def verify_conversion(conversion: Conversion, build: Callable[[Any, Any], nn.Module], arch: str) -> None:
    """Build the model with ``build(cfg.model as a DictConfig, fairseq dictionary)`` from the converted config and
    load the converted weights strictly (``verify_strict_load``)."""
    from omegaconf import OmegaConf

    dictionary = fairseq_dictionary(conversion.mapping.symbols)
    cfg = OmegaConf.create(conversion.checkpoint["cfg"]["model"])
    verify_strict_load(lambda: build(cfg, dictionary), conversion.checkpoint["model"], arch)


def build_registered_model(cfg: Any, dictionary: Any) -> nn.Module:
    """``build`` for ``verify_conversion``: fairseq's registry builds the model of ``cfg`` (a language model over
    ``dictionary``)."""
    from fairseq import models

    return models.build_model(cfg, argparse.Namespace(source_dictionary=dictionary, target_dictionary=dictionary,
                                                      dictionary=dictionary))


def save_conversion(out_dir: str, checkpoint: Dict[str, Any], symbols: Sequence[str]) -> Tuple[str, str]:
    """Write OUT_DIR/model.pt and OUT_DIR/dict.txt; re-read model.pt the way fairseq does (weights only)."""
    os.makedirs(out_dir, exist_ok=True)
    model_path, dict_path = os.path.join(out_dir, "model.pt"), os.path.join(out_dir, "dict.txt")
    torch.save(checkpoint, model_path)
    write_dictionary(dict_path, symbols)
    torch.load(model_path, map_location="cpu", weights_only=True)
    return model_path, dict_path


def finish_conversion(conversion: Conversion, out_dir: str, arch: str,
                      verify: Optional[Callable[[Conversion], None]], note: str = "") -> Conversion:
    """``verify(conversion)`` (unless None: ``--no-verify``), then save and report it (``report_conversion``)."""
    if verify is not None:
        verify(conversion)
    report_conversion(out_dir, conversion.checkpoint, conversion.mapping, arch, note=note)
    return conversion


def report_conversion(out_dir: str, checkpoint: Dict[str, Any], mapping: VocabMapping, arch: str,
                      note: str = "") -> Tuple[str, str]:
    """Save (``save_conversion``) and print what was written, the dead specials and how to binarise text."""
    model_path, dict_path = save_conversion(out_dir, checkpoint, mapping.symbols)
    dead = [mapping.symbols[i] for i in mapping.dead]
    print(f"wrote {model_path} ({len(checkpoint['model'])} tensors, {arch}) and {dict_path} "
          f"({len(mapping.symbols)} types; {note}dead specials {dead})\n"
          f"binarise with: {PREPROCESS_HINT.format(dict=dict_path)}")
    return model_path, dict_path
