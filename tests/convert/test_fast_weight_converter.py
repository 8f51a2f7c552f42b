"""lmtool-fwms converter (spec fast_weights.md §1.2-§1.6, §6, acceptance checks 12 and 17) on synthetic checkpoints.

Each case pickles a fake lmtool ``MemTransformerLM`` object graph (``torch.save(model)`` as lmtool's train.py does)
whose classes carry lmtool's exact module paths (``model_main``, ``utils.cuda_fast_weight_layer``,
``utils.proj_adaptive_softmax``, ``utils.model_utils``), attribute names, state-dict keys and shapes, at tiny sizes
(vocabulary 30 with ``<eos>`` and ``<unk>``, cutoffs 10/20, d_model 16, 2 heads of 8, 2 layers). The modules are
removed before conversion, so only the shim can read the file. The converted model, loaded through fairseq, must give
the per-token log-probabilities of an independent plain re-implementation of lmtool's forward written here from the
spec (fp64, one segment).
"""
import math
import os
import subprocess
import sys
import types
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairseq_ext.convert.vocab_mapping import build_vocab_mapping
from fairseq_ext.convert.fast_weight import ConversionError, main
from tests.harness import REPO_ROOT, assert_close, single_thread

one_thread = pytest.fixture(autouse=True)(single_thread)

V, CUTOFFS, C, H, D, LAYERS, INNER, UNK_AT = 30, [10, 20], 16, 2, 8, 2, 24, 5
SEG, BATCH = 7, 2


@dataclass
class Case:
    code: int
    normalize: bool = True  # the layers' normalize_attn_scores (= not --skip_attn_normalization)
    proj_dim: int = 4  # Performer m (!= d, so the orientation of proj_matrix matters)
    n_roll: int = 2
    no_pos: bool = False
    clamp_len: int = -1
    atol: float = 1e-9


CASES = {
    "24": Case(24),  # lmtool's CLI default: output-normalised (spec §1.5 wiring quirk)
    "24-skip": Case(24, normalize=False, clamp_len=4),
    "25": Case(25),
    "26": Case(26, normalize=False, no_pos=True),
    "34": Case(34),
    "44": Case(44),
    "2": Case(2),
    # row-normalised scaled scores: equal up to the denominator's epsilon (module docstring of the converter)
    "4": Case(4),
}
LAYOUT = {2: "q_kv", 4: "q_kv", 24: "qkvb", 25: "qkvb", 26: "qkvb", 34: "qkv", 44: "qkvb"}
FEATURES = {2: "softmax", 4: "elu", 24: "elu", 25: "favor", 26: "dpfp", 34: "elu", 44: "elu"}
ATTN_CLASS = {2: ("model_main", "MultiHeadAttn"), 4: ("model_main", "LinearMultiHeadAttn"),
              24: ("utils.cuda_fast_weight_layer", "CudaFastWeightLinearTransformerLayer"),
              25: ("utils.cuda_fast_weight_layer", "CudaFastWeightPerformerLayer"),
              26: ("utils.cuda_fast_weight_layer", "CudaFastWeightDPFPTransformerLayer"),
              34: ("utils.cuda_fast_weight_layer", "CudaFastWeightSumLinearTransformerLayer"),
              44: ("utils.cuda_fast_weight_layer", "CudaNormFastWeightLinearTransformerLayer")}
FAKE = {"model_main": ["MemTransformerLM", "DecoderLayer", "PerformerDecoderLayer", "AdaptiveEmbedding",
                       "MultiHeadAttn", "LinearMultiHeadAttn"],
        "utils.cuda_fast_weight_layer": [name for mod, name in ATTN_CLASS.values() if mod != "model_main"],
        "utils.proj_adaptive_softmax": ["ProjectedAdaptiveLogSoftmax"],
        "utils.model_utils": ["PositionalEmbedding", "PositionwiseFF"],
        "data_utils": ["Corpus"], "utils.vocabulary": ["Vocab"]}


def word_vocab(n: int = V) -> List[str]:
    symbols = ["<eos>"] + [f"w{i}" for i in range(1, n)]
    symbols[UNK_AT] = "<unk>"
    return symbols


# ======================================================================================================================
# synthetic lmtool checkpoints
# ======================================================================================================================
def synthetic_state(case: Case, seed: int = 0) -> Dict[str, Tensor]:
    """lmtool's state dict for ``case`` (spec §6 key names); the output matrix IS the embedding (tied)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.3) -> Tensor:
        return torch.randn(*shape, generator=g) * std

    s: Dict[str, Tensor] = {"word_emb.emb_layers.0.weight": rnd(V, C)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        if LAYOUT[case.code] == "qkvb":
            s[p + "dec_attn.qkvb_net.weight"] = rnd(H * (3 * D + 1), C)
        elif LAYOUT[case.code] == "qkv":
            s[p + "dec_attn.qkv_net.weight"] = rnd(H * 3 * D, C)
        else:
            s[p + "dec_attn.q_net.weight"] = rnd(H * D, C)
            s[p + "dec_attn.kv_net.weight"] = rnd(2 * H * D, C)
        s[p + "dec_attn.o_net.weight"] = rnd(C, H * D)
        s[p + "dec_attn.layer_norm.weight"] = 1 + rnd(C, std=0.1)
        s[p + "dec_attn.layer_norm.bias"] = rnd(C, std=0.1)
        s[p + "pos_ff.CoreNet.0.weight"] = rnd(INNER, C)
        s[p + "pos_ff.CoreNet.0.bias"] = rnd(INNER, std=0.1)
        s[p + "pos_ff.CoreNet.3.weight"] = rnd(C, INNER)
        s[p + "pos_ff.CoreNet.3.bias"] = rnd(C, std=0.1)
        s[p + "pos_ff.layer_norm.weight"] = 1 + rnd(C, std=0.1)
        s[p + "pos_ff.layer_norm.bias"] = rnd(C, std=0.1)
    s["pos_emb.inv_freq"] = 1 / (10000 ** (torch.arange(0.0, C, 2.0) / C))
    s["crit.cluster_weight"] = rnd(len(CUTOFFS), C)
    s["crit.cluster_bias"] = rnd(len(CUTOFFS), std=0.5)
    s["crit.out_layers.0.weight"] = s["word_emb.emb_layers.0.weight"]
    s["crit.out_layers.0.bias"] = rnd(V, std=0.5)
    return s


def performer_matrices(case: Case, seed: int = 1) -> List[Optional[Tensor]]:
    """lmtool's ``proj_matrix`` per layer: (d_head, proj_dim), used as x @ proj_matrix."""
    if FEATURES[case.code] != "favor":
        return [None] * LAYERS
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(D, case.proj_dim, generator=g) * 0.5 for _ in range(LAYERS)]


@pytest.fixture()
def fake_lmtool(monkeypatch):
    """lmtool's module paths as throwaway modules in sys.modules (removed by ``forget``)."""
    modules = {"utils": types.ModuleType("utils")}
    modules["utils"].__path__ = []
    for mod_name, class_names in FAKE.items():
        module = modules.setdefault(mod_name, types.ModuleType(mod_name))
        for name in class_names:
            base = (object,) if mod_name in ("data_utils", "utils.vocabulary") else (nn.Module,)
            cls = type(name, base, {"__module__": mod_name, "__qualname__": name})
            setattr(module, name, cls)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)

    names = list(modules)

    def forget() -> None:
        for name in names:
            monkeypatch.delitem(sys.modules, name, raising=False)

    modules["forget"] = forget
    return modules


def fake_model(mods, case: Case, state: Dict[str, Tensor], omegas: Sequence[Optional[Tensor]]) -> nn.Module:
    """The object graph of lmtool's MemTransformerLM (attributes, ModuleLists, None out_projs, the tie as one
    Parameter), built from the throwaway classes."""
    mm, pas, mu = mods["model_main"], mods["utils.proj_adaptive_softmax"], mods["utils.model_utils"]
    params: Dict[int, nn.Parameter] = {}

    def param(key: str) -> nn.Parameter:
        return params.setdefault(id(state[key]), nn.Parameter(state[key].clone()))

    def linear(key: str, bias: bool = True) -> nn.Linear:
        module = nn.Linear(1, 1, bias=bias)
        module.weight = param(key + ".weight")
        if bias:
            module.bias = param(key + ".bias")
        return module

    def layer_norm(key: str) -> nn.LayerNorm:
        module = nn.LayerNorm(1)
        module.weight, module.bias = param(key + ".weight"), param(key + ".bias")
        return module

    model = mm.MemTransformerLM()
    for name, value in dict(n_token=V, no_pos=case.no_pos, d_embed=C, d_model=C, n_head=H, d_head=D, n_layer=LAYERS,
                            tgt_len=SEG, mem_len=0, ext_len=0, max_klen=SEG, attn_type=case.code,
                            sample_softmax=-1, same_length=False, clamp_len=case.clamp_len).items():
        setattr(model, name, value)
    emb = mm.AdaptiveEmbedding()
    emb.n_token, emb.d_embed, emb.d_proj, emb.div_val, emb.emb_scale = V, C, C, 1, C ** 0.5
    emb.cutoffs, emb.cutoff_ends = CUTOFFS + [V], [0] + CUTOFFS + [V]
    embedding = nn.Embedding(1, 1)
    embedding.weight = param("word_emb.emb_layers.0.weight")
    emb.emb_layers, emb.emb_projs = nn.ModuleList([embedding]), nn.ParameterList()
    model.word_emb, model.drop = emb, nn.Dropout(0.1)
    model.layers = nn.ModuleList()
    for i in range(LAYERS):
        p = f"layers.{i}.dec_attn."
        mod_name, cls_name = ATTN_CLASS[case.code]
        attn = getattr(mods[mod_name], cls_name)()
        attn.n_head, attn.d_model, attn.d_head, attn.dropout, attn.scale = H, C, D, 0.1, 1 / D ** 0.5
        attn.pre_lnorm = False
        if mod_name != "model_main":
            attn.layer_id, attn.num_layer, attn.eps = i, LAYERS, 1e-5
            attn.normalize_attn_scores = case.normalize
        if LAYOUT[case.code] == "qkvb":
            attn.qkvb_net = linear(p + "qkvb_net", bias=False)
        elif LAYOUT[case.code] == "qkv":
            attn.qkv_net = linear(p + "qkv_net", bias=False)
            attn.use_sum_norm = False
        else:
            attn.q_net, attn.kv_net = linear(p + "q_net", bias=False), linear(p + "kv_net", bias=False)
        attn.drop, attn.dropatt = nn.Dropout(0.1), nn.Dropout(0.0)
        attn.o_net = linear(p + "o_net", bias=False)
        attn.layer_norm = layer_norm(p + "layer_norm")
        if FEATURES[case.code] == "favor":
            attn.proj_dim, attn.proj_matrix = case.proj_dim, omegas[i].clone()
        if FEATURES[case.code] == "dpfp":
            attn.n_roll = case.n_roll
        ff = mu.PositionwiseFF()
        ff.d_model, ff.d_inner, ff.dropout, ff.pre_lnorm = C, INNER, 0.1, False
        ff.CoreNet = nn.Sequential(linear(f"layers.{i}.pos_ff.CoreNet.0"), nn.ReLU(inplace=True), nn.Dropout(0.1),
                                   linear(f"layers.{i}.pos_ff.CoreNet.3"), nn.Dropout(0.1))
        ff.layer_norm = layer_norm(f"layers.{i}.pos_ff.layer_norm")
        layer = (mm.PerformerDecoderLayer if FEATURES[case.code] == "favor" else mm.DecoderLayer)()
        layer.dec_attn, layer.pos_ff = attn, ff
        model.layers.append(layer)
    crit = pas.ProjectedAdaptiveLogSoftmax()
    crit.n_token, crit.d_embed, crit.d_proj, crit.div_val = V, C, C, 1
    crit.cutoffs, crit.cutoff_ends, crit.n_clusters = CUTOFFS + [V], [0] + CUTOFFS + [V], len(CUTOFFS)
    crit.shortlist_size, crit.head_size = CUTOFFS[0], CUTOFFS[0] + len(CUTOFFS)
    crit.cluster_weight, crit.cluster_bias = param("crit.cluster_weight"), param("crit.cluster_bias")
    crit.out_layers = nn.ModuleList([linear("crit.out_layers.0")])
    crit.out_projs = nn.ParameterList([None] * (len(CUTOFFS) + 1))
    crit.keep_order = False
    model.crit = crit
    model.pos_emb = mu.PositionalEmbedding()
    model.pos_emb.demb = C
    model.pos_emb.register_buffer("inv_freq", state["pos_emb.inv_freq"].clone())
    return model


def write_checkpoint(mods, tmp_path, case: Case, state, omegas, name: str = "best_model.pt") -> str:
    path = tmp_path / name
    torch.save(fake_model(mods, case, state, omegas), path)  # lmtool's train.py: torch.save(model)
    return str(path)


def write_vocab(tmp_path, symbols: Sequence[str]) -> str:
    path = tmp_path / f"vocab{len(symbols)}.txt"
    path.write_text("".join(f"{s}\n" for s in symbols))
    return str(path)


# ======================================================================================================================
# an independent reference of lmtool's forward (spec §1.2-§1.6), fp64
# ======================================================================================================================
def feature_map(kind: str, x: Tensor, omega: Optional[Tensor], n_roll: int) -> Tensor:
    if kind == "elu":
        return F.elu(x) + 1
    if kind == "dpfp":
        r = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
        return torch.cat([r * r.roll(shifts=j, dims=-1) for j in range(1, n_roll + 1)], dim=-1)
    u = x @ omega  # lmtool: prime(x, proj_matrix), u = x Omega
    offset = -(x ** 2).sum(-1, keepdim=True) / 2
    m = omega.shape[1]
    return (torch.cat([torch.exp(offset + u), torch.exp(offset - u)], dim=-1) + 1e-4) * (2 * m) ** -0.5


def reference_attention(case: Case, s: Dict[str, Tensor], p: str, x: Tensor, omega: Optional[Tensor]) -> Tensor:
    """x (B, T, C) -> attention vectors (B, T, H d) before o_net."""
    b, t, _ = x.shape
    scale, eps = 1 / math.sqrt(D), 1e-5
    if LAYOUT[case.code] == "qkvb":
        q, k, v, beta = (x @ s[p + "qkvb_net.weight"].t()).view(b, t, H, 3 * D + 1).split([D, D, D, 1], dim=-1)
        beta = torch.sigmoid(beta)[..., 0]  # (B, T, H)
    elif LAYOUT[case.code] == "qkv":
        q, k, v = (x @ s[p + "qkv_net.weight"].t()).view(b, t, H, 3 * D).split([D, D, D], dim=-1)
    else:
        q = (x @ s[p + "q_net.weight"].t()).view(b, t, H, D)
        k, v = (part.reshape(b, t, H, D) for part in (x @ s[p + "kv_net.weight"].t()).chunk(2, dim=-1))
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    if FEATURES[case.code] == "softmax":
        scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return torch.einsum("bhij,bjhd->bihd", probs, v).reshape(b, t, H * D)
    fq, fk = (feature_map(FEATURES[case.code], z, omega, case.n_roll) for z in (q, k))  # (B, T, H, D_phi)
    if case.code == 4:  # quadratic: scaled scores, masked to 0, divided by their row sum + eps
        scores = (torch.einsum("bihe,bjhe->bhij", fq, fk) * scale).masked_fill(~causal, 0.0)
        probs = scores / (scores.sum(-1, keepdim=True) + eps)
        return torch.einsum("bhij,bjhd->bihd", probs, v).reshape(b, t, H * D)
    delta = LAYOUT[case.code] == "qkvb"
    if delta:
        fq, fk = fq / fq.sum(-1, keepdim=True), fk / fk.sum(-1, keepdim=True)
    w = x.new_zeros(b, H, D, fk.shape[-1])  # (B, H, d_v, D_phi): value rows
    z = x.new_zeros(b, H, fk.shape[-1])
    out = []
    for i in range(t):
        key, query, value = fk[:, i], fq[:, i], v[:, i]  # (B, H, .)
        if not delta:
            w = w + value[..., :, None] * key[..., None, :]
        elif case.code == 44:  # full normalisation: retrieval key / beta rescaled by z_{t-1} . k_t (1 at t = 0)
            kd = x.new_ones(b, H) if i == 0 else (z * key).sum(-1)
            key_n, beta_n = key / (kd[..., None] + eps), beta[:, i] * kd
            retrieved = (w @ key_n[..., None])[..., 0]
            w = w + beta_n[..., None, None] * (value - retrieved)[..., :, None] * key_n[..., None, :]
        else:
            retrieved = (w @ key[..., None])[..., 0]  # W k
            w = w + beta[:, i][..., None, None] * (value - retrieved)[..., :, None] * key[..., None, :]
        z = z + key
        y = scale * (w @ query[..., None])[..., 0]
        if case.normalize:
            y = y / ((z * query).sum(-1, keepdim=True) + eps)
        out.append(y)
    return torch.stack(out, dim=1).reshape(b, t, H * D)


def reference_log_probs(case: Case, state: Dict[str, Tensor], omegas: Sequence[Optional[Tensor]],
                        tokens: Tensor) -> Tensor:
    """tokens (B, T) original ids -> log-probabilities (B, T, V) in original order."""
    s = {k: v.double() for k, v in state.items()}
    t = tokens.shape[1]
    x = s["word_emb.emb_layers.0.weight"][tokens] * math.sqrt(C)
    if not case.no_pos:
        pos = torch.arange(t - 1, -1, -1, dtype=torch.float64)  # descending: first token L - 1, last 0
        if case.clamp_len > 0:
            pos = pos.clamp(max=case.clamp_len)
        angles = pos[:, None] / 10000 ** (torch.arange(0, C, 2, dtype=torch.float64) / C)[None]
        x = x + torch.cat([angles.sin(), angles.cos()], dim=-1)
    for i in range(LAYERS):
        p = f"layers.{i}."
        omega = omegas[i].double() if omegas[i] is not None else None
        attn = reference_attention(case, s, p + "dec_attn.", x, omega) @ s[p + "dec_attn.o_net.weight"].t()
        x = F.layer_norm(x + attn, (C,), s[p + "dec_attn.layer_norm.weight"], s[p + "dec_attn.layer_norm.bias"])
        hidden = F.relu(x @ s[p + "pos_ff.CoreNet.0.weight"].t() + s[p + "pos_ff.CoreNet.0.bias"])
        ff = hidden @ s[p + "pos_ff.CoreNet.3.weight"].t() + s[p + "pos_ff.CoreNet.3.bias"]
        x = F.layer_norm(x + ff, (C,), s[p + "pos_ff.layer_norm.weight"], s[p + "pos_ff.layer_norm.bias"])
    weight, bias = s["crit.out_layers.0.weight"], s["crit.out_layers.0.bias"]
    ends = [0] + CUTOFFS + [V]
    head = torch.cat([x @ weight[:ends[1]].t() + bias[:ends[1]],
                      x @ s["crit.cluster_weight"].t() + s["crit.cluster_bias"]], dim=-1)
    head = head.log_softmax(-1)
    parts = [head[..., :ends[1]]]
    for i in range(1, len(ends) - 1):  # Transformer-XL: tail cluster i reads head column -i
        tail = (x @ weight[ends[i]:ends[i + 1]].t() + bias[ends[i]:ends[i + 1]]).log_softmax(-1)
        parts.append(head[..., -i, None] + tail)
    return torch.cat(parts, dim=-1)


# ======================================================================================================================
# conversion == lmtool's algorithm
# ======================================================================================================================
def load_fairseq(path: str, data_dir: str):
    from fairseq import checkpoint_utils

    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data_dir})
    return models[0].double().eval()


def converted_log_probs(model, to_fs: Tensor, tokens: Tensor) -> Tensor:
    with torch.no_grad():
        features, state, _ = model.decoder.forward_segment(to_fs[tokens], None)  # (B, T) fairseq ids
        return model.get_normalized_probs((features, {}), log_probs=True)[..., to_fs]  # (B, T, V) original order


@pytest.mark.parametrize("name", list(CASES))
def test_converted_model_equals_lmtool(name, fake_lmtool, tmp_path):
    case = CASES[name]
    state, omegas = synthetic_state(case, seed=len(name)), performer_matrices(case)
    src = write_checkpoint(fake_lmtool, tmp_path, case, state, omegas)
    fake_lmtool["forget"]()
    with pytest.raises(ModuleNotFoundError):
        torch.load(src, weights_only=False)
    out = tmp_path / "converted"
    conversion = main([src, str(out), "--vocab", write_vocab(tmp_path, word_vocab()), "--trust-pickle",
                       "--carry-over-fast-weight", "off"])
    assert "model_main" not in sys.modules and "utils.cuda_fast_weight_layer" not in sys.modules
    fields = conversion.model_cfg
    assert fields["lmtool_attn_type"] == case.code and fields["skip_attn_normalization"] == (not case.normalize)
    assert fields["adaptive_softmax_cutoff"] == "12,22" and conversion.mapping.dead == [0, 1]
    raw = torch.load(out / "model.pt", weights_only=True)
    weights = raw["model"]
    assert weights["decoder.adaptive_softmax.weights.0"].data_ptr() == \
        weights["decoder.embed_tokens.emb_layers.0.weight"].data_ptr()  # tied: one tensor, two keys
    assert not any(k.endswith("inv_freq") for k in weights)
    model = load_fairseq(str(out / "model.pt"), str(out))
    assert model.decoder.adaptive_softmax.weights["0"] is model.decoder.embed_tokens.emb_layers[0].weight
    if FEATURES[case.code] == "favor":  # check 12: the stored Omega is reproduced; redraws use lmtool's layout
        assert fields["performer_orthogonal_compat"] and fields["performer_proj_dim"] == case.proj_dim
        for i, layer in enumerate(model.decoder.layers):
            assert torch.equal(layer.self_attn.feature_map.omega, omegas[i].double())
    tokens = torch.randint(0, V, (BATCH, SEG), generator=torch.Generator().manual_seed(7))
    to_fs = torch.tensor(conversion.mapping.orig_to_fs)
    ours = converted_log_probs(model, to_fs, tokens)
    assert_close(ours, reference_log_probs(case, state, omegas, tokens), atol=case.atol, rtol=0)
    assert torch.equal(converted_log_probs(model, to_fs, tokens), ours)  # eval mode: Omega is not redrawn
    with torch.no_grad():
        features = model.decoder.forward_segment(to_fs[tokens], None)[0]
        dead = model.get_normalized_probs((features, {}), log_probs=True)[..., conversion.mapping.dead]
    assert dead.max() < -30  # <s>, <pad>: dead rows


def test_carry_over_flag_and_script(fake_lmtool, tmp_path):
    """The script: --carry-over-fast-weight on, the corpus cache.pt as --vocab, tokens_per_sample = tgt_len."""
    case = replace(CASES["24"], no_pos=True)
    state = synthetic_state(case, seed=3)
    src = write_checkpoint(fake_lmtool, tmp_path, case, state, [None] * LAYERS, name="latest_model.pt")
    corpus = fake_lmtool["data_utils"].Corpus()
    corpus.vocab = fake_lmtool["utils.vocabulary"].Vocab()
    corpus.vocab.idx2sym = word_vocab()
    torch.save(corpus, tmp_path / "cache.pt")
    fake_lmtool["forget"]()
    out = tmp_path / "converted"
    script = os.path.join(REPO_ROOT, "scripts", "convert_fast_weight_checkpoint.py")
    result = subprocess.run([sys.executable, script, src, str(out), "--vocab", str(tmp_path / "cache.pt"),
                             "--trust-pickle", "--carry-over-fast-weight", "on"],
                            capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--srcdict" in result.stdout
    raw = torch.load(out / "model.pt", weights_only=True)
    assert raw["cfg"]["model"]["carry_over_fast_weight"] and raw["cfg"]["model"]["no_pos"]
    assert raw["cfg"]["model"]["tokens_per_sample"] == SEG
    model = load_fairseq(str(out / "model.pt"), str(out))
    tokens = torch.randint(0, V, (BATCH, SEG), generator=torch.Generator().manual_seed(8))
    to_fs = torch.tensor(build_vocab_mapping(word_vocab(), CUTOFFS).orig_to_fs)
    assert_close(converted_log_probs(model, to_fs, tokens), reference_log_probs(case, state, [None] * LAYERS, tokens),
                 atol=1e-9, rtol=0)


# ======================================================================================================================
# clear errors
# ======================================================================================================================
def test_errors(fake_lmtool, tmp_path):
    case = CASES["24"]
    state = synthetic_state(case)
    good = write_checkpoint(fake_lmtool, tmp_path, case, state, [None] * LAYERS)
    model = fake_model(fake_lmtool, case, state, [None] * LAYERS)
    model.attn_type = 0
    torch.save(model, tmp_path / "txl.pt")
    model.attn_type = 14
    torch.save(model, tmp_path / "stepwise.pt")
    model.attn_type = 54
    torch.save(model, tmp_path / "followup.pt")
    sum_case = CASES["34"]
    sum_model = fake_model(fake_lmtool, sum_case, synthetic_state(sum_case), [None] * LAYERS)
    for layer in sum_model.layers:
        del layer.dec_attn.use_sum_norm  # a checkpoint of code older than the use_sum_norm flag
    torch.save(sum_model, tmp_path / "old_sum.pt")
    fake_lmtool["forget"]()
    vocab = write_vocab(tmp_path, word_vocab())
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError, match="--trust-pickle"):
        main([good, out, "--vocab", vocab])
    with pytest.raises(ConversionError, match="no vocabulary"):
        main([good, out, "--trust-pickle", "--carry-over-fast-weight", "off"])
    with pytest.raises(ConversionError, match="vocabulary size mismatch: 29 symbols"):
        main([good, out, "--trust-pickle", "--vocab", write_vocab(tmp_path, word_vocab(29)), "--carry-over-fast-weight",
              "off"])
    with pytest.raises(ConversionError, match="convert_transformer_xl_checkpoint.py"):
        main([str(tmp_path / "txl.pt"), out, "--trust-pickle", "--vocab", vocab,
              "--carry-over-fast-weight", "off"])
    with pytest.raises(ConversionError, match="attn_type 14 cannot be converted"):
        main([str(tmp_path / "stepwise.pt"), out, "--trust-pickle", "--vocab", vocab,
              "--carry-over-fast-weight", "off"])
    with pytest.raises(ConversionError, match="attn_type 54 cannot be converted.*follow-up"):
        main([str(tmp_path / "followup.pt"), out, "--trust-pickle", "--vocab", vocab,
              "--carry-over-fast-weight", "off"])
    with pytest.raises(ConversionError, match="--assume-raw-sum-features"):
        main([str(tmp_path / "old_sum.pt"), out, "--trust-pickle", "--vocab", vocab,
              "--carry-over-fast-weight", "off"])
    main([str(tmp_path / "old_sum.pt"), out, "--trust-pickle", "--vocab", vocab, "--carry-over-fast-weight", "off",
          "--assume-raw-sum-features",
          "--no-verify"])


def test_softmax_refuses_carry_over(fake_lmtool, tmp_path):
    case = CASES["2"]
    src = write_checkpoint(fake_lmtool, tmp_path, case, synthetic_state(case), [None] * LAYERS)
    fake_lmtool["forget"]()
    with pytest.raises(ConversionError, match="carry_over_fast_weight needs a CUDA fast weight layer"):
        main([src, str(tmp_path / "out"), "--trust-pickle", "--vocab", write_vocab(tmp_path, word_vocab()),
              "--carry-over-fast-weight", "on"])


def test_carry_over_must_be_stated_where_the_layer_can_carry(fake_lmtool, tmp_path):
    """lmtool does not store --carry_over_fast_weight: a CUDA fast weight layer needs the flag; a quadratic one
    (attn_type 2/4/5/6, which cannot carry) converts without it."""
    delta, quadratic = CASES["24"], CASES["4"]
    src = write_checkpoint(fake_lmtool, tmp_path, delta, synthetic_state(delta), performer_matrices(delta))
    linear = write_checkpoint(fake_lmtool, tmp_path, quadratic, synthetic_state(quadratic),
                              performer_matrices(quadratic), name="linear.pt")
    fake_lmtool["forget"]()
    vocab, out = write_vocab(tmp_path, word_vocab()), str(tmp_path / "out")
    with pytest.raises(ConversionError, match="attn_type 24 can carry.*--carry-over-fast-weight on.off.*log.txt"):
        main([src, out, "--trust-pickle", "--vocab", vocab, "--no-verify"])
    assert not main([src, out, "--trust-pickle", "--vocab", vocab, "--no-verify",
                     "--carry-over-fast-weight", "off"]).model_cfg["carry_over_fast_weight"]
    assert not main([linear, out, "--trust-pickle", "--vocab", vocab, "--no-verify"]).model_cfg[
        "carry_over_fast_weight"]
