"""scripts/plot_spans.py (learned spans per head and layer, Sukhbaatar et al. 2019, arXiv 1905.07799, Fig. 4): the
printed spans equal min(L, ceil(z·L) + R) on the checkpoint's z values, the PNG is written, and other models /
fixed-span checkpoints are refused with the reason. Fast tests save a state dict in the layout fairseq-train writes;
the slow one reads a checkpoint of a real in-process fairseq-train run."""
import math
import os
from types import ModuleType
from typing import Dict, List

import pytest
import torch

from tests.harness import REPO_ROOT, USER_DIR, fairseq_preprocess, fairseq_train, random_corpus
from tests.scripts.tables import script_module

SCRIPT = os.path.join(REPO_ROOT, "scripts", "plot_spans.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plot_spans() -> ModuleType:
    """The script imported as a module."""
    return script_module("plot_spans")


def save_checkpoint(path: str, zs: List[torch.Tensor], *, arch: str = "adaptive_span_tiny", attn_span: int = 48,
                    ramp: int = 8, fixed_span: bool = False, with_cfg: bool = True) -> str:
    """A checkpoint in fairseq-train's layout (cfg as plain containers with the arch as cfg['model']['_name'],
    model state dict, args None)."""
    model: Dict[str, torch.Tensor] = {"decoder.embed_tokens.weight": torch.randn(10, 8)}
    for i, z in enumerate(zs):
        model[f"decoder.layers.{i}.self_attn.q_proj.weight"] = torch.randn(8, 8)
        model[f"decoder.layers.{i}.self_attn.span.z"] = z
    cfg = {"model": {"_name": arch, "attn_span": attn_span, "adapt_span_ramp": ramp,
                     "fixed_span": fixed_span}, "task": {"_name": "streaming_lm"}}
    torch.save({"args": None, "cfg": cfg if with_cfg else None, "model": model, "optimizer_history": [],
                "extra_state": {"epoch": 1}, "last_optimizer_state": {}}, path)
    return path


def parse_table(stdout: str) -> Dict[int, List[float]]:
    """{layer (1-based): spans per head} from the printed markdown table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            rows[int(cells[0])] = [float(v) for v in cells[1].split(",")]
    return rows


def expected_spans(z: torch.Tensor, max_span: int, ramp: int) -> List[float]:
    return [float(min(max_span, max(0, math.ceil(float(v) * max_span) + ramp))) for v in z.reshape(-1).tolist()]


def assert_png(path: str) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_MAGIC, head
    assert os.path.getsize(path) > 5_000  # axes, markers and labels, not an empty canvas


def test_spans_follow_the_formula_and_png_is_written(plot_spans, tmp_path, capsys):
    zs = [torch.tensor([0.0, 0.01, 0.5, 1.0]), torch.tensor([0.3, 0.0625, 0.99, 0.2])]
    ckpt = save_checkpoint(str(tmp_path / "ckpt.pt"), zs)
    out = str(tmp_path / "plots" / "spans.png")
    assert plot_spans.main([ckpt, "--out", out]) == 0
    stdout = capsys.readouterr().out
    rows = parse_table(stdout)
    assert rows == {1: expected_spans(zs[0], 48, 8), 2: expected_spans(zs[1], 48, 8)}
    assert rows[1] == [8.0, 9.0, 32.0, 48.0]  # z = 0 -> R; ceil(0.48) + 8; 24 + 8; capped at L
    assert "L = 48, R = 8" in stdout and f"wrote {out}" in stdout
    assert_png(out)


def test_spans_equal_the_model_monitoring(plot_spans):
    """The same numbers as AdaptiveSpanMask.spans() (what span_avg / span_max log)."""
    from fairseq_ext.modules.attention.adaptive_span_mask import AdaptiveSpanMask

    mask = AdaptiveSpanMask(4, 8192, 32, 0.0, 0.0)
    with torch.no_grad():
        mask.z.copy_(torch.tensor([0.0, 0.1234567, 0.999, 1.0]))
    assert plot_spans.span_tokens(mask.z, 8192, 32).tolist() == mask.spans().tolist()


def test_one_span_per_layer_and_log_scale(plot_spans, tmp_path, capsys):
    zs = [torch.tensor([0.25]), torch.tensor([0.0]), torch.tensor([1.0])]
    ckpt = save_checkpoint(str(tmp_path / "layer.pt"), zs, attn_span=1024, ramp=32)
    out = str(tmp_path / "log.png")
    assert plot_spans.main([ckpt, "--out", out, "--log-y"]) == 0
    assert parse_table(capsys.readouterr().out) == {1: [288.0], 2: [32.0], 3: [1024.0]}
    assert_png(out)


def test_no_plot_prints_the_table_only(plot_spans, tmp_path, capsys):
    ckpt = save_checkpoint(str(tmp_path / "c.pt"), [torch.tensor([0.5, 0.5])])
    assert plot_spans.main([ckpt, "--no-plot", "--out", str(tmp_path / "none.png")]) == 0
    assert parse_table(capsys.readouterr().out) == {1: [32.0, 32.0]}
    assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("kind,message", [
    ("other_model", "not an adaptive_span_lm checkpoint: its arch is 'transformer_xl_tiny' (model "
                    "transformer_xl_lm)"),
    ("unknown_arch", "its arch is 'my_lm' (model not registered)"),
    ("fixed", "a fixed-span adaptive_span_lm checkpoint"),
    ("no_z", "no learned spans to plot"),
    ("no_cfg", "no cfg['model'] in the checkpoint"),
    ("missing", "no such file"),
    ("not_torch", "cannot be read as a weights-only fairseq checkpoint"),
])
def test_clear_errors(plot_spans, tmp_path, capsys, kind: str, message: str):
    path = str(tmp_path / f"{kind}.pt")
    if kind == "other_model":
        save_checkpoint(path, [torch.zeros(2)], arch="transformer_xl_tiny")
    elif kind == "unknown_arch":
        save_checkpoint(path, [torch.zeros(2)], arch="my_lm")
    elif kind == "fixed":
        save_checkpoint(path, [], fixed_span=True)
    elif kind == "no_z":
        save_checkpoint(path, [])
    elif kind == "no_cfg":
        save_checkpoint(path, [torch.zeros(2)], with_cfg=False)
    elif kind == "not_torch":
        with open(path, "w") as f:
            f.write("not a checkpoint\n")
    out = str(tmp_path / "x.png")
    assert plot_spans.main([path, "--out", out]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not os.path.exists(out)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> str:
    """adaptive_span_tiny trained for 4 updates by an in-process fairseq-train (streaming_lm, lm_loss,
    adagrad_clip), spans initialised at z = 0.3 so that they move."""
    raw = tmp_path_factory.mktemp("ps-raw")
    data = fairseq_preprocess(str(tmp_path_factory.mktemp("ps-bin")),
                              trainpref=random_corpus(os.path.join(raw, "train.txt"), 60, seed=40),
                              validpref=random_corpus(os.path.join(raw, "valid.txt"), 20, seed=41))
    save_dir = str(tmp_path_factory.mktemp("ps-ckpt"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fairseq_train([data, "--user-dir", USER_DIR, "--task", "streaming_lm", "--arch", "adaptive_span_tiny",
                       "--tokens-per-sample", "12", "--batch-size", "4", "--criterion", "lm_loss",
                       "--optimizer", "adagrad_clip", "--adagrad-clip", "0.03", "--lr", "0.07",
                       "--adapt-span-init", "0.3", "--max-update", "4", "--save-dir", save_dir,
                       "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--seed", "1", "--no-progress-bar",
                       "--log-format", "simple"])
    finally:
        torch.set_num_threads(threads)
    return os.path.join(save_dir, "checkpoint_last.pt")


@pytest.mark.slow
def test_real_fairseq_checkpoint(plot_spans, trained_checkpoint, tmp_path, capsys):
    state = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    cfg = state["cfg"]["model"]
    zs = [state["model"][f"decoder.layers.{i}.self_attn.span.z"] for i in range(cfg["decoder_layers"])]
    assert all(z.shape == (cfg["decoder_attention_heads"],) for z in zs)
    assert any(not torch.equal(z, torch.full_like(z, 0.3)) for z in zs)  # training moved the spans
    out = str(tmp_path / "spans.png")
    assert plot_spans.main([trained_checkpoint, "--out", out]) == 0
    rows = parse_table(capsys.readouterr().out)
    assert rows == {i + 1: expected_spans(z, cfg["attn_span"], cfg["adapt_span_ramp"]) for i, z in enumerate(zs)}
    assert_png(out)
