"""Transformer-XL converter (spec transformer_xl.md §3, §7, acceptance check 11) on synthetic checkpoints.

Synthetic state dicts use the originals' exact key names and shapes at tiny dims (vocabulary of 60 with ``<eos>`` at
0 and ``<unk>`` in the head, cutoffs 10/20/40; a 30-symbol character vocabulary without specials and without
adaptive softmax). Each is converted, loaded through fairseq, run over consecutive segments with carried memory,
and its log-probabilities, mapped back to the original vocabulary order, must equal those of an independent
reference forward of the original algorithm (tests/convert/transformer_xl_reference.py).
"""
import argparse
import os
import subprocess
import sys
import types
from dataclasses import asdict, replace
from typing import Dict, List, Optional, Sequence

import pytest
import torch
from torch import nn

from fairseq_ext.convert.output import write_dictionary
from fairseq_ext.convert.transformer_xl import (DEAD_BIAS, ConversionError, OriginalConfig, SourceCheckpoint,
                                               build_vocab_mapping, convert_transformer_xl, main, read_source)
from tests.convert.transformer_xl_reference import ReferenceConfig, ReferenceTransformerXL
from tests.harness import REPO_ROOT, assert_close, single_thread

BASE = OriginalConfig(n_token=60, n_layer=2, n_head=2, d_head=6, d_model=16, d_inner=24, d_embed=16, div_val=1,
                      cutoffs=[10, 20, 40], tie_weight=True, tie_projs=[False, True, True, True], tgt_len=5,
                      mem_len=6, dropout=0.1, dropatt=0.05)
SEGMENTS = (5, 5, 4)
BATCH = 2
UNK_AT = 7


one_thread = pytest.fixture(autouse=True)(single_thread)


def word_vocab(n: int = 60, unk_at: int = UNK_AT) -> List[str]:
    """``<eos>`` at 0 (the original's only special for wt103), ``<unk>`` in the head, words otherwise."""
    symbols = ["<eos>"] + [f"w{i}" for i in range(1, n)]
    symbols[unk_at] = "<unk>"
    return symbols


def char_vocab(n: int = 30) -> List[str]:
    """enwik8-like: byte symbols, no <eos>, no <unk>."""
    return [str(32 + i) for i in range(n)]


# ======================================================================================================================
# synthetic checkpoints with the originals' key names
# ======================================================================================================================
def synthetic_state(cfg: OriginalConfig, layout: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A MemTransformerLM state dict (original or NVIDIA layout); tied tensors are the same tensor object."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.3):
        return torch.randn(*shape, generator=g) * std

    d, de, hd, n = cfg.d_model, cfg.d_embed, cfg.n_head * cfg.d_head, len(cfg.cutoffs)
    ends = [0] + cfg.cutoffs + [cfg.n_token]
    tables = [(cfg.n_token, de)] if cfg.div_val == 1 else [
        (ends[i + 1] - ends[i], de // cfg.div_val ** i) for i in range(n + 1)]
    s: Dict[str, torch.Tensor] = {}
    for i, (rows, dim) in enumerate(tables):
        s[f"word_emb.emb_layers.{i}.weight"] = rnd(rows, dim)
        if cfg.div_val > 1 or de != d:
            s[f"word_emb.emb_projs.{i}"] = rnd(d, dim, std=0.4)
    for layer in range(cfg.n_layer):
        p = f"layers.{layer}."
        s[p + "dec_attn.qkv_net.weight"] = rnd(3 * hd, d)
        s[p + "dec_attn.r_net.weight"] = rnd(hd, d)
        s[p + "dec_attn.o_net.weight"] = rnd(d, hd)
        s[p + "dec_attn.layer_norm.weight"] = 1 + rnd(d, std=0.1)
        s[p + "dec_attn.layer_norm.bias"] = rnd(d, std=0.1)
        s[p + "pos_ff.CoreNet.0.weight"] = rnd(cfg.d_inner, d)
        s[p + "pos_ff.CoreNet.0.bias"] = rnd(cfg.d_inner, std=0.1)
        s[p + "pos_ff.CoreNet.3.weight"] = rnd(d, cfg.d_inner)
        s[p + "pos_ff.CoreNet.3.bias"] = rnd(d, std=0.1)
        s[p + "pos_ff.layer_norm.weight"] = 1 + rnd(d, std=0.1)
        s[p + "pos_ff.layer_norm.bias"] = rnd(d, std=0.1)
    s["r_w_bias"] = rnd(cfg.n_head, cfg.d_head)
    s["r_r_bias"] = rnd(cfg.n_head, cfg.d_head)
    s["pos_emb.inv_freq"] = 1 / (10000 ** (torch.arange(0.0, d, 2.0) / d))
    if n:
        s["crit.cluster_weight"] = rnd(n, de)
        s["crit.cluster_bias"] = rnd(n, std=0.5)
    flags = cfg.tie_projs_per_cluster
    for i, (rows, dim) in enumerate(tables):
        tied = s[f"word_emb.emb_layers.{i}.weight"]
        if layout == "original":
            s[f"crit.out_layers.{i}.weight"] = tied if cfg.tie_weight else rnd(rows, dim)
            s[f"crit.out_layers.{i}.bias"] = rnd(rows, std=0.5)
        else:
            if not cfg.tie_weight:
                s[f"crit.out_layers_weights.{i}"] = rnd(rows, dim)
            s[f"crit.out_layers_biases.{i}"] = rnd(rows, std=0.5)
    if cfg.div_val > 1 or de != d:
        for i in range(n + 1):
            j = 0 if cfg.div_val == 1 else i
            emb_proj = s[f"word_emb.emb_projs.{j}"]
            if flags[i]:
                if layout == "original":
                    s[f"crit.out_projs.{i}"] = emb_proj
            else:
                s[f"crit.out_projs.{i}"] = rnd(*emb_proj.shape, std=0.4)
        if layout == "nvidia":  # every embedding projection a second time, same storage
            for j in range(len(tables)):
                s[f"crit.shared_out_projs.{j}"] = s[f"word_emb.emb_projs.{j}"]
    return s


def reference_for(cfg: OriginalConfig, state, layout: str, *, mem_len: Optional[int] = None,
                  clamp_len: Optional[int] = None, same_length: Optional[bool] = None,
                  nvidia_same_length: bool = False) -> ReferenceTransformerXL:
    return ReferenceTransformerXL(state, ReferenceConfig(
        n_token=cfg.n_token, n_layer=cfg.n_layer, n_head=cfg.n_head, d_head=cfg.d_head, d_model=cfg.d_model,
        d_embed=cfg.d_embed, div_val=cfg.div_val, cutoffs=cfg.cutoffs, pre_lnorm=cfg.pre_lnorm,
        mem_len=cfg.mem_len if mem_len is None else mem_len,
        clamp_len=cfg.clamp_len if clamp_len is None else clamp_len,
        same_length=cfg.same_length if same_length is None else same_length, nvidia_same_length=nvidia_same_length,
        layout=layout, tie_weight=cfg.tie_weight, tie_projs=cfg.tie_projs))


def save_conversion(conversion, out_dir) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.pt")
    torch.save(conversion.checkpoint, path)
    write_dictionary(os.path.join(out_dir, "dict.txt"), conversion.mapping.symbols)
    return path


def load_fairseq(path, data_dir):
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(data_dir)})
    return models[0].double().eval(), task


def original_segments(vocab: int, seed: int = 3, lengths: Sequence[int] = SEGMENTS) -> List[torch.Tensor]:
    """Consecutive segments (T, B) of original ids, every cluster represented."""
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, vocab, (sum(lengths), BATCH), generator=g).split(list(lengths), dim=0))


def run_ours(model, mapping, segments: Sequence[torch.Tensor]):
    """Our model over the segments (forward_segment with carried memory): per segment (features (B, T, C),
    log-probs (B, T, V_fairseq))."""
    to_fs = torch.tensor(mapping.orig_to_fs)
    state, outs = None, []
    with torch.no_grad():
        for seg in segments:
            features, state, _ = model.decoder.forward_segment(to_fs[seg.t()], state)  # (B, T) fairseq ids
            outs.append((features, model.get_normalized_probs((features, {}), log_probs=True)))
    return outs


def assert_matches_reference(model, mapping, ref: ReferenceTransformerXL, vocab: int, seed: int = 3,
                             lengths: Sequence[int] = SEGMENTS) -> None:
    segments = original_segments(vocab, seed, lengths)
    ours = run_ours(model, mapping, segments)
    to_fs = torch.tensor(mapping.orig_to_fs)
    mems = None
    with torch.no_grad():
        for k, (seg, (features, log_probs)) in enumerate(zip(segments, ours)):
            hidden, mems = ref.forward(seg, mems)
            assert_close(features, hidden.transpose(0, 1), atol=1e-10, msg=f"segment {k} features")
            expected = ref.log_probs(hidden).transpose(0, 1)  # (B, T, V_orig)
            assert_close(log_probs[..., to_fs], expected, atol=1e-9, msg=f"segment {k} log-probs")
            if mapping.dead:
                assert log_probs[..., mapping.dead].max() < DEAD_BIAS / 2  # dead specials: probability 0


# ======================================================================================================================
# conversion == original algorithm
# ======================================================================================================================
CASES = {
    # wt103-base-like: div_val 1, d_embed = d_model, no projections at all
    "original-div1": (BASE, "original", {}),
    # wt103-large-like: div_val 2, head projection untied, tail projections tied, clamp_len
    "original-div2-tails": (replace(BASE, div_val=2, d_embed=12, clamp_len=3), "original", {}),
    # NVIDIA: out_layers_biases, shared_out_projs, only the untied out_projs stored, no tied crit weights
    "nvidia-div2-tails": (replace(BASE, div_val=2, d_embed=12), "nvidia", {}),
    "nvidia-div1-projections": (replace(BASE, d_embed=12), "nvidia", {}),
    "original-pre-lnorm-div1-projections": (replace(BASE, d_embed=12, pre_lnorm=True), "original", {}),
    # lm1b-like: no tied projections
    "original-div2-none": (replace(BASE, div_val=2, d_embed=12, tie_projs=[False] * 4), "original", {}),
    # untied output matrices (original and NVIDIA keys)
    "original-untied": (replace(BASE, tie_weight=False, tie_projs=[False]), "original", {}),
    "nvidia-untied": (replace(BASE, div_val=2, d_embed=12, tie_weight=False, tie_projs=[False] * 4), "nvidia", {}),
    # a tie pattern transformer_xl_lm cannot express: copied projections, same outputs
    "original-irregular-tie": (replace(BASE, div_val=2, d_embed=12, tie_projs=[True, False, True, True]),
                               "original", {}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_converted_model_equals_original_algorithm(name, tmp_path):
    cfg, layout, _ = CASES[name]
    state = synthetic_state(cfg, layout)
    conversion = convert_transformer_xl(SourceCheckpoint(layout, replace(cfg), state), word_vocab(),
                                        data=str(tmp_path))
    model, _ = load_fairseq(save_conversion(conversion, tmp_path), tmp_path)
    mapping = conversion.mapping
    assert mapping.symbols[2] == "</s>" and mapping.symbols[3] == "<unk>" and mapping.dead == [0, 1]
    assert mapping.cutoffs == [12, 22, 42]  # two dead rows (<s>, <pad>) enter the head
    # (without projections, original-div1, the mode is moot: tied weights give the wt103 default "tails")
    expected_mode = "none" if name in ("original-div2-none", "original-untied", "nvidia-untied",
                                       "original-irregular-tie") else "tails"
    assert conversion.model_cfg["tie_projs"] == expected_mode
    assert conversion.model_cfg["untie_adaptive_weights"] == (not cfg.tie_weight)
    ref = reference_for(cfg, state, layout, nvidia_same_length=layout == "nvidia")
    assert_matches_reference(model, mapping, ref, cfg.n_token)


def test_character_vocabulary_without_specials_or_adaptive_softmax(tmp_path):
    """enwik8-like: no cutoffs, no <eos>/<unk>: four dead rows, full softmax."""
    cfg = replace(BASE, n_token=30, cutoffs=[], tie_projs=[False], d_embed=16)
    state = synthetic_state(cfg, "original", seed=5)
    conversion = convert_transformer_xl(SourceCheckpoint("original", replace(cfg), state), char_vocab(),
                                        data=str(tmp_path))
    assert conversion.mapping.dead == [0, 1, 2, 3] and conversion.model_cfg["adaptive_softmax_cutoff"] is None
    model, _ = load_fairseq(save_conversion(conversion, tmp_path), tmp_path)
    assert_matches_reference(model, conversion.mapping, reference_for(cfg, state, "original"), cfg.n_token, seed=4)


@pytest.mark.parametrize("layout,convention", [("original", "original"), ("nvidia", "nvidia"),
                                               ("original", "nvidia")])
def test_same_length_conventions(layout, convention, tmp_path):
    """mem_len 4, segments of 3: the window is mem_len keys (original) or mem_len + 1 (NVIDIA); the default
    convention follows the source, and --same-length-convention overrides it."""
    cfg = replace(BASE, mem_len=4, tgt_len=3, same_length=True, div_val=2, d_embed=12)
    state = synthetic_state(cfg, layout, seed=7)
    override = convention if convention != layout else None
    conversion = convert_transformer_xl(SourceCheckpoint(layout, replace(cfg), state), word_vocab(),
                                        data=str(tmp_path), same_length_convention=override)
    assert conversion.model_cfg["same_length"] and conversion.model_cfg["same_length_convention"] == convention
    model, _ = load_fairseq(save_conversion(conversion, tmp_path), tmp_path)
    ref = reference_for(cfg, state, layout, nvidia_same_length=convention == "nvidia")
    assert_matches_reference(model, conversion.mapping, ref, cfg.n_token, lengths=(3, 3, 3, 3))


def test_streaming_api_ties_dictionary_and_weights_only_output(tmp_path):
    """The eval stream (model(tokens) in eval mode) carries memory like forward_segment; tied tensors are one
    tensor in the file and in the loaded model; dict.txt loads as the mapping's symbols; evaluation overrides land
    in the config."""
    from fairseq.data import Dictionary

    cfg = replace(BASE, div_val=2, d_embed=12)
    state = synthetic_state(cfg, "original", seed=11)
    conversion = convert_transformer_xl(SourceCheckpoint("original", replace(cfg), state), word_vocab(),
                                        data=str(tmp_path), mem_len=9, clamp_len=4, same_length=True,
                                        tokens_per_sample=7)
    path = save_conversion(conversion, tmp_path)

    raw = torch.load(path, map_location="cpu", weights_only=True)
    weights = raw["model"]
    for i in range(4):
        assert weights[f"decoder.adaptive_softmax.weights.{i}"].data_ptr() == \
            weights[f"decoder.embed_tokens.emb_layers.{i}.weight"].data_ptr()
    for i in range(1, 4):
        assert weights[f"decoder.adaptive_softmax.out_projs.{i}"].data_ptr() == \
            weights[f"decoder.embed_tokens.emb_projs.{i}"].data_ptr()
    assert weights["decoder.adaptive_softmax.out_projs.0"].data_ptr() != \
        weights["decoder.embed_tokens.emb_projs.0"].data_ptr()
    assert not any(k.endswith("inv_freq") for k in weights)
    assert raw["cfg"]["model"]["mem_len"] == 9 and raw["cfg"]["model"]["clamp_len"] == 4
    assert raw["cfg"]["model"]["tokens_per_sample"] == 7 and raw["cfg"]["task"]["tokens_per_sample"] == 7

    assert Dictionary.load(os.path.join(tmp_path, "dict.txt")).symbols == conversion.mapping.symbols
    model, _ = load_fairseq(path, tmp_path)
    decoder = model.decoder
    for i in range(4):
        assert decoder.adaptive_softmax.weights[str(i)] is decoder.embed_tokens.emb_layers[i].weight
    assert decoder.adaptive_softmax.out_projs["2"] is decoder.embed_tokens.emb_projs["2"]
    assert decoder.adaptive_softmax.out_projs["0"] is not decoder.embed_tokens.emb_projs["0"]

    segments = original_segments(cfg.n_token, seed=8, lengths=(7, 7, 7))
    ours = run_ours(model, conversion.mapping, segments)
    to_fs = torch.tensor(conversion.mapping.orig_to_fs)
    model.decoder.reset_state()
    with torch.no_grad():
        for seg, (features, _) in zip(segments, ours):
            streamed, _ = model(to_fs[seg.t()], features_only=True)
            assert_close(streamed, features, atol=1e-12)
    ref = reference_for(cfg, state, "original", mem_len=9, clamp_len=4, same_length=True)
    assert_matches_reference(model, conversion.mapping, ref, cfg.n_token, seed=8, lengths=(7, 7, 7))

    # fp32 inference: finite, dead specials at probability 0, real tokens at fp32 accuracy
    model.float()
    mems = None
    for seg, (_, log_probs) in zip(segments, run_ours(model, conversion.mapping, segments)):
        hidden, mems = ref.forward(seg, mems)
        assert torch.isfinite(log_probs).all() and log_probs[..., conversion.mapping.dead].exp().max() < 1e-15  # dead specials: e^-40-level mass
        assert_close(log_probs[..., to_fs].double(), ref.log_probs(hidden).transpose(0, 1), atol=5e-5, rtol=0)


# ======================================================================================================================
# the pickled original model.pt, loaded without the original modules
# ======================================================================================================================
FAKE_MEM_TRANSFORMER = """
import torch.nn as nn

class MemTransformerLM(nn.Module): pass
class AdaptiveEmbedding(nn.Module): pass
class PositionalEmbedding(nn.Module): pass
class RelPartialLearnableDecoderLayer(nn.Module): pass
class RelPartialLearnableMultiHeadAttn(nn.Module): pass
class PositionwiseFF(nn.Module): pass
"""
FAKE_PROJ_ADAPTIVE_SOFTMAX = """
import torch.nn as nn

class ProjectedAdaptiveLogSoftmax(nn.Module): pass
"""
FAKE_DATA_UTILS = """
class Corpus(object): pass
"""
FAKE_VOCABULARY = """
class Vocab(object): pass
"""
FAKE_MODULES = {"mem_transformer": FAKE_MEM_TRANSFORMER, "proj_adaptive_softmax": FAKE_PROJ_ADAPTIVE_SOFTMAX,
                "data_utils": FAKE_DATA_UTILS, "vocabulary": FAKE_VOCABULARY}


def fake_original_model(modules, cfg: OriginalConfig, state):
    """The object graph of the original MemTransformerLM (attribute names, ModuleLists, ParameterLists with None
    slots, ties as shared Parameters) built from classes of the throwaway modules."""
    mt, pas = modules["mem_transformer"], modules["proj_adaptive_softmax"]
    params: Dict[int, nn.Parameter] = {}

    def param(key):
        tensor = state[key]
        return params.setdefault(id(tensor), nn.Parameter(tensor.clone()))

    def linear(prefix, bias=True):
        module = nn.Linear(1, 1, bias=bias)
        module.weight = param(prefix + ".weight")
        if bias:
            module.bias = param(prefix + ".bias")
        return module

    def layer_norm(prefix):
        module = nn.LayerNorm(1)
        module.weight, module.bias = param(prefix + ".weight"), param(prefix + ".bias")
        return module

    n_tables = 1 if cfg.div_val == 1 else len(cfg.cutoffs) + 1
    model = mt.MemTransformerLM()
    for name in ("n_token", "n_layer", "n_head", "d_model", "d_head", "d_embed", "tgt_len", "mem_len", "ext_len",
                 "same_length", "attn_type", "clamp_len", "sample_softmax"):
        setattr(model, name, getattr(cfg, name))
    word_emb = mt.AdaptiveEmbedding()
    word_emb.n_token, word_emb.d_embed, word_emb.d_proj = cfg.n_token, cfg.d_embed, cfg.d_model
    word_emb.cutoffs, word_emb.div_val = cfg.cutoffs + [cfg.n_token], cfg.div_val
    word_emb.emb_layers = nn.ModuleList()
    for i in range(n_tables):
        embedding = nn.Embedding(1, 1)
        embedding.weight = param(f"word_emb.emb_layers.{i}.weight")
        word_emb.emb_layers.append(embedding)
    word_emb.emb_projs = nn.ParameterList([param(k) for k in sorted(state) if k.startswith("word_emb.emb_projs.")])
    model.word_emb = word_emb
    model.drop = nn.Dropout(cfg.dropout)
    model.layers = nn.ModuleList()
    for layer_index in range(cfg.n_layer):
        p = f"layers.{layer_index}."
        attn = mt.RelPartialLearnableMultiHeadAttn()
        attn.n_head, attn.d_head, attn.d_model, attn.pre_lnorm = cfg.n_head, cfg.d_head, cfg.d_model, cfg.pre_lnorm
        attn.qkv_net = linear(p + "dec_attn.qkv_net", bias=False)
        attn.drop, attn.dropatt = nn.Dropout(cfg.dropout), nn.Dropout(cfg.dropatt)
        attn.o_net = linear(p + "dec_attn.o_net", bias=False)
        attn.layer_norm = layer_norm(p + "dec_attn.layer_norm")
        attn.scale = 1 / cfg.d_head ** 0.5
        attn.r_net = linear(p + "dec_attn.r_net", bias=False)
        ff = mt.PositionwiseFF()
        ff.d_model, ff.d_inner, ff.pre_lnorm = cfg.d_model, cfg.d_inner, cfg.pre_lnorm
        ff.CoreNet = nn.Sequential(linear(p + "pos_ff.CoreNet.0"), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
                                   linear(p + "pos_ff.CoreNet.3"), nn.Dropout(cfg.dropout))
        ff.layer_norm = layer_norm(p + "pos_ff.layer_norm")
        layer = mt.RelPartialLearnableDecoderLayer()
        layer.dec_attn, layer.pos_ff = attn, ff
        model.layers.append(layer)
    crit = pas.ProjectedAdaptiveLogSoftmax()
    crit.n_token, crit.d_embed, crit.d_proj = cfg.n_token, cfg.d_embed, cfg.d_model
    crit.cutoffs, crit.div_val, crit.n_clusters = cfg.cutoffs + [cfg.n_token], cfg.div_val, len(cfg.cutoffs)
    if cfg.cutoffs:
        crit.cluster_weight, crit.cluster_bias = param("crit.cluster_weight"), param("crit.cluster_bias")
    crit.out_layers = nn.ModuleList(linear(f"crit.out_layers.{i}") for i in range(n_tables))
    crit.out_projs = nn.ParameterList()
    for i in range(len(cfg.cutoffs) + 1):
        crit.out_projs.append(param(f"crit.out_projs.{i}") if f"crit.out_projs.{i}" in state else None)
    crit.keep_order = False
    model.crit = crit
    model.same_length, model.clamp_len = cfg.same_length, cfg.clamp_len
    model.pos_emb = mt.PositionalEmbedding()
    model.pos_emb.demb = cfg.d_model
    model.pos_emb.register_buffer("inv_freq", state["pos_emb.inv_freq"].clone())
    model.r_w_bias, model.r_r_bias = param("r_w_bias"), param("r_r_bias")
    return model


@pytest.fixture()
def throwaway_modules(tmp_path):
    """Import the fake original modules from a temp dir; afterwards they are neither imported nor importable."""
    import importlib

    src = tmp_path / "original_src"
    src.mkdir()
    for name, code in FAKE_MODULES.items():
        (src / f"{name}.py").write_text(code)
    sys.path.insert(0, str(src))
    try:
        modules = {name: importlib.import_module(name) for name in FAKE_MODULES}
        yield modules
    finally:
        if str(src) in sys.path:
            sys.path.remove(str(src))
        for name in FAKE_MODULES:
            sys.modules.pop(name, None)
        importlib.invalidate_caches()


def test_pickled_original_model_converts_without_the_original_modules(throwaway_modules, tmp_path):
    cfg = replace(BASE, div_val=2, d_embed=12, clamp_len=4)
    state = synthetic_state(cfg, "original", seed=13)
    model_path = tmp_path / "model.pt"
    torch.save(fake_original_model(throwaway_modules, cfg, state), model_path)  # the original train.py's save
    corpus = throwaway_modules["data_utils"].Corpus()  # the original cache.pt
    corpus.vocab = throwaway_modules["vocabulary"].Vocab()
    corpus.vocab.idx2sym = word_vocab()
    corpus.vocab.sym2idx = {s: i for i, s in enumerate(corpus.vocab.idx2sym)}
    corpus.train = torch.randint(0, 60, (100,))
    torch.save(corpus, tmp_path / "cache.pt")
    vocab_txt = tmp_path / "vocab.txt"
    vocab_txt.write_text("".join(f"{s}\n" for s in word_vocab()))

    # leave the fixture's import context: the original modules are gone
    for name in FAKE_MODULES:
        sys.modules.pop(name, None)
    sys.path[:] = [p for p in sys.path if not p.endswith("original_src")]
    with pytest.raises(ModuleNotFoundError):
        torch.load(model_path, weights_only=False)

    out = tmp_path / "converted"
    with pytest.raises(ConversionError, match="--trust-pickle"):
        main([str(model_path), str(out), "--vocab", str(vocab_txt)])
    with pytest.raises(ConversionError, match="no vocabulary"):
        main([str(model_path), str(out), "--trust-pickle"])
    conversion = main([str(model_path), str(out), "--vocab", str(tmp_path / "cache.pt"), "--trust-pickle"])
    assert "mem_transformer" not in sys.modules
    source_cfg = conversion.checkpoint["extra_state"]["converted_from_transformer_xl"]["source_config"]
    assert source_cfg["tie_projs"] == [False, True, True, True] and source_cfg["tie_weight"]
    assert source_cfg["clamp_len"] == 4 and source_cfg["dropatt"] == pytest.approx(0.05)
    model, _ = load_fairseq(out / "model.pt", out)
    assert_matches_reference(model, conversion.mapping, reference_for(cfg, state, "original"), cfg.n_token)

    # the text vocabulary gives the same conversion
    again = main([str(model_path), str(tmp_path / "again"), "--vocab", str(vocab_txt), "--trust-pickle"])
    assert again.mapping.symbols == conversion.mapping.symbols


# ======================================================================================================================
# NVIDIA checkpoint through the script
# ======================================================================================================================
def nvidia_checkpoint(cfg: OriginalConfig, state, monkeypatch):
    """NVIDIA's checkpoint dict with pickled objects (argparse args, a utils.vocabulary.Vocab)."""
    vocab_module = types.ModuleType("utils.vocabulary")

    class Vocab:
        pass

    Vocab.__module__, Vocab.__qualname__ = "utils.vocabulary", "Vocab"
    vocab_module.Vocab = Vocab
    package = types.ModuleType("utils")  # NVIDIA's pytorch/utils package
    package.__path__, package.vocabulary = [], vocab_module
    monkeypatch.setitem(sys.modules, "utils", package)
    monkeypatch.setitem(sys.modules, "utils.vocabulary", vocab_module)
    vocab = Vocab()
    vocab.idx2sym = word_vocab()
    vocab.special = ["<eos>"]
    model_config = {k: v for k, v in asdict(cfg).items()}
    model_config["dtype"] = None
    return {"args": argparse.Namespace(init_std=0.005, proj_init_std=0.01, tgt_len=cfg.tgt_len, dataset="wt103"),
            "model_config": model_config, "model_state": state,
            "optimizer_state": {"state": {}, "param_groups": []}, "scheduler_state": {"last_epoch": 3},
            "vocab": vocab, "amp_state": None, "epoch": 1, "batch": 10, "last_iter": 10, "train_step": 100,
            "best_val_loss": 3.2}


def test_script_converts_an_nvidia_checkpoint(tmp_path, monkeypatch):
    cfg = replace(BASE, div_val=2, d_embed=12)
    state = synthetic_state(cfg, "nvidia", seed=17)
    src = tmp_path / "checkpoint_best.pt"
    torch.save(nvidia_checkpoint(cfg, state, monkeypatch), src)
    monkeypatch.delitem(sys.modules, "utils.vocabulary")
    monkeypatch.delitem(sys.modules, "utils")
    out = tmp_path / "converted"
    with pytest.raises(ConversionError, match="--trust-pickle"):
        main([str(src), str(out)])

    script = os.path.join(REPO_ROOT, "scripts", "convert_transformer_xl_checkpoint.py")
    result = subprocess.run([sys.executable, script, str(src), str(out), "--trust-pickle", "--eval-mem-len", "8",
                             "--eval-clamp-len", "6", "--eval-same-length", "on", "--tokens-per-sample", "4"],
                            capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fairseq-preprocess" in result.stdout and "--srcdict" in result.stdout

    raw = torch.load(out / "model.pt", weights_only=True)
    model_cfg = raw["cfg"]["model"]
    assert (model_cfg["mem_len"], model_cfg["clamp_len"], model_cfg["same_length"]) == (8, 6, True)
    assert model_cfg["same_length_convention"] == "nvidia" and model_cfg["init_std"] == 0.005
    assert model_cfg["adaptive_softmax_cutoff"] == "12,22,42" and model_cfg["tie_projs"] == "tails"
    mapping = build_vocab_mapping(word_vocab(), cfg.cutoffs)
    model, _ = load_fairseq(out / "model.pt", out)
    ref = reference_for(cfg, state, "nvidia", mem_len=8, clamp_len=6, same_length=True, nvidia_same_length=True)
    assert_matches_reference(model, mapping, ref, cfg.n_token, lengths=(4, 4, 4))


def test_binarised_text_uses_the_converted_ids(tmp_path):
    """fairseq-preprocess --srcdict <converted dict.txt>: original symbols get the converted ids, lines end in
    </s> (= the original <eos>), unknown words become <unk> (= the original <unk>)."""
    from fairseq.data import data_utils

    from tests.harness import fairseq_preprocess

    conversion = convert_transformer_xl(SourceCheckpoint("original", replace(BASE), synthetic_state(BASE, "original")),
                                        word_vocab(), data=str(tmp_path))
    write_dictionary(str(tmp_path / "dict.txt"), conversion.mapping.symbols)
    (tmp_path / "train.txt").write_text("w1 w9 w55\nw12 nonsense <unk>\n")
    fairseq_preprocess(str(tmp_path / "bin"), str(tmp_path / "train.txt"), srcdict=str(tmp_path / "dict.txt"))
    ids = data_utils.load_indexed_dataset(str(tmp_path / "bin" / "train"), None)
    to_fs = conversion.mapping.orig_to_fs
    assert ids[0].tolist() == [to_fs[1], to_fs[9], to_fs[55], to_fs[0]]
    assert ids[1].tolist() == [to_fs[12], to_fs[UNK_AT], to_fs[UNK_AT], to_fs[0]]
    assert to_fs[0] == 2 and to_fs[UNK_AT] == 3


# ======================================================================================================================
# clear errors
# ======================================================================================================================
def _convert(cfg: OriginalConfig = BASE, symbols=None, layout="original", state=None, **kwargs):
    state = synthetic_state(cfg, layout) if state is None else state
    return convert_transformer_xl(SourceCheckpoint(layout, replace(cfg), state),
                                  word_vocab() if symbols is None else symbols, **kwargs)


@pytest.mark.parametrize("change,match", [
    (dict(attn_type=2), "attn_type 2"),
    (dict(sample_softmax=1000), "sample_softmax"),
    (dict(ext_len=16), "ext_len"),
])
def test_unsupported_configurations(change, match):
    with pytest.raises(ConversionError, match=match):
        _convert(replace(BASE, **change), state=synthetic_state(BASE, "original"))


def test_vocabulary_errors():
    with pytest.raises(ConversionError, match="vocabulary size mismatch"):
        _convert(symbols=word_vocab(59))
    with pytest.raises(ConversionError, match="outside the head cluster"):
        _convert(symbols=word_vocab(unk_at=45))
    with pytest.raises(ConversionError, match="appears twice"):
        _convert(symbols=word_vocab()[:-1] + ["w1"])
    with pytest.raises(ConversionError, match="no vocabulary"):
        _convert(symbols=[])
    # a custom mapping: <unk> stays a dead row when unmapped would clash with fairseq's <unk>
    with pytest.raises(ConversionError, match="reserves that name"):
        _convert(symbol_map={"<eos>": "</s>"})


def test_weight_and_format_errors(tmp_path):
    state = synthetic_state(BASE, "original")
    with pytest.raises(ConversionError, match="lacks 'layers.1.dec_attn.qkv_net.weight'"):
        _convert(state={k: v for k, v in state.items() if k != "layers.1.dec_attn.qkv_net.weight"})
    with pytest.raises(ConversionError, match="does not use"):
        _convert(replace(BASE, n_layer=1), state=state)
    with pytest.raises(ConversionError, match="shape"):
        _convert(replace(BASE, d_inner=30), state=state)
    with pytest.raises(ConversionError, match="bare MemTransformerLM state dict"):
        read_source(state)
    path = tmp_path / "state.pt"
    torch.save(state, path)
    with pytest.raises(ConversionError, match="bare MemTransformerLM state dict"):
        main([str(path), str(tmp_path / "out")])


def test_vocabulary_mapping_layouts():
    """wt103: <eos> and <unk> become fairseq's </s> and <unk>, two dead rows; lm1b: <UNK> is the unknown word and
    --map-symbol '<S>=</s>' maps its sentence boundary; the head keeps its members, the tails their order."""
    wt103 = build_vocab_mapping(word_vocab(), [10, 20, 40])
    assert wt103.symbols[:5] == ["<s>", "<pad>", "</s>", "<unk>", "w1"]
    assert wt103.mapped == {"<eos>": "</s>", "<unk>": "<unk>"} and wt103.dead == [0, 1]
    assert wt103.orig_to_fs[:8] == [2, 4, 5, 6, 7, 8, 9, 3] and wt103.orig_to_fs[10:] == list(range(12, 62))

    lm1b = ["<S>", "</S>", "<UNK>"] + [f"w{i}" for i in range(3, 30)]
    mapping = build_vocab_mapping(lm1b, [10, 20], {"<S>": "</s>", "<unk>": "<unk>"})
    assert mapping.mapped == {"<S>": "</s>", "<UNK>": "<unk>"} and mapping.symbols[4] == "</S>"
    assert mapping.cutoffs == [12, 22]


def test_shim_stubs_unknown_globals_instead_of_calling_them(tmp_path):
    """--trust-pickle still never imports or calls anything outside torch's tensor/nn classes and plain
    containers: a pickled os.system call comes back as an inert stub."""
    from fairseq_ext.convert.unpickle import PickledStub, load_pickled

    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pt"
    torch.save({"model_state": {"w": torch.ones(2)}, "payload": Payload()}, path)
    loaded = load_pickled(str(path), trust_pickle=True)
    assert not marker.exists()
    assert isinstance(loaded["payload"], PickledStub) and torch.equal(loaded["model_state"]["w"], torch.ones(2))
