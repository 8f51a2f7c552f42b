"""Convert checkpoints of the ALiBi fork (ofirpress/attention_with_linear_biases, fairseq ``acf3124``) to ``alibi_lm``.

The fork stores ``cfg['model']['_name'] == 'transformer_lm_wiki103'`` plus its own ``max_tokens`` field. Loaded as is,
fairseq resolves that name to the stock ``transformer_lm``, which re-adds sinusoidal positions and drops the bias:
perplexity is silently wrong. This rewrite (shared/specs/alibi.md §5):

1. maps the arch to the matching ``alibi_lm`` preset and records the bias form;
2. deletes the fork-only ``max_tokens`` config field;
3. drops ``embed_positions`` keys (the fork built the module but never added its output);
4. keeps only plain values (tensors, numbers, strings and containers of them), i.e. types torch's weights-only loader accepts (fairseq loads
   checkpoints with ``torch.load``'s weights-only default), so ``fairseq-eval-lm`` can read the result.
"""
import argparse
import logging
import pickle
from typing import Any, Dict

import torch

logger = logging.getLogger(__name__)

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


class ConversionError(ValueError):
    pass


def _model_cfg(state: Dict[str, Any]) -> Dict[str, Any]:
    cfg = state.get("cfg")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        return cfg["model"]
    if state.get("args") is not None:
        raise ConversionError("this checkpoint stores an argparse Namespace ('args'), not a 'cfg' dict; the ALiBi "
                              "fork's released checkpoints store 'cfg'. Re-save it with fairseq's "
                              "checkpoint_utils.load_checkpoint_to_cpu (which upgrades args to cfg) first")
    raise ConversionError("not a fairseq checkpoint: no 'cfg' with a 'model' section")


def convert_alibi_fork_state(state: Dict[str, Any], bias_form: str = "relative") -> Dict[str, Any]:
    """Return a new checkpoint dict for ``alibi_lm``; ``state`` is left unchanged."""
    model_cfg = dict(_model_cfg(state))
    arch = model_cfg.get("_name") or model_cfg.get("arch")
    if arch in ARCH_MAP.values():
        raise ConversionError(f"checkpoint is already an alibi_lm checkpoint (arch {arch!r})")
    if arch not in ARCH_MAP:
        raise ConversionError(f"checkpoint of arch {arch!r} is not an ALiBi-fork transformer_lm checkpoint; "
                              f"expected one of {sorted(ARCH_MAP)}")
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
    """Load with torch's weights-only unpickler; full unpickling only when the caller trusts the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise ConversionError(f"{path} holds pickled Python objects beyond tensors and plain containers (fairseq "
                                  f"meters, optimizer state). If you trust the file, re-run with --trust-pickle. "
                                  f"({err.__class__.__name__}: {str(err).splitlines()[0]})") from err
        logger.warning("loading %s with full unpickling (--trust-pickle)", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="checkpoint from the ALiBi fork (e.g. alibi_wt103_L512.pt)")
    parser.add_argument("dst", help="where to write the converted checkpoint (e.g. checkpoints/checkpoint_best.pt)")
    parser.add_argument("--bias-form", choices=("relative", "key_index"), default="relative",
                        help="relative (default, exact in any precision) or key_index (the fork's exact form)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow full unpickling of SRC (needed when it contains optimizer/meter objects)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    converted = convert_alibi_fork_state(load_checkpoint(args.src, args.trust_pickle), args.bias_form)
    torch.save(converted, args.dst)
    torch.load(args.dst, map_location="cpu", weights_only=True)  # fairseq will load it this way
    print(f"wrote {args.dst}: arch {converted['cfg']['model']['_name']}, {len(converted['model'])} tensors")
