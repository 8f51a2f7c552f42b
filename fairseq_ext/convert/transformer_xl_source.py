"""Reading Transformer-XL checkpoints: the original ``kimiyoung/transformer-xl`` ``model.pt`` (a pickled
``MemTransformerLM``, loaded through the class shim; configuration from its attributes, ties from tensor identity)
and NVIDIA DeepLearningExamples ``checkpoint_*.pt`` (``model_state``, ``model_config``, ``vocab``), both as a
``SourceCheckpoint`` in original key names."""
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from torch import Tensor, nn

from .errors import ConversionError
from .pickled import (module_state, pickled_adaptive_softmax, pickled_attr, pickled_child, same_tensor,
                      unwrap_pickled_model, vocab_symbols)
from .xl_weights import MemTransformerShape

logger = logging.getLogger(__name__)


def reject_attn_type(attn_type: Any) -> None:
    raise ConversionError(f"attn_type {attn_type} is not supported: transformer_xl_lm implements the Transformer-XL "
                          f"relative attention (attn_type 0) only (1 = Shaw, 2 = vanilla absolute, 3 = Al-Rfou)")


@dataclass(kw_only=True)
class OriginalConfig(MemTransformerShape):
    """The ``MemTransformerLM`` settings the conversion needs (original names; NVIDIA's ``model_config`` keys)."""

    tie_projs: List[bool] = field(default_factory=lambda: [False])
    ext_len: int = 0
    same_length: bool = False
    attn_type: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
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
        reject_attn_type(attn_type)
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
