"""The blocked ALiBi kernel on CUDA (skipped without it; run by scripts/bench_gpu.sh): several blocks with left-over
rows, cached keys and padding, fp32 against the float64 reference on CPU (outputs and gradients) and bf16 as close as
the full-bias sdpa kernel in bf16. On CUDA the strip's views have column offsets that are not 16-byte multiples, which
the fused SDPA kernels may need to copy; this checks that the numbers survive that."""
import pytest
import torch

from fairseq_ext.ops.alibi import alibi_attention, alibi_slopes
from fairseq_ext.ops.alibi.blocked import alibi_attention_blocked

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("q_offset,t,s,rows", [(0, 300, 300, 64), (37, 203, 240, 50), (0, 1000, 1000, None)])
def test_blocked_on_cuda_matches_the_cpu_reference(q_offset, t, s, rows):
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(2, 4, n, 32, generator=g, dtype=torch.float64) for n in (t, s, s))
    pad = torch.zeros(2, s, dtype=torch.bool)
    pad[1, :5] = True
    slopes = alibi_slopes(4)
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    out_ref = alibi_attention(*ref, slopes, q_offset=q_offset, key_padding_mask=pad, impl="naive")
    weight = torch.randn(out_ref.shape, generator=g, dtype=torch.float64)
    grads_ref = torch.autograd.grad((out_ref * weight).sum(), ref)
    cuda = [x.float().cuda().requires_grad_() for x in (q, k, v)]
    out = alibi_attention_blocked(*cuda, slopes.cuda(), q_offset=q_offset, key_padding_mask=pad.cuda(), rows=rows)
    grads = torch.autograd.grad((out * weight.float().cuda()).sum(), cuda)
    torch.testing.assert_close(out.double().cpu(), out_ref, atol=2e-4, rtol=2e-4)
    for a, e in zip(grads, grads_ref):
        torch.testing.assert_close(a.double().cpu(), e, atol=2e-3, rtol=2e-3)


def test_blocked_bf16_on_cuda_is_as_close_as_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 700, 64, generator=g).cuda() for _ in range(3))
    slopes = alibi_slopes(8).cuda()
    ref = alibi_attention(q.double(), k.double(), v.double(), slopes, impl="naive")
    half = [x.bfloat16() for x in (q, k, v)]
    err_blocked = (alibi_attention_blocked(*half, slopes).double() - ref).abs().max()
    err_sdpa = (alibi_attention(*half, slopes, impl="sdpa").double() - ref).abs().max()
    assert err_blocked <= 2 * err_sdpa + 1e-3, (err_blocked, err_sdpa)
