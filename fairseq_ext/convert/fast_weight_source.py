"""Reading lmtool-fwms's pickled ``MemTransformerLM`` (``best_model.pt`` / ``latest_model.pt``, loaded through the
class shim) as an ``LmtoolSource``: the configuration from module attributes, ties from tensor identity, the
Performer matrices per layer, and a clear error for every attention type ``fast_weight_lm`` does not load."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .errors import ConversionError, ConversionFlagError
from .pickled import (module_state, pickled_adaptive_softmax, pickled_attr, pickled_child, pickled_class_name,
                      same_tensor, unwrap_pickled_model)
from .xl_weights import MemTransformerShape

ARCH = "fast_weight_lm"
CARRY_OVER_REQUIRED = (
    "attn_type {code} can carry its fast weights across segments, and lmtool's model file does not record whether "
    "it was trained that way (a carry-over model evaluated without it is ~0.4 nats off after the first segment): "
    "pass --carry-over-fast-weight on|off, 'on' when the training command had --carry_over_fast_weight (train.py "
    "logs every argument at the top of the work_dir's log.txt: 'carry_over_fast_weight : True'; the *_carry_over_* "
    "scripts set it)")
# attn_type -> (projection layout, feature map, lmtool attention classes)
QKVB, QKV, Q_KV = "qkvb_net", "qkv_net", "q_net/kv_net"
LAYOUTS = {
    2: (Q_KV, "softmax", ("MultiHeadAttn",)),
    4: (Q_KV, "linear", ("LinearMultiHeadAttn",)),
    5: (Q_KV, "performer", ("PerformerMultiHeadAttn",)),
    6: (Q_KV, "dpfp", ("DPFPMultiHeadAttn",)),
    24: (QKVB, "linear", ("CudaFastWeightLinearTransformerLayer",)),
    25: (QKVB, "performer", ("CudaFastWeightPerformerLayer",)),
    26: (QKVB, "dpfp", ("CudaFastWeightDPFPTransformerLayer",)),
    34: (QKV, "linear", ("CudaFastWeightSumLinearTransformerLayer",)),
    35: (QKV, "performer", ("CudaFastWeightSumPerformerLayer",)),
    44: (QKVB, "linear", ("CudaNormFastWeightLinearTransformerLayer",)),
    45: (QKVB, "performer", ("CudaNormFastWeightPerformerLayer",)),
    46: (QKVB, "dpfp", ("CudaNormFastWeightDPFPTransformerLayer",)),
}


@dataclass(kw_only=True)
class LmtoolConfig(MemTransformerShape):
    """What the conversion needs from lmtool's ``MemTransformerLM`` (original names)."""

    attn_type: int
    no_pos: bool = False
    skip_attn_normalization: bool = False
    performer_proj_dim: int = 16
    dpfp_n_roll: int = 2
    carry_over_fast_weight: bool = False


@dataclass
class LmtoolSource:
    """An lmtool checkpoint in original key names, its configuration and the Performer matrices per layer."""

    config: LmtoolConfig
    state: Dict[str, Tensor]
    omegas: List[Optional[Tensor]] = field(default_factory=list)  # per layer (d, m) or None
    description: str = "lmtool-fwms MemTransformerLM (pickled best_model.pt / latest_model.pt)"


def reject_attn_type(code: int) -> None:
    """A clear error for every lmtool attention type ``fast_weight_lm`` does not load."""
    from fairseq_ext.models.fast_weight_lm import LMTOOL_UNSUPPORTED

    if code == 0:
        raise ConversionError("lmtool attn_type 0 is Transformer-XL's relative attention with memory (medium_"
                              "transformer-xl_baseline.sh): its MemTransformerLM is Transformer-XL's; convert it with "
                              "scripts/convert_transformer_xl_checkpoint.py (--arch transformer_xl_lm)")
    reason = LMTOOL_UNSUPPORTED.get(code, "not one of the paper's attention types (follow-up recurrent-fwp codes such "
                                          "as 54, 64, 124, 224-254, 934 are not implemented)")
    raise ConversionError(f"lmtool attn_type {code} cannot be converted to {ARCH}: {reason}; supported: "
                          f"{sorted(LAYOUTS)}")


def _layer_attr(attns: Sequence[Any], name: str, what: str) -> Any:
    """An attribute every attention module has with one value (None when none has it)."""
    values = [pickled_attr(a, name) for a in attns]
    if all(v is None for v in values):
        return None
    if any(v is None for v in values) or len({repr(v) for v in values}) != 1:
        raise ConversionError(f"the layers disagree on {name} ({what}): {values}")
    return values[0]


def read_lmtool_model(root: Any, carry_over_fast_weight: Optional[bool] = None,
                      assume_raw_sum_features: bool = False) -> LmtoolSource:
    """The pickled ``MemTransformerLM`` (loaded with the shim) -> LmtoolSource. ``carry_over_fast_weight`` is a
    training flag, not a model attribute: None reads an attribute of that name if present; without one it must be
    given for the layers that can carry (``CARRY_OVER_REQUIRED``), and is off for the others."""
    root = unwrap_pickled_model(root, "MemTransformerLM", "lmtool's train.py best_model.pt / latest_model.pt")
    code = int(pickled_attr(root, "attn_type", 0))
    if code not in LAYOUTS:
        reject_attn_type(code)
    _, feature_map, classes = LAYOUTS[code]
    state = module_state(root)
    layers = pickled_child(root, "layers")
    n_layer = int(pickled_attr(root, "n_layer", len(pickled_attr(layers, "_modules", {}))))
    attns = [pickled_child(pickled_child(layers, str(i)), "dec_attn") for i in range(n_layer)]
    if any(a is None for a in attns):
        raise ConversionError(f"the pickled model lacks layers.{{0..{n_layer - 1}}}.dec_attn")
    for i, attn in enumerate(attns):
        if pickled_class_name(attn) not in classes:
            raise ConversionError(f"layers.{i}.dec_attn is a {pickled_class_name(attn)}, but attn_type {code} builds "
                                  f"{' / '.join(classes)}; the checkpoint's code differs from lmtool-fwms")
    crit = pickled_child(root, "crit")
    n_token, crit_cutoffs = pickled_adaptive_softmax(root, ARCH)
    normalize = _layer_attr(attns, "normalize_attn_scores", "skip_attn_normalization")
    d_head = int(pickled_attr(root, "d_head"))
    omegas: List[Optional[Tensor]] = [None] * n_layer
    proj_dim = 16
    if feature_map == "performer":
        for i, attn in enumerate(attns):
            omega = pickled_attr(attn, "proj_matrix")
            if not torch.is_tensor(omega) or omega.dim() != 2 or omega.shape[0] != d_head:
                raise ConversionError(f"layers.{i}.dec_attn.proj_matrix should be the Performer matrix (d_head "
                                      f"{d_head}, proj_dim), got {getattr(omega, 'shape', omega)!r}")
            omegas[i] = omega.detach()
        proj_dim = int(omegas[0].shape[1])
        if any(o.shape != omegas[0].shape for o in omegas):
            raise ConversionError(f"the layers' proj_matrix shapes differ: {[tuple(o.shape) for o in omegas]}")
        stored = _layer_attr(attns, "proj_dim", "performer_proj_dim")
        if stored is not None and int(stored) != proj_dim:
            raise ConversionError(f"proj_dim {stored} but proj_matrix has {proj_dim} columns")
    n_roll = _layer_attr(attns, "n_roll", "dpfp_n_roll") if feature_map == "dpfp" else None
    if feature_map == "dpfp" and n_roll is None:
        raise ConversionError("the DPFP attention modules have no n_roll attribute")
    if code in (34, 35):
        sum_norm = _layer_attr(attns, "use_sum_norm", "use_sum_norm")
        if sum_norm:
            raise ConversionError(f"attn_type {code} with use_sum_norm=True (sum-normalised phi in the sum rule) is not "
                                  f"implemented by {ARCH} (its sum rule uses the raw feature map, lmtool's default)")
        if sum_norm is None and not assume_raw_sum_features:
            raise ConversionError(f"the attn_type {code} layers have no use_sum_norm attribute: lmtool versions before "
                                  f"that flag sum-normalised phi(q), phi(k) in the sum rule, which {ARCH} does not "
                                  f"implement. If this checkpoint used raw features, pass --assume-raw-sum-features")
    if carry_over_fast_weight is None:
        carry_over_fast_weight = pickled_attr(root, "carry_over_fast_weight", None)
    if carry_over_fast_weight is None and LAYOUTS[code][0] != Q_KV:
        raise ConversionFlagError(CARRY_OVER_REQUIRED.format(code=code))
    drop = pickled_child(root, "drop")
    dropatt = pickled_child(attns[0], "dropatt")
    word_emb = pickled_child(root, "word_emb")
    cfg = LmtoolConfig(
        attn_type=code, n_token=n_token, n_layer=n_layer, n_head=int(pickled_attr(root, "n_head")),
        d_model=int(pickled_attr(root, "d_model")), d_head=d_head,
        d_inner=int(state["layers.0.pos_ff.CoreNet.0.weight"].shape[0]),
        d_embed=int(pickled_attr(root, "d_embed", pickled_attr(word_emb, "d_embed", pickled_attr(root, "d_model")))),
        div_val=int(pickled_attr(crit, "div_val", pickled_attr(word_emb, "div_val", 1))), cutoffs=crit_cutoffs[:-1],
        tgt_len=int(pickled_attr(root, "tgt_len", 0)), mem_len=int(pickled_attr(root, "mem_len", 0)),
        clamp_len=int(pickled_attr(root, "clamp_len", -1)), no_pos=bool(pickled_attr(root, "no_pos", False)),
        pre_lnorm=bool(pickled_attr(attns[0], "pre_lnorm", False)),
        sample_softmax=int(pickled_attr(root, "sample_softmax", -1)),
        dropout=float(pickled_attr(drop, "p", 0.0)) if drop is not None else 0.0,
        dropatt=float(pickled_attr(dropatt, "p", 0.0)) if dropatt is not None else 0.0,
        skip_attn_normalization=normalize is not None and not normalize, performer_proj_dim=proj_dim,
        dpfp_n_roll=int(n_roll) if n_roll is not None else 2, carry_over_fast_weight=bool(carry_over_fast_weight),
        tie_weight=same_tensor(state.get("crit.out_layers.0.weight"), state.get("word_emb.emb_layers.0.weight")))
    return LmtoolSource(cfg, state, omegas)


def read_source(obj: Any, carry_over_fast_weight: Optional[bool] = None,
                assume_raw_sum_features: bool = False) -> LmtoolSource:
    """Detect the format of a loaded checkpoint object (only lmtool's pickled model is convertible)."""
    if hasattr(obj, "__dict__") and "_modules" in obj.__dict__:
        return read_lmtool_model(obj, carry_over_fast_weight, assume_raw_sum_features)
    if isinstance(obj, Mapping) and any(str(k).startswith("word_emb.") for k in obj):
        raise ConversionError("this file is a bare MemTransformerLM state dict without its configuration; convert the "
                              "pickled best_model.pt / latest_model.pt instead, or call convert_fast_weight() with an "
                              "LmtoolSource from Python")
    if isinstance(obj, Mapping) and "optimizer_state_dict" in obj:
        raise ConversionError("this is lmtool's best_opt.pt / latest_opt.pt (optimizer state); convert "
                              "best_model.pt / latest_model.pt")
    raise ConversionError(f"unrecognised checkpoint ({type(obj).__name__}); expected lmtool's pickled "
                          f"best_model.pt / latest_model.pt")
