"""Checkpoints frozen before a refactor give the same log-probabilities today (``make_frozen.py`` wrote them with the
code of commit bd5ac92: every preset family's mechanisms, and tiny originals converted by that commit's converters).

They load through fairseq's own loader, so the upgrade hooks of today's modules run: Transformer-XL's q/k/v
projections become one ``qkv_proj``, one output bias per cluster where the original had that, and dead vocabulary
rows stored inside the trained output tensors move into ``dead_rows`` (bit-for-bit the same evaluation).
"""
import os

import pytest
import torch

from tests.frozen.make_frozen import load, stream_log_probs
from tests.harness import single_thread

one_thread = pytest.fixture(autouse=True)(single_thread)

DATA = os.path.join(os.path.dirname(__file__), "data")
CASES = sorted(os.listdir(DATA))


def test_every_family_is_frozen():
    families = {"alibi", "transformer_xl", "adaptive_span", "all_attention", "fast_weight", "sha_rnn"}
    assert all(any(case.startswith(f) for case in CASES) for f in families)
    assert sum(case.startswith("converted_") for case in CASES) == 4


@pytest.mark.parametrize("case", CASES)
def test_frozen_checkpoint_gives_the_same_log_probs(case):
    expected = torch.load(os.path.join(DATA, case, "expected.pt"))
    model = load(os.path.join(DATA, case)).float()
    log_probs = stream_log_probs(model, expected["tokens"], expected["segment"])
    diff = (log_probs - expected["log_probs"]).abs().max().item()
    assert diff <= 1e-6, f"{case}: log-probs moved by {diff:.3g} since the checkpoint was frozen"


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("converted_")])
def test_parameters_keep_the_order_optimizer_states_were_saved_in(case):
    """fairseq's optimizer state indexes parameters by their position in ``model.parameters()``: every parameter that
    a checkpoint trained here stored under the same name (its state dict is in registration order) comes in the
    same relative order today. (Converted checkpoints carry no optimizer state; their key order is the converter's.)"""
    stored = list(torch.load(os.path.join(DATA, case, "model.pt"), weights_only=False)["model"])
    model = load(os.path.join(DATA, case))
    position = {name: index for index, name in enumerate(stored)}
    common = [name for name, _ in model.named_parameters() if name in position]
    assert len(common) > len(list(model.parameters())) // 2  # only upgraded tensors (fused qkv, biases) are renamed
    assert [position[name] for name in common] == sorted(position[name] for name in common)


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("converted_")])
def test_old_conversions_are_upgraded_to_dead_rows_outside_the_trained_tensors(case):
    """Converted before dead_rows existed: the bias rows held -40. Loaded today, the rows are zeros in the trained
    tensors, the fixed logit is in the buffers, and evaluation is bit-for-bit what it was."""
    stored = torch.load(os.path.join(DATA, case, "model.pt"), weights_only=False)["model"]
    assert not any("dead_rows" in key for key in stored), "the fixture must be in the old format"
    model = load(os.path.join(DATA, case)).float()
    dead_rows = [m for m in model.modules() if m.__class__.__name__ == "DeadRows" and m.active]
    assert len(dead_rows) == 1
    dead = dead_rows[0].mask.nonzero().squeeze(1).tolist()
    assert dead and set(dead) <= {0, 1, 2, 3} and dead_rows[0].logit.item() == -40.0
    biases = [p for name, p in model.named_parameters() if "bias" in name and p.dim() == 1
              and p.numel() >= max(dead) + 1 and ("output" in name or "softmax.bias" in name
                                                   or "softmax.biases.0" in name)]
    assert biases and all(torch.count_nonzero(b[dead]) == 0 for b in biases)
    expected = torch.load(os.path.join(DATA, case, "expected.pt"))
    assert torch.equal(stream_log_probs(model, expected["tokens"], expected["segment"]), expected["log_probs"])
