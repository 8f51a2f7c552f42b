"""scripts/bench_transformer_xl.py: the original-algorithm reproduction computes what our model computes (so the
speed comparison compares equal work), and the benchmark prints a complete table for every implementation."""
import os
import subprocess
import sys
from types import ModuleType
from typing import List

import pytest
import torch

from tests.harness import REPO_ROOT, assert_close
from tests.scripts.tables import number, parse_tables, script_module

SCRIPT = os.path.join(REPO_ROOT, "scripts", "bench_transformer_xl.py")
IMPL_PREFIX = {"sdpa": "ours (sdpa)", "shift": "ours (shift)", "original": "original"}


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The script imported as a module."""
    return script_module("bench_transformer_xl")


def build_pair(bench: ModuleType, extra: List[str], tgt: int, mem: int, vocab: int = 40):
    """Our fairseq-built tiny model and the original reproduction carrying its weights, float64, eval mode."""
    opts = bench.parse_bench_args(["--quick"])
    shape = bench.Shape(batch=2, tgt=tgt, mem=mem, vocab=vocab)
    flags = ["--decoder-layers", "2", "--decoder-embed-dim", "16", "--decoder-attention-heads", "2",
             "--decoder-ffn-embed-dim", "24", "--adaptive-softmax-cutoff", "10,20", *extra]
    original_fn = bench.fairseq_flags
    bench.fairseq_flags = lambda *a, **k: original_fn(*a, **k) + flags
    try:
        cfg, task, ours, _ = bench.build(opts, "transformer_xl_tiny", "naive", shape)
    finally:
        bench.fairseq_flags = original_fn
    ours = ours.double().eval()
    with torch.no_grad():  # non-zero u, v and LayerNorm biases so every copied tensor matters
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    original = bench.build_original(cfg.model, ours.decoder).double().eval()
    return ours, original, task


@pytest.mark.parametrize("extra,tgt,mem", [
    ([], 5, 3),  # memory shorter than a segment: cut to M
    ([], 4, 7),  # memory longer than a segment: mlen < mem_len on the second segment
    (["--decoder-normalize-before", "--clamp-len", "3"], 5, 4),
    (["--same-length"], 5, 4),  # original same_length convention
])
def test_original_reproduction_equals_our_model_over_two_segments(bench, extra, tgt, mem):
    """float64 throughout, except that the original rounds the attention scores to fp32 for the masked_fill
    (``attn_score.float().masked_fill(...).type_as(attn_score)``): about 1e-8 relative, hence atol 1e-8; a wrong
    shift, mask, weight copy or memory update is off by 1e-2 or more."""
    ours, original, task = build_pair(bench, extra, tgt, mem)
    assert sum(p.numel() for p in original.parameters()) == sum(p.numel() for p in ours.parameters())
    assert original.word_emb is ours.decoder.embed_tokens and original.crit is ours.decoder.adaptive_softmax
    tokens = torch.randint(4, 40, (2, 2 * tgt + 1), generator=torch.Generator().manual_seed(3))
    state, mems = None, original.init_mems(2)
    for seg in range(2):
        src = tokens[:, seg * tgt:(seg + 1) * tgt]
        tgt_tokens = tokens[:, seg * tgt + 1:(seg + 1) * tgt + 1]
        with torch.no_grad():
            features, state, _ = ours.decoder.forward_segment(src, state)  # (B, T, C)
            hidden, mems = original(src.t(), mems)  # (T, B, C)
            assert_close(hidden.transpose(0, 1), features, atol=1e-8, msg=f"features, segment {seg}")
            for layer, (ours_mem, their_mem) in enumerate(zip(state.layers, mems)):
                assert_close(their_mem.transpose(0, 1), ours_mem.hidden, atol=1e-8,
                             msg=f"memory {layer}, segment {seg}")
            ours_nll = bench.nll_sum(ours, (features, {}), tgt_tokens, task.dictionary.pad())
            their_nll = bench.original_nll_sum(original, hidden, tgt_tokens.t(), task.dictionary.pad())
            assert_close(their_nll, ours_nll, atol=1e-7, msg=f"NLL, segment {seg}")
        assert mems[0].size(0) == min(mem, (seg + 1) * tgt) and len(mems) == len(original.layers) + 1


def test_original_rel_shift_is_ours(bench):
    from originals.transformer_xl import OriginalRelPartialLearnableMultiHeadAttn

    from fairseq_ext.ops.xl_relative import rel_shift_pad

    x = torch.randn(5, 9, 2, 3, dtype=torch.float64)  # (T, S, B, H)
    ours = rel_shift_pad(x.permute(2, 3, 0, 1)).permute(2, 3, 0, 1)  # ours is (..., T, S)
    assert torch.equal(OriginalRelPartialLearnableMultiHeadAttn._rel_shift(x), ours)


def test_zipf_tokens_and_dictionary(bench, tmp_path):
    tokens = bench.zipf_tokens(1000, 4, (4, 500), seed=0)
    assert tokens.shape == (4, 500) and tokens.min() >= 4 and tokens.max() < 1000
    assert (tokens == 4).float().mean() > (tokens >= 500).float().mean() / 10  # rank 1 is the most frequent
    bench.write_dictionary(str(tmp_path), 50)
    from fairseq.data import Dictionary

    assert len(Dictionary.load(str(tmp_path / "dict.txt"))) == 50


def run_bench(*args: str) -> str:
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def impl_of(label: str) -> str:
    return next(impl for impl, prefix in IMPL_PREFIX.items() if label.startswith(prefix))


@pytest.mark.slow
def test_quick_bench_prints_both_tables_for_every_implementation():
    stdout = run_bench("--in-process")
    assert "torch " + torch.__version__ in stdout and "python scripts/bench_transformer_xl.py --quick" in stdout
    assert "threads" in stdout
    train, evaluation = parse_tables(stdout)
    assert {impl_of(r["implementation"]) for r in train} == set(IMPL_PREFIX)
    params = set()
    for row in train:
        assert row["B × T / M"] == "2 × 8 / 8", row
        fastest, median = (number(v) for v in row["step ms (min / median)"].split("/"))
        assert 0 < fastest <= median, row
        assert number(row["tokens/s (fastest)"]) >= number(row["tokens/s (median)"]) > 0, row
        assert number(row["peak memory (MB)"]) > 0, row
        params.add(row["params"])
        if impl_of(row["implementation"]) == "original":
            assert row["vs original"] == "1.00×"
    assert len(params) == 1  # same parameter count for every implementation
    assert {impl_of(r["implementation"]) for r in evaluation} == set(IMPL_PREFIX)
    for row in evaluation:
        assert row["B × T_eval / M"] == "1 × 4 / 8", row
        for column in ("stream tokens/s (fastest)", "sliding tokens/s (fastest)", "stream speed-up"):
            assert number(row[column]) > 0, row


@pytest.mark.slow
def test_bench_isolates_each_configuration_in_a_subprocess():
    stdout = run_bench("--impls", "original", "--tables", "train")
    tables = parse_tables(stdout)
    assert len(tables) == 1 and len(tables[0]) == 1
    row = tables[0][0]
    assert impl_of(row["implementation"]) == "original" and number(row["tokens/s (fastest)"]) > 0
    assert "one fresh subprocess per row" in stdout
