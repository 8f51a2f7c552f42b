"""Converter for ALiBi-fork checkpoints (spec §5, acceptance check 10) on a synthetic fork-style checkpoint:
stock ``transformer_lm_wiki103`` weights at tiny dims with the fork's config fields, scored by the fork's formula
(no positions; a (B*H, T, T) float mask of causal -inf plus m_h * j at index b*H + h on stock attention)."""
import argparse
import os

import pytest
import torch
from omegaconf import OmegaConf

from fairseq_ext.convert.alibi_fork import ConversionError, convert_alibi_fork_state, main
from fairseq_ext.models.alibi_lm import AlibiLanguageModel
from fairseq_ext.ops.alibi import alibi_slopes
from tests.harness import assert_close, build_model, tiny_dictionary, training_cfg

TINY = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-input-dim", "32",
        "--decoder-output-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "4",
        "--adaptive-input-cutoff", "20,40", "--adaptive-softmax-cutoff", "20,40", "--tokens-per-sample", "16",
        "--dropout", "0"]
HEADS = 4


def fork_logits(stock_model, x: torch.Tensor) -> torch.Tensor:
    """The fork's forward: stock layers, no positions, the key-index bias folded into a 3-D float mask."""
    b, t = x.shape
    slopes = alibi_slopes(HEADS)
    bias = slopes[:, None, None] * torch.arange(t, dtype=torch.float32)[None, None, :]  # (H, 1, T)
    future = torch.triu(torch.full((t, t), float("-inf")), 1)  # (T, T)
    mask = (future[None] + bias).repeat(b, 1, 1)  # (B*H, T, T); row b*H + h holds head h
    stock_model.decoder.buffered_future_mask = lambda tensor: mask
    with torch.no_grad():
        return stock_model(x)[0]


@pytest.fixture()
def fork_checkpoint(tmp_path):
    d = tiny_dictionary(60)
    data = tmp_path / "data"
    data.mkdir()
    d.save(str(data / "dict.txt"))
    stock = build_model("transformer_lm_wiki103", d, TINY).eval()
    cfg = OmegaConf.to_container(training_cfg("transformer_lm_wiki103", TINY, data=str(data)), resolve=True)
    cfg["model"]["max_tokens"] = 9216  # the fork's extra field
    weights = dict(stock.state_dict())
    weights["decoder.embed_positions._float_tensor"] = torch.FloatTensor(1)  # the 2021 fork stores it
    state = {"args": None, "cfg": cfg, "model": weights,
             "optimizer_history": [{"criterion_name": "AdaptiveLoss", "optimizer_name": "FairseqNAG",
                                    "lr_scheduler_state": {"best": 3.1}, "num_updates": 286000}],
             "extra_state": {"metrics": argparse.Namespace(note="pickled object, as fairseq's meters are"),
                             "previous_training_time": 1234.5}}
    path = tmp_path / "alibi_wt103_L16.pt"
    torch.save(state, path)
    return path, data, d


def test_conversion_needs_trust_for_pickled_objects_then_loads_as_alibi(fork_checkpoint, tmp_path):
    from fairseq import checkpoint_utils

    src, data, d = fork_checkpoint
    dst = tmp_path / "checkpoint_best.pt"
    with pytest.raises(ConversionError, match="--trust-pickle"):
        main([str(src), str(dst)])
    main([str(src), str(dst), "--trust-pickle"])
    converted = torch.load(dst, weights_only=True)  # what fairseq-eval-lm does
    assert converted["cfg"]["model"]["_name"] == "alibi_lm_wiki103"
    assert "max_tokens" not in converted["cfg"]["model"]
    assert not any("embed_positions" in k for k in converted["model"])
    assert "metrics" not in converted["extra_state"]

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(dst)], arg_overrides={"data": str(data)})
    model = models[0].eval()
    assert isinstance(model, AlibiLanguageModel)
    assert not any("embed_positions" in k for k in model.state_dict())

    # The fork's stock weights, scored with the fork's formula, match the converted model.
    stock = build_model("transformer_lm_wiki103", d, TINY + ["--no-token-positional-embeddings"]).eval()
    stock.load_state_dict(fairseq_weights(model))
    x = torch.randint(4, len(d), (3, 16), generator=torch.Generator().manual_seed(0))
    expected = fork_logits(stock, x)
    with torch.no_grad():
        assert_close(model(x)[0], expected, atol=1e-5)


def test_key_index_conversion_reproduces_the_fork_exactly(fork_checkpoint, tmp_path):
    from fairseq import checkpoint_utils

    src, data, d = fork_checkpoint
    dst = tmp_path / "key_index.pt"
    main([str(src), str(dst), "--trust-pickle", "--bias-form", "key_index"])
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(dst)], arg_overrides={"data": str(data)})
    model = models[0].eval()
    assert model.decoder.layers[0].self_attn.positional.form == "key_index"
    stock = build_model("transformer_lm_wiki103", d, TINY + ["--no-token-positional-embeddings"]).eval()
    stock.load_state_dict(fairseq_weights(model))
    x = torch.randint(4, len(d), (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(model(x)[0], fork_logits(stock, x), atol=2e-6)


def test_unconverted_fork_checkpoint_loads_as_stock_transformer_lm(fork_checkpoint):
    """Why the converter exists: fairseq silently builds the stock model (sinusoidal positions, no bias)."""
    from fairseq import checkpoint_utils

    src, data, _ = fork_checkpoint
    state = torch.load(src, weights_only=False)
    state["extra_state"].pop("metrics")
    clean = os.path.join(os.path.dirname(src), "clean.pt")
    torch.save(state, clean)
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([clean], arg_overrides={"data": str(data)})
    assert not isinstance(models[0], AlibiLanguageModel)
    assert models[0].decoder.embed_positions is not None


def test_converter_rejects_other_archs_and_double_conversion(fork_checkpoint):
    src, _, _ = fork_checkpoint
    state = torch.load(src, weights_only=False)
    converted = convert_alibi_fork_state(state)
    with pytest.raises(ConversionError, match="already an alibi_lm"):
        convert_alibi_fork_state(converted)
    state["cfg"]["model"]["_name"] = "transformer_wmt_en_de"
    with pytest.raises(ConversionError, match="not an ALiBi-fork transformer_lm"):
        convert_alibi_fork_state(state)
    with pytest.raises(ConversionError, match="argparse Namespace"):
        convert_alibi_fork_state({"args": argparse.Namespace(arch="transformer_lm"), "model": {}})


def test_stock_transformer_lm_checkpoint_is_refused_unless_acknowledged(fork_checkpoint, tmp_path):
    """Same weights, same arch name: only the fork's cfg.model.max_tokens tells a fork checkpoint from a stock one;
    without it the conversion needs --trained-with-alibi (a stock model converted would score a wrong ppl)."""
    from fairseq_ext.errors import ConfigError

    src, _, _ = fork_checkpoint
    state = torch.load(src, weights_only=False)
    del state["cfg"]["model"]["max_tokens"]
    stock = tmp_path / "transformer_lm_wiki103.pt"
    torch.save(state, stock)
    dst = tmp_path / "converted.pt"
    with pytest.raises(ConfigError, match=r"looks like stock fairseq's, not the ALiBi fork's: its cfg\['model'\] lacks "
                                          r"'max_tokens'.*re-run with --trained-with-alibi") as error:
        main([str(stock), str(dst), "--trust-pickle"])
    assert isinstance(error.value, ConversionError) and not dst.exists()
    main([str(stock), str(dst), "--trust-pickle", "--trained-with-alibi"])
    assert torch.load(dst, weights_only=True)["cfg"]["model"]["_name"] == "alibi_lm_wiki103"
    with pytest.raises(ConversionError, match="lacks 'max_tokens'"):
        convert_alibi_fork_state(state)
    assert convert_alibi_fork_state(state, trained_with_alibi=True)["cfg"]["model"]["_name"] == "alibi_lm_wiki103"


def fairseq_weights(model) -> dict:
    """The model's state dict without its (empty) train stream: the keys stock transformer_lm has."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
