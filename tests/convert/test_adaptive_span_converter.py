"""Adaptive-span converter (spec adaptive_span.md §4.2, §5, acceptance check 16) on synthetic checkpoints.

Synthetic checkpoints use the original key names and shapes (``module.`` prefix, ``current_val`` (K, 1, 1),
``mask_template`` (L,), the persistent-memory duplicates) at tiny sizes, with a vocabulary rebuilt from a small
train.txt. Each is converted, loaded through fairseq, run over consecutive blocks with carried caches, and its
log-probabilities, read in the original vocabulary order, must equal those of an independent plain forward of the
original algorithm (tests/convert/adaptive_span_reference.py, float64).
"""
import os
import subprocess
import sys
from typing import Dict, List, Optional

import pytest
import torch

from fairseq_ext.convert.adaptive_span import SPAN_RAMP, ConversionError, convert_adaptive_span, main, read_source
from fairseq_ext.convert.output import save_conversion
from fairseq_ext.convert.text_vocab import scan_vocabulary
from fairseq_ext.convert.vocab_mapping import DEAD_BIAS
from fairseq_ext.errors import MissingFileError
from tests.convert.adaptive_span_reference import ReferenceAdaptiveSpan
from tests.harness import REPO_ROOT, assert_close, single_thread

one_thread = pytest.fixture(autouse=True)(single_thread)

HIDDEN, HEADS, FFN, LAYERS = 16, 2, 24, 2
TRAIN_TXT = "60 61 62 63\n64 60 65\n\n66 67 61 68 69\n70 71 72 73 60\n"  # enwik8-like bytes, an empty line
# first appearance: 60 61 62 63 <eos> 64 65 66 67 68 69 70 71 72 73 -> 15 types, <eos> at id 4
VOCAB = ["60", "61", "62", "63", "<eos>", "64", "65", "66", "67", "68", "69", "70", "71", "72", "73"]
BLOCK, STREAMS, BLOCKS = 8, 3, 3


def write_train(tmp_path, text: str = TRAIN_TXT) -> str:
    path = tmp_path / "train.txt"
    path.write_text(text)
    return str(path)


def synthetic_checkpoint(*, span: int = 40, adaptive: bool = True, pers_mem: int = 0, z: Optional[List] = None,
                         vocab: int = len(VOCAB), seed: int = 0) -> Dict:
    """The original save_checkpoint dict: DDP model state (module.), plain Adagrad state, logger, scheduler_iter."""
    g = torch.Generator().manual_seed(seed)
    h, k, d = HIDDEN, HEADS, HIDDEN // HEADS

    def rnd(*shape, std=0.3):
        return torch.randn(*shape, generator=g) * std

    s = {"key_pe": rnd(1, d, span, std=1.0), "in_emb.weight": rnd(vocab, h, std=1.0),
         "out_emb.weight": rnd(vocab, h), "out_emb.bias": rnd(vocab, std=0.5)}
    for layer in range(LAYERS):
        p = f"layers.{layer}."
        for name in ("proj_query", "proj_key", "proj_val", "proj_out"):
            s[p + f"attn.{name}.weight"] = rnd(h, h)
        if adaptive:
            zl = torch.rand(k, generator=g) if z is None else torch.tensor(z[layer], dtype=torch.float32)
            s[p + "attn.attn.adaptive_span._mask.current_val"] = zl.view(k, 1, 1)
            s[p + "attn.attn.adaptive_span._mask.mask_template"] = torch.linspace(1 - span, 0, span)
        s[p + "norm1.weight"], s[p + "norm1.bias"] = 1 + rnd(h, std=0.1), rnd(h, std=0.1)
        if pers_mem:
            s[p + "attn.attn.persistent_memory.key"] = rnd(k, d, pers_mem, std=1 / d ** 0.5)
            s[p + "attn.attn.persistent_memory.val"] = rnd(k, pers_mem, d, std=1 / pers_mem ** 0.5)
            if adaptive:  # the same AdaptiveSpan module, reached a second time
                for name in ("current_val", "mask_template"):
                    s[p + f"attn.attn.persistent_memory.adaptive_span._mask.{name}"] = \
                        s[p + f"attn.attn.adaptive_span._mask.{name}"]
        else:
            s[p + "ff.fc1.weight"], s[p + "ff.fc1.bias"] = rnd(FFN, h), rnd(FFN, std=0.1)
            s[p + "ff.fc2.weight"], s[p + "ff.fc2.bias"] = rnd(h, FFN), rnd(h, std=0.1)
            s[p + "norm2.weight"], s[p + "norm2.bias"] = 1 + rnd(h, std=0.1), rnd(h, std=0.1)
    model = {"module." + key: value for key, value in s.items()}
    optimizer = {"state": {i: {"step": torch.tensor(3000.0), "sum": torch.rand_like(v)}
                           for i, v in enumerate(model.values())},
                 "param_groups": [{"lr": 0.07, "lr_decay": 0, "weight_decay": 0, "initial_accumulator_value": 0,
                                   "grad_clip": 0.03, "initial_lr": 0.07, "params": list(range(len(model)))}]}
    return {"iter_no": 3, "model": model, "optimizer": optimizer, "scheduler_iter": 3000,
            "logger": {"step": [1000, 2000, 3000], "train_bpc": [3.1, 2.5, 2.2], "val_bpc": [3.0, 2.6, 2.3],
                       "span_avg": [33.0, 34.5, 35.0], "span_max": [40.0, 40.0, 40.0]}}


def stripped(ckpt: Dict) -> Dict[str, torch.Tensor]:
    return {k[len("module."):]: v for k, v in ckpt["model"].items()}


def load_converted(conversion, out_dir):
    from fairseq import checkpoint_utils

    path, _ = save_conversion(str(out_dir), conversion.checkpoint, conversion.mapping.symbols)
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": str(out_dir)})
    return models[0].double().eval()


def assert_matches_reference(model, mapping, ref: ReferenceAdaptiveSpan, seed: int = 1, atol: float = 1e-9) -> None:
    """BLOCKS consecutive blocks of STREAMS streams, caches carried on both sides."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, len(mapping.orig_to_fs), (STREAMS, BLOCK * BLOCKS), generator=g)  # original ids
    to_fs = torch.tensor(mapping.orig_to_fs)
    state, caches = None, None
    with torch.no_grad():
        for blk, block in enumerate(tokens.split(BLOCK, dim=1)):
            features, state, _ = model.decoder.forward_segment(to_fs[block], state)
            logits = model.decoder.output_layer(features)  # (B, M, V_fairseq), float64
            log_probs = torch.log_softmax(logits, dim=-1)
            expected, caches = ref.forward(block, caches)
            assert_close(log_probs[..., to_fs], expected, atol=atol, msg=f"block {blk} log-probs")
            fairseq_lp = model.get_normalized_probs((logits, {}), log_probs=True)  # fairseq computes it in fp32
            assert_close(fairseq_lp[..., to_fs], expected.float(), atol=1e-5, msg=f"block {blk} fairseq log-probs")
            assert log_probs[..., mapping.dead].max() < DEAD_BIAS / 2  # dead specials: probability ~0


# ======================================================================================================================
# conversion == original algorithm
# ======================================================================================================================
CASES = {
    "adaptive-span": dict(),  # enwik8.pt-like: per-head z, FF
    "fixed-span": dict(adaptive=False),  # no current_val anywhere
    "persistent-memory": dict(pers_mem=5),  # all-attention: no FF/norm2, duplicated span keys
    "persistent-memory-fixed-span": dict(pers_mem=3, adaptive=False),
    # small spans at L = 130: the model trims its window to 66 keys and its cache (the reference never trims; the
    # original does, like the model). Trimming drops softmax mass where the mask is 0, which moves the 1e-8 of the
    # renormalisation a / (sum a + 1e-8) relative to the kept mass: ~1e-8 differences, hence atol 1e-7 for this case
    "trimmed": dict(span=130, z=[[0.01, 0.05], [0.0, 0.02]]),
    "full-span": dict(z=[[1.0, 1.0], [0.0, 1.0]]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_converted_model_equals_original_algorithm(name, tmp_path):
    ckpt = synthetic_checkpoint(**CASES[name])
    src = read_source(ckpt)
    conversion = convert_adaptive_span(src, scan_vocabulary([write_train(tmp_path)]), data=str(tmp_path),
                                       ramp=SPAN_RAMP)
    cfg = conversion.model_cfg
    assert cfg["fixed_span"] == ("adaptive" in CASES[name]) and cfg["pers_mem_size"] == CASES[name].get("pers_mem", 0)
    assert (cfg["decoder_layers"], cfg["decoder_embed_dim"], cfg["decoder_attention_heads"]) == (LAYERS, HIDDEN, HEADS)
    assert cfg["attn_span"] == CASES[name].get("span", 40)
    mapping = conversion.mapping
    assert mapping.symbols[2] == "</s>" and mapping.dead == [0, 1, 3] and mapping.orig_to_fs[4] == 2
    weights = conversion.checkpoint["model"]
    assert not any("mask_template" in k or "persistent_memory" in k for k in weights)
    if "adaptive" not in CASES[name]:
        z = stripped(ckpt)["layers.1.attn.attn.adaptive_span._mask.current_val"]
        assert torch.equal(weights["decoder.layers.1.self_attn.span.z"], z.view(HEADS))
    model = load_converted(conversion, tmp_path)
    if name == "trimmed":  # the model computes only the last 66 of the 130 distances
        assert [layer.self_attn.window().span for layer in model.decoder.layers] == [66, 66]
    assert_matches_reference(model, mapping, ReferenceAdaptiveSpan(stripped(ckpt), HEADS),
                             atol=1e-7 if name == "trimmed" else 1e-9)


def test_ramp_is_a_conversion_setting(tmp_path):
    """R is not in the checkpoint: --adapt-span-ramp reaches the model config and changes the mask as in the
    original with that ramp."""
    ckpt = synthetic_checkpoint(z=[[0.2, 0.5], [0.1, 0.0]], seed=4)
    conversion = convert_adaptive_span(read_source(ckpt), VOCAB, data=str(tmp_path), ramp=8, dropout=0.3)
    assert conversion.model_cfg["adapt_span_ramp"] == 8 and conversion.model_cfg["dropout"] == 0.3
    model = load_converted(conversion, tmp_path)
    assert_matches_reference(model, conversion.mapping, ReferenceAdaptiveSpan(stripped(ckpt), HEADS, ramp=8))


# ======================================================================================================================
# vocabulary and dictionary
# ======================================================================================================================
def test_vocabulary_is_rebuilt_like_the_original_data_py(tmp_path):
    """line.split() + ['<eos>'] for every line (empty lines and a last line without newline too), first-appearance
    order, the same result however the file is cut into pieces; valid/test continue the same dictionary."""
    path = write_train(tmp_path)
    assert scan_vocabulary([path]) == VOCAB
    for chunk in (1, 2, 3, 5, 7):
        assert scan_vocabulary([path], read_chars=chunk) == VOCAB
    single = tmp_path / "one_line.txt"  # text8-like: one line, no trailing newline
    single.write_text("t h e _ c a t _ s a t")
    for chunk in (1, 4, 1 << 20):
        assert scan_vocabulary([str(single)], read_chars=chunk) == ["t", "h", "e", "_", "c", "a", "s", "<eos>"]
    (tmp_path / "empty_first.txt").write_text("\n  \n b\ta  b\n")
    assert scan_vocabulary([str(tmp_path / "empty_first.txt")], read_chars=2) == ["<eos>", "b", "a"]
    (tmp_path / "valid.txt").write_text("60 99\n")
    assert scan_vocabulary([path, str(tmp_path / "valid.txt")]) == VOCAB + ["99"]


def test_dict_txt_order_and_binarised_ids(tmp_path):
    """dict.txt lists the original symbols in original order minus <eos> (= </s>, id 2); fairseq-preprocess
    --srcdict gives every original token its converted id and ends every line (empty ones too) with </s>,
    exactly the original's <eos>."""
    from fairseq.data import Dictionary, data_utils

    from tests.harness import fairseq_preprocess

    conversion = convert_adaptive_span(read_source(synthetic_checkpoint()), VOCAB, data=str(tmp_path), ramp=SPAN_RAMP)
    save_conversion(str(tmp_path), conversion.checkpoint, conversion.mapping.symbols)
    lines = (tmp_path / "dict.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == [s for s in VOCAB if s != "<eos>"]
    assert Dictionary.load(str(tmp_path / "dict.txt")).symbols == conversion.mapping.symbols
    assert conversion.mapping.symbols == ["<s>", "<pad>", "</s>", "<unk>"] + VOCAB[:4] + VOCAB[5:]

    fairseq_preprocess(str(tmp_path / "bin"), write_train(tmp_path), srcdict=str(tmp_path / "dict.txt"))
    ids = data_utils.load_indexed_dataset(str(tmp_path / "bin" / "train"), None)
    binarised = torch.cat([ids[i] for i in range(len(ids))]).tolist()
    original = [VOCAB.index(tok) for line in TRAIN_TXT.splitlines() for tok in line.split() + ["<eos>"]]
    assert binarised == [conversion.mapping.orig_to_fs[i] for i in original]


# ======================================================================================================================
# the command line, end to end
# ======================================================================================================================
def test_script_end_to_end(tmp_path):
    """Released-checkpoint layout in a file (weights-only loadable: no --trust-pickle needed), converted by the
    script, loaded by fairseq, equal to the reference; provenance recorded."""
    ckpt = synthetic_checkpoint(pers_mem=4, seed=9)
    src = tmp_path / "enwik8.pt"
    torch.save(ckpt, src)
    out = tmp_path / "converted"
    script = os.path.join(REPO_ROOT, "scripts", "convert_adaptive_span_checkpoint.py")
    result = subprocess.run([sys.executable, script, str(src), str(out), "--train-txt", write_train(tmp_path),
                             "--tokens-per-sample", "16", "--adapt-span-ramp", "32"], capture_output=True, text=True,
                            cwd=str(tmp_path),
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fairseq-preprocess" in result.stdout and "--srcdict" in result.stdout

    raw = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert raw["cfg"]["model"]["_name"] == "adaptive_span_lm" and raw["cfg"]["task"]["tokens_per_sample"] == 16
    assert raw["cfg"]["model"]["pers_mem_size"] == 4 and raw["cfg"]["model"]["dropout"] == 0.0
    info = raw["extra_state"]["converted_from_adaptive_span"]
    assert info["iter_no"] == 3 and info["last_val_bpc"] == pytest.approx(2.3)
    from fairseq import checkpoint_utils

    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(out / "model.pt")])
    conversion = convert_adaptive_span(read_source(ckpt), VOCAB, data=str(out), ramp=SPAN_RAMP)
    assert_matches_reference(models[0].double().eval(), conversion.mapping,
                             ReferenceAdaptiveSpan(stripped(ckpt), HEADS))


def test_cli_errors_and_pickled_checkpoints(tmp_path):
    import argparse

    ckpt = synthetic_checkpoint(seed=2)
    src = tmp_path / "text8.pt"
    torch.save(ckpt, src)
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError, match="--train-txt"):
        main([str(src), out])
    with pytest.raises(MissingFileError, match="does not exist: pass --train-txt"):
        main([str(src), out, "--train-txt", str(tmp_path / "missing.txt")])
    short = tmp_path / "short.txt"
    short.write_text("60 61\n")
    with pytest.raises(ConversionError, match="vocabulary size mismatch: the text gives 3 types.*15 rows.*train.txt"):
        main([str(src), out, "--train-txt", str(short)])

    ckpt["args"] = argparse.Namespace(attn_span=40)  # a pickled object torch's weights-only loader refuses
    pickled = tmp_path / "pickled.pt"
    torch.save(ckpt, pickled)
    with pytest.raises(ConversionError, match="--trust-pickle"):
        main([str(pickled), out, "--train-txt", write_train(tmp_path)])
    with pytest.raises(ConversionError, match="--adapt-span-ramp R, the original run's --adapt-span-ramp"):
        main([str(pickled), out, "--train-txt", write_train(tmp_path), "--trust-pickle"])
    conversion = main([str(pickled), out, "--train-txt", write_train(tmp_path), "--trust-pickle",
                       "--adapt-span-ramp", "32"])
    assert conversion.mapping.symbols[4:] == [s for s in VOCAB if s != "<eos>"]


# ======================================================================================================================
# clear errors
# ======================================================================================================================
def test_duplicate_span_parameters_must_agree():
    ckpt = synthetic_checkpoint(pers_mem=3)
    key = "module.layers.1.attn.attn.persistent_memory.adaptive_span._mask.current_val"
    ckpt["model"][key] = ckpt["model"][key] + 0.25
    with pytest.raises(ConversionError, match="persistent_memory.adaptive_span._mask.current_val differs"):
        convert_adaptive_span(read_source(ckpt), VOCAB, ramp=SPAN_RAMP)
    ckpt = synthetic_checkpoint(pers_mem=3)
    del ckpt["model"]["module.layers.0.attn.attn.persistent_memory.adaptive_span._mask.mask_template"]
    with pytest.raises(ConversionError, match="lacks 'layers.0.attn.attn.persistent_memory.adaptive_span"):
        convert_adaptive_span(read_source(ckpt), VOCAB, ramp=SPAN_RAMP)


def test_layout_errors():
    ckpt = synthetic_checkpoint()
    ckpt["model"]["module.in_emb.emb_layers.0.weight"] = torch.zeros(3, 4)
    with pytest.raises(ConversionError, match="adapt-io"):
        read_source(ckpt)
    ckpt = synthetic_checkpoint()
    ckpt["model"]["module.layers.2.norm1.weight"] = torch.ones(HIDDEN)
    with pytest.raises(ConversionError, match="lacks 'layers.2.attn.proj_query.weight'"):
        convert_adaptive_span(read_source(ckpt), VOCAB, ramp=SPAN_RAMP)
    ckpt = synthetic_checkpoint(pers_mem=2)
    ckpt["model"]["module.layers.1.ff.fc1.weight"] = torch.zeros(1, HIDDEN)
    with pytest.raises(ConversionError, match="does not use.*persistent-memory layer"):
        convert_adaptive_span(read_source(ckpt), VOCAB, ramp=SPAN_RAMP)
    ckpt = synthetic_checkpoint()
    ckpt["model"]["module.layers.0.attn.attn.adaptive_span._mask.mask_template"] *= 2
    with pytest.raises(ConversionError, match="mask_template is not linspace"):
        convert_adaptive_span(read_source(ckpt), VOCAB, ramp=SPAN_RAMP)
    ckpt = synthetic_checkpoint()
    ckpt["model"]["layers.0.norm1.weight"] = ckpt["model"].pop("module.layers.0.norm1.weight")
    with pytest.raises(ConversionError, match="only some model keys"):
        read_source(ckpt)
    with pytest.raises(ConversionError, match="fairseq checkpoint"):
        read_source({"cfg": {}, "model": {}})
    with pytest.raises(ConversionError, match="no <eos>"):
        convert_adaptive_span(read_source(synthetic_checkpoint()), [str(i) for i in range(len(VOCAB))], ramp=SPAN_RAMP)


def test_vocabulary_from_the_original_corpus_pt(tmp_path, monkeypatch):
    """--corpus-pt: the original's pickled data.Corpus, read through the class shim (data.py not importable)."""
    import types

    data_module = types.ModuleType("data")
    corpus_cls, dictionary_cls = type("Corpus", (), {}), type("Dictionary", (), {})
    for cls in (corpus_cls, dictionary_cls):
        cls.__module__ = "data"
        setattr(data_module, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "data", data_module)
    corpus = corpus_cls()
    corpus.dictionary = dictionary_cls()
    corpus.dictionary.idx2word = list(VOCAB)
    corpus.dictionary.word2idx = {w: i for i, w in enumerate(VOCAB)}
    corpus.train = torch.zeros(5, dtype=torch.long)
    torch.save(corpus, tmp_path / "corpus.pt")
    monkeypatch.delitem(sys.modules, "data")
    src = tmp_path / "enwik8.pt"
    torch.save(synthetic_checkpoint(seed=6), src)
    args = [str(src), str(tmp_path / "out"), "--corpus-pt", str(tmp_path / "corpus.pt"), "--no-verify"]
    with pytest.raises(ConversionError, match="--trust-pickle"):
        main(args)
    with pytest.raises(ConversionError, match="not both"):
        main(args + ["--train-txt", write_train(tmp_path)])
    conversion = main(args + ["--trust-pickle", "--adapt-span-ramp", "32"])
    assert conversion.mapping.symbols[4:] == [s for s in VOCAB if s != "<eos>"]


def test_ramp_must_be_given_for_adaptive_spans_only(tmp_path):
    """The ramp is not in the checkpoint: an adaptive-span conversion needs it; a fixed-span one does not use it."""
    with pytest.raises(ConversionError, match="0.25 nats.*--adapt-span-ramp R.*uses 32"):
        convert_adaptive_span(read_source(synthetic_checkpoint()), VOCAB)
    fixed = convert_adaptive_span(read_source(synthetic_checkpoint(adaptive=False)), VOCAB)
    assert fixed.model_cfg["fixed_span"]
