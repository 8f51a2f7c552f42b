"""ops/alibi/flash.py: the adapter to FlashAttention-2's ``alibi_slopes``. flash-attn runs on CUDA only, so on CPU
the adapter drives ``documented_flash``, a float64 kernel written from flash_attn_func's documented contract
((B, T, H, D) layout, scores scaled by 1/sqrt(D), "-alibi_slope * |i + seqlen_k - seqlen_q - j|" added, causal mask
aligned to the bottom right), and is compared with the naive reference: training (T = S) and decoding over a cache
(T < S), both bias forms, outputs and gradients. The real kernel against the reference: tests/gpu."""
import math

import pytest
import torch

from fairseq_ext.ops.alibi import alibi_attention, alibi_slopes
from fairseq_ext.ops.alibi.flash import alibi_attention_flash, load_flash_attn_func
from tests.harness import assert_close


def documented_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, alibi_slopes=None):
    """flash_attn_func's documented result, written out: q (B, T, H, D), k/v (B, S, H, D) -> (B, T, H, D)."""
    assert dropout_p == 0.0 and alibi_slopes.dtype == torch.float32 and alibi_slopes.dim() == 1
    t, s = q.size(1), k.size(1)
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(q.size(-1))
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale  # (B, H, T, S)
    i = torch.arange(t)[:, None]
    j = torch.arange(s)[None, :]
    scores = scores - alibi_slopes.to(q.dtype)[:, None, None] * (i + s - t - j).abs()  # (B, H, T, S)
    if causal:
        scores = scores.masked_fill(j > i + s - t, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


@pytest.mark.parametrize("t,s", [(7, 7), (1, 9), (3, 11)])
@pytest.mark.parametrize("form", ["relative", "key_index"])
def test_adapter_equals_the_reference(t, s, form):
    g = torch.Generator().manual_seed(0)
    heads = 5
    q = torch.randn(2, heads, t, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(2, heads, s, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    slopes = alibi_slopes(heads)
    ours = alibi_attention(q, k, v, slopes, q_offset=s - t, form=form, impl="naive")
    flash = alibi_attention_flash(q, k, v, slopes, q_offset=s - t, form=form, kernel=documented_flash)
    assert flash.shape == ours.shape == (2, heads, t, 4)
    assert_close(flash, ours, atol=1e-12, rtol=1e-10, msg="output")
    grad = torch.randn_like(ours)
    for name, a, e in zip("qkv", torch.autograd.grad(flash, (q, k, v), grad), torch.autograd.grad(ours, (q, k, v),
                                                                                                   grad)):
        assert_close(a, e, atol=1e-12, rtol=1e-10, msg=f"gradient of {name}")


def test_what_flash_attn_cannot_do_is_refused_with_the_alternative():
    q = torch.randn(1, 2, 3, 4)
    kv = torch.randn(1, 2, 5, 4)
    slopes = alibi_slopes(2)
    with pytest.raises(ValueError, match="no key padding mask .* use --attn-impl sdpa"):
        alibi_attention_flash(q, kv, kv, slopes, q_offset=2, key_padding_mask=torch.zeros(1, 5, dtype=torch.bool),
                              kernel=documented_flash)
    with pytest.raises(ValueError, match="causal only"):
        alibi_attention_flash(q, kv, kv, slopes, q_offset=2, causal=False, kernel=documented_flash)
    with pytest.raises(ValueError, match=r"last of the 5 keys \(q_offset 2, got 0\)"):
        alibi_attention_flash(q, kv, kv, slopes, q_offset=0, kernel=documented_flash)
    with pytest.raises(RuntimeError, match="runs on CUDA in fp16 / bf16 .* use --attn-impl sdpa"):
        alibi_attention(q, kv, kv, slopes, q_offset=2, impl="flash")


def test_missing_flash_attn_is_a_clear_error():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("flash-attn imports on this machine")
    with pytest.raises(RuntimeError, match="needs CUDA and `pip install flash-attn`. Use --attn-impl sdpa or flex"):
        load_flash_attn_func()
