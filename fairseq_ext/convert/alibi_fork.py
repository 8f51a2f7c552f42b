"""Convert checkpoints of the ALiBi fork (ofirpress/attention_with_linear_biases, fairseq ``acf3124``) to ``alibi_lm``.

The fork stores ``cfg['model']['_name'] == 'transformer_lm_wiki103'`` plus its own ``max_tokens`` field. Loaded as is,
fairseq resolves that name to the stock ``transformer_lm``, which re-adds sinusoidal positions and drops the bias:
perplexity is silently wrong. This rewrite (shared/specs/alibi.md §5):

0. refuses a stock ``transformer_lm`` checkpoint. The weights of a fork model and of a stock one have the same names
   and shapes, and the fork's bias is neither a parameter nor a buffer, so only the config tells them apart: the
   fork's one-line change to ``TransformerLanguageModelConfig`` adds ``max_tokens`` (``II("task.max_tokens")``), which
   stock fairseq's config lacks, so every checkpoint the fork's trainer saves has ``cfg['model']['max_tokens']``
   (possibly None). Without it the source is taken for a stock model (converted, it would score a wrong perplexity
   without any error) unless ``--trained-with-alibi`` says otherwise (a fork checkpoint re-saved by stock fairseq,
   which drops the unknown field);

1. maps the arch to the matching ``alibi_lm`` preset and records the bias form;
2. deletes the fork-only ``max_tokens`` config field;
3. drops ``embed_positions`` keys (the fork built the module but never added its output);
4. keeps only plain values (tensors, numbers, strings and containers of them), i.e. types torch's weights-only loader accepts (fairseq loads
   checkpoints with ``torch.load``'s weights-only default), so ``fairseq-eval-lm`` can read the result.
"""
import argparse
import logging
import os
import pickle
from typing import Any, Dict, Optional, Sequence

import torch

from fairseq_ext.compat.inputs import check_torch_file, damaged_file_errors
from fairseq_ext.errors import MissingFileError

from .errors import ConversionError, ConversionFlagError  # noqa: F401  (ConversionError: re-exported)

logger = logging.getLogger(__name__)

SOURCE_FILE = ("a checkpoint of the ALiBi fork (ofirpress/attention_with_linear_biases): a released "
               "alibi_wt103_L*.pt or a checkpoint_*.pt written by its train.py")
FORK_MARKER = "max_tokens"  # the fork-only field of cfg['model'] (see the module docstring)
ACKNOWLEDGE_FLAG = "--trained-with-alibi"

ARCH_MAP = {
    "transformer_lm_wiki103": "alibi_lm_wiki103",
    "transformer_lm_baevski_wiki103": "alibi_lm_wiki103",
    "transformer_lm_gpt2_small": "alibi_lm_gpt2_small",
    "transformer_lm": "alibi_lm",
}
FORK_ONLY_FIELDS = ("max_tokens",)
KEEP_TOP_LEVEL = ("args", "cfg", "model", "optimizer_history", "extra_state")
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)
_DROP = object()


def _plain(value: Any) -> Any:
    """Keep tensors, numbers, strings and containers of them; drop anything else (fairseq meters, ...)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        kept = {k: _plain(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not _DROP}
    if isinstance(value, (list, tuple)):
        kept = [_plain(v) for v in value]
        return type(value)(v for v in kept if v is not _DROP)
    return _DROP


def _model_cfg(state: Any) -> Dict[str, Any]:
    if not isinstance(state, dict):
        raise ConversionError(f"not a fairseq checkpoint: it holds a {type(state).__name__}, not a dict with 'cfg' and "
                              f"'model'; pass {SOURCE_FILE}")
    cfg = state.get("cfg")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        return cfg["model"]
    if state.get("args") is not None:
        raise ConversionError("this checkpoint stores an argparse Namespace ('args'), not a 'cfg' dict; the ALiBi "
                              "fork's released checkpoints store 'cfg'. Re-save it with fairseq's "
                              "checkpoint_utils.load_checkpoint_to_cpu (which upgrades args to cfg) first")
    raise ConversionError(f"not a fairseq checkpoint: no 'cfg' with a 'model' section; pass {SOURCE_FILE}")


def check_trained_with_alibi(model_cfg: Dict[str, Any], arch: str, trained_with_alibi: bool) -> None:
    """Refuse a source without the fork's config field unless the caller vouches that it was trained with ALiBi."""
    if FORK_MARKER in model_cfg:
        return
    if trained_with_alibi:
        logger.warning("cfg['model'] has no %r (the ALiBi fork's config field): converting anyway (%s); if this "
                       "model was trained without ALiBi, the converted model's perplexity is wrong", FORK_MARKER,
                       ACKNOWLEDGE_FLAG)
        return
    raise ConversionFlagError(
        f"this {arch} checkpoint looks like stock fairseq's, not the ALiBi fork's: its cfg['model'] lacks "
        f"{FORK_MARKER!r}, the field the fork adds to transformer_lm's config. A model trained without ALiBi "
        f"(sinusoidal or learned positions) converted to alibi_lm scores a wrong perplexity without any error, and "
        f"nothing else in a checkpoint (same weight names and shapes; the bias is not stored) tells the two apart. "
        f"Convert a released alibi_wt103_L*.pt or a checkpoint of the fork's train.py, or, if this model was trained "
        f"by the fork and re-saved by stock fairseq (which drops the field), re-run with {ACKNOWLEDGE_FLAG}")


def convert_alibi_fork_state(state: Dict[str, Any], bias_form: str = "relative",
                             trained_with_alibi: bool = False) -> Dict[str, Any]:
    """Return a new checkpoint dict for ``alibi_lm``; ``state`` is left unchanged. ``trained_with_alibi``: convert a
    source without the fork's ``max_tokens`` config field (module docstring, step 0)."""
    model_cfg = dict(_model_cfg(state))
    arch = model_cfg.get("_name") or model_cfg.get("arch")
    if arch in ARCH_MAP.values():
        raise ConversionError(f"checkpoint is already an alibi_lm checkpoint (arch {arch!r}): evaluate it as it is")
    if arch not in ARCH_MAP:
        raise ConversionError(f"checkpoint of arch {arch!r} is not an ALiBi-fork transformer_lm checkpoint; "
                              f"expected one of {sorted(ARCH_MAP)}")
    check_trained_with_alibi(model_cfg, arch, trained_with_alibi)
    new_arch = ARCH_MAP[arch]
    for name in FORK_ONLY_FIELDS:
        model_cfg.pop(name, None)
    model_cfg["_name"] = new_arch
    if "arch" in model_cfg:
        model_cfg["arch"] = new_arch
    model_cfg["no_token_positional_embeddings"] = True
    model_cfg["alibi_bias_form"] = bias_form
    model_cfg.setdefault("attn_impl", "auto")

    cfg = dict(state["cfg"])
    cfg["model"] = model_cfg
    weights = {k: v for k, v in state["model"].items() if "embed_positions" not in k}
    dropped = len(state["model"]) - len(weights)
    out = {k: _plain(state[k]) for k in KEEP_TOP_LEVEL if k in state}
    out.update(cfg=cfg, model=weights)
    logger.info("converted %s -> %s: %d tensors kept, %d embed_positions entries dropped, bias form %s",
                arch, new_arch, len(weights), dropped, bias_form)
    return out


def load_checkpoint(path: str, trust_pickle: bool = False) -> Dict[str, Any]:
    """Load with torch's weights-only unpickler; full unpickling only when the caller trusts the file. A file that
    is no torch checkpoint at all (empty, truncated, text) is a ``DataError`` (``fairseq_ext.compat.inputs``)."""
    if not os.path.exists(path):
        raise MissingFileError(f"{path} does not exist; pass {SOURCE_FILE}")
    check_torch_file(path, SOURCE_FILE)
    try:
        with damaged_file_errors(path, SOURCE_FILE):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise ConversionError(f"{path} holds pickled Python objects beyond tensors and plain containers (fairseq "
                                  f"meters, optimizer state). If you trust the file, re-run with --trust-pickle. "
                                  f"({err.__class__.__name__}: {str(err).splitlines()[0]})") from err
        logger.warning("loading %s with full unpickling (--trust-pickle)", path)
        with damaged_file_errors(path, SOURCE_FILE):
            return torch.load(path, map_location="cpu", weights_only=False)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="checkpoint from the ALiBi fork (e.g. alibi_wt103_L512.pt)")
    parser.add_argument("dst", help="where to write the converted checkpoint (e.g. checkpoints/checkpoint_best.pt)")
    parser.add_argument("--bias-form", choices=("relative", "key_index"), default="relative",
                        help="relative (default, exact in any precision) or key_index (the fork's exact form)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow full unpickling of SRC (needed when it contains optimizer/meter objects)")
    parser.add_argument(ACKNOWLEDGE_FLAG, action="store_true",
                        help=f"convert SRC although its cfg['model'] lacks the fork's {FORK_MARKER!r} field (a fork "
                             f"checkpoint re-saved by stock fairseq). Only for models trained with ALiBi: a stock "
                             f"transformer_lm converted this way scores a wrong perplexity without any error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    converted = convert_alibi_fork_state(load_checkpoint(args.src, args.trust_pickle), args.bias_form,
                                         args.trained_with_alibi)
    torch.save(converted, args.dst)
    torch.load(args.dst, map_location="cpu", weights_only=True)  # fairseq will load it this way
    print(f"wrote {args.dst}: arch {converted['cfg']['model']['_name']}, {len(converted['model'])} tensors")
