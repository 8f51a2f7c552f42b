"""The fused CPU adaptive-span attention (ops/adaptive_span/fused.py) == the naive gather in outputs and in the
gradients of q, k, v, key_pe, the spans and the persistent vectors (float64, odd sizes, several head groups and query
blocks, shared and per-head position embeddings, per-head and per-layer spans, with and without renormalisation and
persistent slots); trimmed == full window; skew's dropout draws; auto's choice; errors that name the fix. (The carried-cache stream == the brute force:
test_adaptive_span_ops.py.)"""
import pytest
import torch

import fairseq_ext.ops.adaptive_span.fused as fused_module
from fairseq_ext.ops.adaptive_span import (
    FUSED_MIN_BYTES,
    adaptive_span_attention,
    adaptive_span_attention_fused,
    adaptive_span_mask,
    block_rows,
    fit_keys,
    select_impl,
)
from fairseq_ext.ops.adaptive_span.fused import group_size
from tests.harness import assert_close, assert_same_grads
from tests.ops.adaptive_span.test_adaptive_span_ops import _inputs

F64 = torch.float64


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 1 KB: a few heads per group at these sizes, so the group loop runs several times."""
    monkeypatch.setattr(fused_module, "TILE_BYTES", 1024)


@pytest.mark.parametrize("m,span,rows", [(48, 5, 16), (33, 40, 11), (7, 9, 7), (12, 40, 1), (5, 7, None)])
@pytest.mark.parametrize("masked,renorm", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("layer_span", [False, True])
def test_fused_matches_naive_with_gradients(small_tiles, m, span, rows, masked, renorm, layer_span):
    q, k, v, key_pe, z, _, _ = _inputs(2, 3, m, span, 4, seed=m + span)
    z = z[:1] if layer_span else z  # one span per layer: mask (1, L)
    inputs = [x.requires_grad_() for x in (q, k, v, key_pe, z)]
    width = (rows or block_rows(m)) + span
    assert group_size(6, rows or block_rows(m), width, 8) < 6  # several head groups

    def run(impl):
        mask = adaptive_span_mask(z, span, 2) if masked else None
        if impl == "fused":
            return adaptive_span_attention_fused(q, k, v, key_pe, mask, renorm=renorm, rows=rows)
        return adaptive_span_attention(q, k, v, key_pe, mask, renorm=renorm, impl=impl)

    assert_same_grads(lambda: run("fused"), lambda: run("naive"), inputs if masked else inputs[:4])
    if masked:  # the spans get a gradient (some heads have columns in the ramp)
        grad_z, = torch.autograd.grad((run("fused") * torch.randn(2, 3, m, 4, dtype=F64)).sum(), z)
        assert grad_z.abs().sum() > 0


@pytest.mark.parametrize("m,span,n,rows", [(48, 5, 7, 16), (33, 40, 3, 11), (7, 9, 1, 7), (12, 4, 20, 1)])
@pytest.mark.parametrize("masked,layer_span", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("pe_per_head", [False, True])
def test_fused_with_persistent_slots_matches_naive_with_gradients(small_tiles, m, span, n, rows, masked, layer_span,
                                                                  pe_per_head):
    """All-attention: N slots share the softmax and the renormalisation, unmasked; the gradients of the stored
    persistent keys and values (scaled by sqrt(D), sqrt(N) in use) included; per-head and per-layer spans."""
    q, k, v, key_pe, z, pers_k, pers_v = _inputs(2, 3, m, span, 4, n, seed=m + n, pe_per_head=pe_per_head)
    z = z[:1] if layer_span else z  # one span per layer: mask (1, L)
    inputs = [x.requires_grad_() for x in (q, k, v, key_pe, pers_k, pers_v, z)]
    assert group_size(6, rows, rows + span + n, 8) < 6  # several head groups

    def run(impl):
        mask = adaptive_span_mask(z, span, 2) if masked else None
        if impl == "fused":
            return adaptive_span_attention_fused(q, k, v, key_pe, mask, pers_k, pers_v, rows=rows)
        return adaptive_span_attention(q, k, v, key_pe, mask, pers_k, pers_v, impl=impl)

    assert_same_grads(lambda: run("fused"), lambda: run("naive"), inputs if masked else inputs[:6])


@pytest.mark.parametrize("m,span", [(5, 7), (16, 9)])
def test_fused_per_head_key_pe(small_tiles, m, span):
    q, k, v, key_pe, z, _, _ = _inputs(2, 3, m, span, 4, seed=7, pe_per_head=True)
    inputs = [x.requires_grad_() for x in (q, k, v, key_pe, z)]
    assert_same_grads(
        lambda: adaptive_span_attention(q, k, v, key_pe, adaptive_span_mask(z, span, 3), impl="fused"),
        lambda: adaptive_span_attention(q, k, v, key_pe, adaptive_span_mask(z, span, 3), impl="naive"), inputs)


def test_fused_trimmed_window_equals_full_window():
    span, ramp, m, d = 200, 8, 5, 4
    z = torch.tensor([0.1, 0.02], dtype=F64)
    q, k, v, key_pe, _, _, _ = _inputs(1, 2, m, span, d, seed=2)
    keep = 72
    full = adaptive_span_attention(q, k, v, key_pe, adaptive_span_mask(z, span, ramp), eps=0.0, impl="fused")
    trimmed = adaptive_span_attention(q, fit_keys(k, keep + m), fit_keys(v, keep + m), key_pe[:, -keep:],
                                      adaptive_span_mask(z, span, ramp, length=keep), eps=0.0, impl="fused")
    assert_close(trimmed, full)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("n", [0, 3])
def test_fused_draws_skews_dropout_mask(small_tiles, dtype, n):
    """The same seed drops the same weights as the skew path (one (B, H, M, L + N) draw before the group loop), and
    the gradients follow the dropped weights."""
    q, k, v, key_pe, z, pers_k, pers_v = _inputs(2, 3, 16, 5, 4, n, dtype=dtype)
    inputs = [x.requires_grad_() for x in (q, k, v, key_pe, z) + ((pers_k, pers_v) if n else ())]
    outs = []
    for impl in ("skew", "fused"):
        def run(impl=impl):
            torch.manual_seed(11)
            return adaptive_span_attention(q, k, v, key_pe, adaptive_span_mask(z, 5, 2), pers_k, pers_v,
                                           dropout_p=0.3, impl=impl)
        outs.append(run)
    tol = {} if dtype == F64 else {"atol": 1e-5, "rtol": 1e-5}
    assert_same_grads(outs[1], outs[0], inputs, **tol)
    torch.manual_seed(11)
    assert not torch.allclose(outs[1](), adaptive_span_attention(q, k, v, key_pe, adaptive_span_mask(z, 5, 2),
                                                                  pers_k, pers_v, impl="fused"))


def test_auto_picks_fused_on_cpu_for_large_scores():
    """fused from 8 MiB of (B H, M, L + M) scores on: B 8, H 4, M 256 at L 64 (10.5 MB) and L 1024 (42 MB), not at
    B 1 (1.3 / 5.2 MB, where it was 0.87x skew in training); persistent memory does not change the choice."""
    assert FUSED_MIN_BYTES == 8 << 20
    assert select_impl("auto", 64, 256, batch_heads=32) == "fused"
    assert select_impl("auto", 1024, 256, batch_heads=32, dtype=F64) == "fused"
    assert select_impl("auto", 64, 256, batch_heads=4) == "blocked"
    assert select_impl("auto", 1024, 256, batch_heads=4) == "skew"
    assert select_impl("auto", 1024, 256, batch_heads=32, dtype=torch.bfloat16) == "skew"
    assert select_impl("auto", 64, 256, batch_heads=32, device_type="cuda") == "blocked"
    assert select_impl("skew", 64, 256, batch_heads=32) == "skew"
    assert select_impl("fused", 64, 256, device_type="cuda") == "fused"


def test_group_size_fills_the_tile_budget():
    assert group_size(32, 64, 64 + 1024, 4, tile_bytes=1 << 20) == 3  # 278,528 bytes per head
    assert group_size(32, 64, 64 + 64, 4, tile_bytes=1 << 20) == 32  # every head
    assert group_size(32, 256, 256 + 8192, 4, tile_bytes=1 << 20) == 1  # at least one


def test_fused_errors_name_the_fix():
    q, k, v, key_pe, z, pers_k, pers_v = _inputs(1, 2, 6, 4, 4, 3)
    with pytest.raises(ValueError, match="persistent memory needs both pers_k and pers_v"):
        adaptive_span_attention_fused(q, k, v, key_pe, adaptive_span_mask(z, 4, 2), pers_k)
    with pytest.raises(ValueError, match="float32 / float64.*--attn-impl skew"):
        adaptive_span_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), key_pe.bfloat16(), impl="fused")
    with pytest.raises(ValueError, match="4 rows per block do not divide the 6 queries"):
        adaptive_span_attention_fused(q, k, v, key_pe, rows=4)


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("n", [0, 3])
def test_fused_without_gradients_equals_the_training_forward(small_tiles, renorm, n):
    """Under no_grad nothing is stored for a backward; the output is the same."""
    q, k, v, key_pe, z, pers_k, pers_v = _inputs(2, 3, 16, 5, 4, n)
    z.requires_grad_()
    mask = adaptive_span_mask(z, 5, 2)
    with_grad = adaptive_span_attention_fused(q, k, v, key_pe, mask, pers_k, pers_v, renorm=renorm)
    assert with_grad.requires_grad
    with torch.no_grad():
        assert_close(adaptive_span_attention_fused(q, k, v, key_pe, mask, pers_k, pers_v, renorm=renorm),
                     with_grad.detach())
