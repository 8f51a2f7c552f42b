"""SHA-RNN converter (spec sha_rnn.md §5a, §1, §4) on synthetic checkpoints.

Synthetic checkpoints use the original ``SHARNN`` key names and shapes (``encoder``/``decoder`` tied, ``blocks.{l}``
with six LayerNorms incl. the unused ``lnout``, gates (1, 1, d), the Overparam ``vq.l1`` or its collapsed form, the
legacy ``qkvs``/``r_gate``) at tiny sizes, with a vocabulary rebuilt from a small train.txt. Each is converted, loaded
strictly into ``sha_rnn_lm`` through fairseq, run over two segments with carried (h, c) and memory, and its
log-probabilities, read in the original vocabulary order, must equal those of an independent float64 forward of the
original algorithm written below from spec §1.
"""
import math
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from torch import Tensor

from fairseq_ext.convert.errors import ConversionError
from fairseq_ext.convert.output import save_conversion
from fairseq_ext.convert.sha_rnn import convert_sha_rnn, convert_weights, main, read_source
from fairseq_ext.convert.text_vocab import scan_vocabulary
from fairseq_ext.convert.vocab_mapping import DEAD_BIAS, DEFAULT_SYMBOL_MAP, build_vocab_mapping
from tests.harness import REPO_ROOT, assert_close, single_thread

one_thread = pytest.fixture(autouse=True)(single_thread)


def _model_registered() -> bool:
    import fairseq_ext  # noqa: F401  (registers the models)
    from fairseq.models import MODEL_REGISTRY

    return "sha_rnn_lm" in MODEL_REGISTRY


needs_model = pytest.mark.skipif(not _model_registered(), reason="sha_rnn_lm is not registered (model not landed)")

DIM, FFN, LAYERS = 8, 32, 2
TRAIN_TXT = "60 61 62 63\n64 60 65\n\n66 67 61 68 69\n70 71 72 73 60\n"
VOCAB = ["60", "61", "62", "63", "<eos>", "64", "65", "66", "67", "68", "69", "70", "71", "72", "73"]
SEG, STREAMS = 6, 3


def write_train(tmp_path) -> str:
    path = tmp_path / "train.txt"
    path.write_text(TRAIN_TXT)
    return str(path)


def synthetic_state(attn: List[int], collapsed: bool, vocab: int = len(VOCAB), seed: int = 0) -> Dict[str, Tensor]:
    """A SHARNN state dict with the original names and shapes (decoder.weight IS encoder.weight)."""
    g = torch.Generator().manual_seed(seed)
    d = DIM

    def rnd(*shape: int, std: float = 0.3) -> Tensor:
        return torch.randn(*shape, generator=g) * std

    enc = rnd(vocab, d, std=1.0)
    s: Dict[str, Tensor] = {"encoder.weight": enc, "decoder.weight": enc, "decoder.bias": rnd(vocab, std=0.5)}
    for layer in range(LAYERS):
        p = f"blocks.{layer}."
        s[p + "rnn.weight_ih_l0"], s[p + "rnn.weight_hh_l0"] = rnd(4 * d, d), rnd(4 * d, d)
        s[p + "rnn.bias_ih_l0"], s[p + "rnn.bias_hh_l0"] = rnd(4 * d, std=0.1), rnd(4 * d, std=0.1)
        for name in ("lnstart", "lnmid", "lnmem", "lnout", "lnff", "lnxff"):
            s[f"{p}{name}.weight"], s[f"{p}{name}.bias"] = 1 + rnd(d, std=0.1), rnd(d, std=0.1)
        s[p + "ff.linear1.weight"], s[p + "ff.linear1.bias"] = rnd(FFN, d), rnd(FFN, std=0.1)
        if layer in attn:
            for name in ("qs", "ks", "vs"):
                s[f"{p}attn.{name}"] = rnd(1, 1, d, std=1.0)
            s[p + "attn.q.weight"], s[p + "attn.q.bias"] = rnd(d, d), rnd(d, std=0.1)
            s[p + "attn.qln.weight"], s[p + "attn.qln.bias"] = 1 + rnd(d, std=0.1), rnd(d, std=0.1)
            if not collapsed:
                s[p + "attn.vq.l1.weight"], s[p + "attn.vq.l1.bias"] = rnd(2 * d, d), rnd(2 * d, std=0.1)
            s[p + "attn.qkvs"], s[p + "attn.r_gate"] = rnd(1, 3, d), rnd(1, 1, d)
    return s


# ======================================================================================================================
# Independent reference: the original forward (spec §1), float64, dropout 0, batch-first
# ======================================================================================================================
def _ln(x: Tensor, s: Dict[str, Tensor], name: str) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-12) * s[name + ".weight"] + s[name + ".bias"]


def _lstm(x: Tensor, s: Dict[str, Tensor], p: str, h: Tensor, c: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """PyTorch LSTM gate order (i, f, g, o), written out step by step."""
    outs = []
    for t in range(x.size(1)):
        z = x[:, t] @ s[p + "weight_ih_l0"].T + s[p + "bias_ih_l0"] + h @ s[p + "weight_hh_l0"].T + s[p + "bias_hh_l0"]
        i, f, gg, o = z.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, 1), h, c


def _value_gate(s: Dict[str, Tensor], p: str) -> Tensor:
    vs = s[p + "vs"].reshape(-1)
    if p + "vq.l1.weight" not in s:  # vq_collapse(): vs is the gate as is
        return vs
    cf = torch.sigmoid(vs) @ s[p + "vq.l1.weight"].T + s[p + "vq.l1.bias"]
    c, f = cf.split(vs.numel())
    return torch.sigmoid(f) * torch.tanh(c)


def reference_segment(s: Dict[str, Tensor], tokens: Tensor, state: Optional[List], window: int) -> Tuple[Tensor, List]:
    """One segment (B, T) of original ids -> (log-probs (B, T, V), carried [(h, c, memory)] per block)."""
    b, t = tokens.shape
    d = s["encoder.weight"].size(1)
    x = s["encoder.weight"][tokens]
    new_state = []
    for layer in range(LAYERS):
        p = f"blocks.{layer}."
        h0, c0, mem = state[layer] if state else (x.new_zeros(b, d), x.new_zeros(b, d), None)
        h, hn, cn = _lstm(_ln(x, s, p + "lnstart"), s, p + "rnn.", h0, c0)  # no residual around the LSTM
        new_mem = None
        if p + "attn.q.weight" in s:
            a = p + "attn."
            m, h = _ln(h, s, p + "lnmem"), _ln(h, s, p + "lnmid")
            if mem is not None:
                mem = mem[:, max(mem.size(1) - (window - t), 0):]
            big = m if mem is None else torch.cat([mem, m], 1)
            new_mem = big[:, -window:]
            q = torch.sigmoid(s[a + "qs"].reshape(-1)) * _ln(h @ s[a + "q.weight"].T + s[a + "q.bias"], s, a + "qln")
            k = torch.sigmoid(s[a + "ks"].reshape(-1)) * big
            v = _value_gate(s, a) * big
            scores = q @ k.transpose(1, 2) / math.sqrt(d)  # (B, T, M + T)
            n_mem = big.size(1) - t
            causal = torch.ones(t, t, dtype=torch.bool).triu(1)
            mask = torch.cat([torch.zeros(t, n_mem, dtype=torch.bool), causal], 1)
            h = torch.softmax(scores.masked_fill(mask, float("-inf")), -1) @ v + h
        base = _ln(h, s, p + "lnff")
        z = _ln(h, s, p + "lnxff") @ s[p + "ff.linear1.weight"].T + s[p + "ff.linear1.bias"]
        z = z * torch.sigmoid(1.702 * z)
        x = z.view(b, t, -1, d).sum(-2) + base
        new_state.append((hn, cn, new_mem))
    logits = x @ s["decoder.weight"].T + s["decoder.bias"]
    return torch.log_softmax(logits, -1), new_state


# ======================================================================================================================
# conversion == original algorithm
# ======================================================================================================================
def load_converted(conversion, out_dir):
    from fairseq import checkpoint_utils

    path, _ = save_conversion(str(out_dir), conversion.checkpoint, conversion.mapping.symbols)
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": str(out_dir)})
    return models[0].double().eval()


CASES = {
    "attn-block0": dict(attn=[0], collapsed=False),
    "attn-block0-collapsed": dict(attn=[0], collapsed=True),
    "attn-all": dict(attn=[0, 1], collapsed=False),
    "attn-all-collapsed": dict(attn=[0, 1], collapsed=True),
}


@needs_model
@pytest.mark.parametrize("window", [5000, 8])
@pytest.mark.parametrize("name", sorted(CASES))
def test_converted_model_equals_original_algorithm(name, window, tmp_path):
    case = CASES[name]
    state = synthetic_state(case["attn"], case["collapsed"])
    src = read_source(state)
    assert (src.layers, src.dim, src.ffn, src.attn_layers, src.collapsed) == (LAYERS, DIM, FFN, case["attn"],
                                                                              case["collapsed"])
    segment = 1024 if window >= 1024 else SEG  # the stored T may not exceed the window (check_memory_window)
    conversion = convert_sha_rnn(src, scan_vocabulary([write_train(tmp_path)]), data=str(tmp_path),
                                 max_memory=window, tokens_per_sample=segment)
    cfg = conversion.model_cfg
    assert cfg["attn_layers"] == ",".join(map(str, case["attn"])) and cfg["collapse_value_gate"] == case["collapsed"]
    assert cfg["max_memory"] == window and conversion.checkpoint["cfg"]["task"]["tokens_per_sample"] == segment
    weights = conversion.checkpoint["model"]
    assert not any("lnout" in k or "qkvs" in k or "r_gate" in k for k in weights)
    assert weights["decoder.layers.0.attn.qs"].shape == (DIM,)
    mapping = conversion.mapping
    assert mapping.symbols[2] == "</s>" and mapping.dead == [0, 1, 3] and mapping.orig_to_fs[4] == 2

    model = load_converted(conversion, tmp_path)  # strict load inside fairseq
    ref = {k: v.double() for k, v in state.items()}
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, len(VOCAB), (STREAMS, 2 * SEG), generator=g)
    to_fs = torch.tensor(mapping.orig_to_fs)
    carried, ref_state = None, None
    with torch.no_grad():
        for seg, block in enumerate(tokens.split(SEG, dim=1)):
            features, carried, _ = model.decoder.forward_segment(to_fs[block], carried)
            log_probs = torch.log_softmax(model.decoder.output_layer(features), dim=-1)
            expected, ref_state = reference_segment(ref, block, ref_state, window)
            assert_close(log_probs[..., to_fs], expected, atol=1e-9, msg=f"segment {seg} log-probs")
            assert log_probs[..., mapping.dead].max() < DEAD_BIAS / 2


@needs_model
def test_pickled_model_criterion_list(tmp_path):
    """main.py's torch.save([model, criterion]): refused without --trust-pickle, converted through the shim with it
    (the original module paths model.SHARNN / splitcross.SplitCrossEntropyLoss are not importable here)."""
    import types

    state = synthetic_state([0], False)
    mod_model, mod_split = types.ModuleType("model"), types.ModuleType("splitcross")

    class SHARNN(torch.nn.Module):
        pass

    class SplitCrossEntropyLoss(torch.nn.Module):
        pass

    SHARNN.__module__, SHARNN.__qualname__ = "model", "SHARNN"
    SplitCrossEntropyLoss.__module__, SplitCrossEntropyLoss.__qualname__ = "splitcross", "SplitCrossEntropyLoss"
    mod_model.SHARNN, mod_split.SplitCrossEntropyLoss = SHARNN, SplitCrossEntropyLoss
    sys.modules["model"], sys.modules["splitcross"] = mod_model, mod_split
    try:
        net = SHARNN()
        net.encoder = torch.nn.Embedding(len(VOCAB), DIM)
        net.decoder = torch.nn.Linear(DIM, len(VOCAB))
        net.decoder.weight = net.encoder.weight
        blocks = torch.nn.ModuleList()
        for layer in range(LAYERS):
            block = torch.nn.Module()
            block.rnn = torch.nn.LSTM(DIM, DIM)
            for name in ("lnstart", "lnmid", "lnmem", "lnout", "lnff", "lnxff"):
                setattr(block, name, torch.nn.LayerNorm(DIM))
            block.ff = torch.nn.Module()
            block.ff.linear1 = torch.nn.Linear(DIM, FFN)
            if layer == 0:
                attn = torch.nn.Module()
                for name in ("qs", "ks", "vs", "qkvs", "r_gate"):
                    setattr(attn, name, torch.nn.Parameter(torch.zeros(1, 3 if name == "qkvs" else 1, DIM)))
                attn.q, attn.qln = torch.nn.Linear(DIM, DIM), torch.nn.LayerNorm(DIM)
                attn.vq = torch.nn.Module()
                attn.vq.l1 = torch.nn.Linear(DIM, 2 * DIM)
                block.attn = attn
            blocks.append(block)
        net.blocks = blocks
        net.load_state_dict(state)
        path = tmp_path / "ENWIK8.pt"
        torch.save([net, SplitCrossEntropyLoss()], str(path))
    finally:
        del sys.modules["model"], sys.modules["splitcross"]
    train = write_train(tmp_path)
    with pytest.raises(ConversionError, match="--trust-pickle"):
        main([str(path), str(tmp_path / "out"), "--train-txt", train, "--no-verify"])
    conversion = main([str(path), str(tmp_path / "out"), "--train-txt", train, "--trust-pickle"])
    direct = convert_sha_rnn(read_source(state), VOCAB, data=str(tmp_path / "out"))
    assert sorted(conversion.checkpoint["model"]) == sorted(direct.checkpoint["model"])
    for key, value in direct.checkpoint["model"].items():
        assert torch.equal(conversion.checkpoint["model"][key], value), key
    assert (tmp_path / "out" / "model.pt").is_file() and (tmp_path / "out" / "dict.txt").is_file()


# ======================================================================================================================
# errors
# ======================================================================================================================
def _mapping():
    return build_vocab_mapping(VOCAB, [], DEFAULT_SYMBOL_MAP)


def test_untied_output_is_refused():
    state = synthetic_state([0], False)
    state["decoder.weight"] = state["encoder.weight"] + 1
    with pytest.raises(ConversionError, match="ties"):
        convert_weights(read_source(state), _mapping())


def test_unknown_and_missing_keys_are_refused():
    state = synthetic_state([0], False)
    state["blocks.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match="does not use"):
        convert_weights(read_source(state), _mapping())
    state = synthetic_state([0], False)
    del state["blocks.1.lnff.bias"]
    with pytest.raises(ConversionError, match="lnff.bias"):
        convert_weights(read_source(state), _mapping())


def test_mixed_collapse_is_refused():
    state = synthetic_state([0, 1], False)
    del state["blocks.1.attn.vq.l1.weight"], state["blocks.1.attn.vq.l1.bias"]
    with pytest.raises(ConversionError, match="vq_collapse"):
        read_source(state)


def test_vocabulary_size_mismatch_and_fairseq_checkpoint(tmp_path):
    with pytest.raises(ConversionError, match="vocabulary size mismatch"):
        convert_sha_rnn(read_source(synthetic_state([0], False, vocab=len(VOCAB) + 1)), VOCAB, data=str(tmp_path))
    with pytest.raises(ConversionError, match="fairseq checkpoint"):
        read_source({"cfg": {}, "model": {}})


def test_script_help():
    result = subprocess.run([sys.executable, "scripts/convert_sha_rnn_checkpoint.py", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True)
    assert "--train-txt" in result.stdout and "--trust-pickle" in result.stdout
