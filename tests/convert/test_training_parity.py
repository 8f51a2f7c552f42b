"""Converted checkpoints keep training like the originals: optimizer steps on the converted model equal the same
steps on the original-layout tensors (issue 15).

For every converter: a tiny original-format checkpoint (the converter tests' synthetic ones) is converted (float64),
then two steps of a per-tensor optimizer are taken twice with the same fixed gradients, once on the original tensors
(no dead vocabulary rows, the original's tensor partition) and once on the converted model's parameters (the
gradients converted like the weights). Converting the stepped original tensors must give the stepped model, every
tensor to 1e-6. Dead rows (fairseq specials the original lacks) live outside the trained tensors (zeros there, a
fixed logit in ``dead_rows``), so LAMB's per-tensor ‖w‖, Adagrad's per-tensor clip and weight decay see what the
original saw; before the fix the output bias carried the dead logit -40 and LAMB's trust ratio of that tensor was
several times the original's.

Fast weights: lmtool trains with Adam (per element), where the split of its fused ``qkvb_net`` into q/k/v/beta
projections is invisible, so every tensor is compared under Adam; under LAMB (never used by lmtool) the tensors that
map one to one (every vocabulary tensor included) are compared.
"""
from dataclasses import replace
from typing import Callable, Dict, Iterable, Tuple

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from fairseq_ext.convert.output import build_registered_model, fairseq_dictionary
from fairseq_ext.optim.adagrad_clip import AdagradClip
from fairseq_ext.optim.lamb import Lamb
from tests.harness import single_thread

one_thread = pytest.fixture(autouse=True)(single_thread)

Convert = Callable[[Dict[str, Tensor]], Tuple[Dict[str, Tensor], Dict]]  # original state -> (weights, cfg)


# ======================================================================================================================
# The tiny originals and their conversion (float64)
# ======================================================================================================================
def sha_rnn() -> Tuple[Dict[str, Tensor], Convert]:
    from fairseq_ext.convert.sha_rnn import convert_sha_rnn, read_source
    from tests.convert.test_sha_rnn_converter import VOCAB, synthetic_state

    def convert(state):
        conv = convert_sha_rnn(read_source(state), VOCAB, max_memory=8, tokens_per_sample=6, dtype=torch.float64)
        return conv.checkpoint["model"], conv.checkpoint["cfg"]

    return synthetic_state([0, 1], False), convert


def transformer_xl(layout: str, **changes) -> Callable[[], Tuple[Dict[str, Tensor], Convert]]:
    def make():
        from fairseq_ext.convert.transformer_xl import SourceCheckpoint, convert_transformer_xl
        from tests.convert.test_transformer_xl_converter import BASE, synthetic_state, word_vocab

        cfg = replace(BASE, **changes)

        def convert(state):
            conv = convert_transformer_xl(SourceCheckpoint(layout, replace(cfg), state), word_vocab(),
                                          dtype=torch.float64)
            return conv.checkpoint["model"], conv.checkpoint["cfg"]

        return synthetic_state(cfg, layout), convert

    return make


def adaptive_span() -> Tuple[Dict[str, Tensor], Convert]:
    from fairseq_ext.convert.adaptive_span import convert_adaptive_span, read_source
    from tests.convert.test_adaptive_span_converter import VOCAB, synthetic_checkpoint

    def convert(state):
        conv = convert_adaptive_span(read_source({"model": state}), VOCAB, ramp=8, dtype=torch.float64)
        return conv.checkpoint["model"], conv.checkpoint["cfg"]

    ckpt = synthetic_checkpoint()
    return {k: v for k, v in ckpt["model"].items()}, convert


def fast_weight() -> Tuple[Dict[str, Tensor], Convert]:
    from fairseq_ext.convert.fast_weight import LmtoolConfig, LmtoolSource, convert_fast_weight
    from tests.convert.test_fast_weight_converter import C, CUTOFFS, D, H, INNER, LAYERS, V, Case, synthetic_state
    from tests.convert.test_fast_weight_converter import word_vocab

    cfg = LmtoolConfig(attn_type=24, n_token=V, n_layer=LAYERS, n_head=H, d_model=C, d_head=D, d_inner=INNER,
                       d_embed=C, cutoffs=list(CUTOFFS), tgt_len=6)

    def convert(state):
        conv = convert_fast_weight(LmtoolSource(cfg, state), word_vocab(), dtype=torch.float64)
        return conv.checkpoint["model"], conv.checkpoint["cfg"]

    return synthetic_state(Case(24)), convert


# tensors of the original that are not trained (buffers the converter checks or drops)
NOT_TRAINED = ("mask_template", "pos_emb.inv_freq")


# ======================================================================================================================
# Helpers
# ======================================================================================================================
def _storage_key(t: Tensor) -> Tuple:
    """One key per distinct tensor view (tied entries of a state dict share it)."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()


def trained_tensors(state: Dict[str, Tensor]) -> Dict[Tuple, str]:
    """Distinct trained tensors of an original state dict: storage key -> first name."""
    out: Dict[Tuple, str] = {}
    for name, value in state.items():
        if value.is_floating_point() and not name.endswith(NOT_TRAINED):
            out.setdefault(_storage_key(value), name)
    return out


def with_values(state: Dict[str, Tensor], values: Dict[Tuple, Tensor]) -> Dict[str, Tensor]:
    """``state`` with each trained tensor replaced by ``values[its key]`` (ties stay ties: one object per key);
    untrained entries unchanged."""
    return {name: values.get(_storage_key(v), v) for name, v in state.items()}


def to_double(raw: Dict[str, Tensor], convert: Convert) -> Tuple[Dict[str, Tensor], Convert]:
    """The state in float64, ties kept (one float64 tensor per distinct original tensor)."""
    doubles: Dict[Tuple, Tensor] = {}
    for value in raw.values():
        doubles.setdefault(_storage_key(value), value.double() if value.is_floating_point() else value)
    return {name: doubles[_storage_key(v)] for name, v in raw.items()}, convert


def build(weights: Dict[str, Tensor], cfg: Dict) -> nn.Module:
    symbols_count = next(v.shape[0] for k, v in weights.items() if k.endswith("mask"))
    symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [f"s{i}" for i in range(symbols_count - 4)]
    model = build_registered_model(OmegaConf.create(cfg["model"]), fairseq_dictionary(symbols)).double()
    nn.Module.load_state_dict(model, weights, strict=True)
    return model


def run_steps(make: Callable[[], Tuple[Dict[str, Tensor], Convert]],
              optimizer: Callable[[Iterable], torch.optim.Optimizer],
              steps: int = 2) -> Tuple[Dict[str, Tensor], nn.Module]:
    """``steps`` optimizer steps with fixed random gradients on the original tensors and on the converted model.
    Returns (the conversion of the stepped original, the stepped model)."""
    state, convert = to_double(*make())
    weights, cfg = convert(state)
    model = build(weights, cfg)
    tensors = trained_tensors(state)
    params = {key: nn.Parameter(state[name].clone()) for key, name in tensors.items()}
    opt_orig, opt_ours = optimizer(params.values()), optimizer(model.parameters())
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        grads = {key: torch.randn(p.shape, generator=g, dtype=p.dtype) for key, p in params.items()}
        for key, p in params.items():
            p.grad = grads[key]
        fs_grads, _ = convert(with_values(state, grads))
        for name, p in model.named_parameters():
            p.grad = fs_grads[name].clone()
        opt_orig.step()
        opt_ours.step()
    expected, _ = convert(with_values(state, {k: p.detach() for k, p in params.items()}))
    return expected, model


def compare(expected: Dict[str, Tensor], model: nn.Module, only: Callable[[str], bool] = lambda name: True) -> None:
    actual = model.state_dict()
    compared = 0
    for name, value in expected.items():
        if not value.is_floating_point() or not only(name):
            continue
        diff = (actual[name].double() - value.double()).abs().max().item()
        assert diff <= 1e-6, f"{name}: max |converted-then-stepped - stepped-then-converted| = {diff:.3g}"
        compared += 1
    assert compared > 5


LAMB = dict(lr=0.01, weight_decay=1.2e-6, min_trust=0.25, trust_denominator="update_norm")  # README's SHA-RNN flags
LAMB_NVIDIA = dict(lr=0.01)  # NVIDIA's defaults: eps in the denominator, ‖w‖ clamped to 10
FAMILIES = {
    "sha_rnn": sha_rnn,
    "transformer_xl-original": transformer_xl("original"),
    "transformer_xl-nvidia-div2": transformer_xl("nvidia", div_val=2, d_embed=12),
    "adaptive_span": adaptive_span,
}


@pytest.mark.parametrize("lamb", [LAMB, LAMB_NVIDIA], ids=["smerity", "nvidia"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lamb_steps_equal_the_originals(family, lamb):
    expected, model = run_steps(FAMILIES[family], lambda params: Lamb(params, **lamb))
    compare(expected, model)


def test_adagrad_clip_steps_equal_the_originals():
    """adaptive-span's optimizer: Adagrad with the per-tensor gradient clip (--grad-clip 0.03 in its scripts)."""
    expected, model = run_steps(adaptive_span, lambda params: AdagradClip(params, lr=0.07, grad_clip=0.03))
    compare(expected, model)


def test_fast_weight_adam_steps_equal_the_originals():
    expected, model = run_steps(fast_weight, lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=0.01))
    compare(expected, model)


def test_fast_weight_lamb_steps_equal_the_originals_on_one_to_one_tensors():
    split = ("q_proj", "k_proj", "v_proj", "beta_proj")  # lmtool's fused qkvb_net, split per head
    expected, model = run_steps(fast_weight, lambda params: Lamb(params, **LAMB))
    compare(expected, model, only=lambda name: not any(s in name for s in split))


# ======================================================================================================================
# The dead rows get exactly zero gradient from a real backward pass
# ======================================================================================================================
@pytest.mark.parametrize("family", ["sha_rnn", "transformer_xl-original", "adaptive_span"])
def test_dead_rows_get_no_gradient(family):
    from fairseq_ext.criterions.lm_loss import nll_sum

    state, convert = to_double(*FAMILIES[family]())
    weights, cfg = convert(state)
    model = build(weights, cfg).train()
    mask_key = next(k for k in weights if k.endswith("dead_rows.mask"))
    dead = weights[mask_key].nonzero().squeeze(1).tolist()
    assert dead, "the tiny original lacks some fairseq specials"
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(4, len(weights[mask_key]), (2, 7), generator=g)
    nll_sum(model, model(tokens), tokens.roll(-1, dims=1), pad=1).backward()
    checked = 0
    for name, p in model.named_parameters():
        if p.dim() >= 1 and p.shape[0] == len(weights[mask_key]) and p.grad is not None:  # (V, ...) output tensors
            assert p.grad[dead].abs().max().item() == 0.0, name
            assert p.grad.abs().sum().item() > 0, name
            checked += 1
    assert checked >= 1
