"""bf16 smoke test of every family's fast path: the model cast to bf16 (as fairseq's ``--bf16`` runs it) against the
same weights in fp32, forward and backward over two segments with carried state.

The CUDA cases (the GPU kernels: SDPA / FlexAttention, the chunked delta rule, cuDNN's LSTM) are skipped without
CUDA; the CPU cases run the same check on the CPU kernels, so the check itself is exercised everywhere. Tolerances are
bf16's: outputs within 5% of the fp32 outputs' scale, gradients with cosine similarity >= 0.98 to the fp32 ones. That
is the whole model's bf16 error, not the kernel's: on CPU, Transformer-XL's naive, shift and sdpa paths all reach
0.988 on the content bias's gradient (its lowest), the other families 0.992-0.9999. So this catches what bf16 breaks
(a kernel that refuses bf16, non-finite values, precision lost beyond bf16's); exactness of each fast path against
its reference is the fp64 kernel tests' job (tests/ops).
"""
import copy
import importlib
from typing import List, Sequence

import pytest
import torch

import fairseq_ext  # noqa: F401  (registers the plugin's models)
from fairseq_ext.models.base.stateful_decoder import reset_stream_state
from tests.harness import build_model, tiny_dictionary

CUDA = torch.cuda.is_available()
T = 16  # tokens per segment
# (arch, its flags, the fast path's flags per device)
CASES = [
    ("alibi_lm_tiny", [], {"cuda": ["--attn-impl", "sdpa"], "cpu": ["--attn-impl", "sdpa"]}),
    ("alibi_lm_tiny", [], {"cuda": ["--attn-impl", "flex", "--attention-dropout", "0"]}),
    ("transformer_xl_tiny", ["--mem-len", "16"], {"cuda": ["--attn-impl", "sdpa"], "cpu": ["--attn-impl", "sdpa"]}),
    ("transformer_xl_tiny", ["--mem-len", "16"], {"cuda": ["--attn-impl", "flex", "--attention-dropout", "0"]}),
    ("adaptive_span_tiny", ["--attn-span", "32"], {"cuda": ["--attn-impl", "skew"], "cpu": ["--attn-impl", "skew"]}),
    ("adaptive_span_tiny", ["--attn-span", "32"], {"cuda": ["--attn-impl", "flex", "--dropout", "0"]}),
    ("fast_weight_tiny", ["--carry-over-fast-weight"], {"cuda": ["--attn-impl", "chunked"],
                                                         "cpu": ["--attn-impl", "chunked"]}),
    ("sha_rnn_tiny", ["--max-memory", "32"], {"cuda": [], "cpu": []}),
    ("sha_rnn_tiny", ["--max-memory", "32"], {"cuda": ["--attn-impl", "sdpa"], "cpu": ["--attn-impl", "sdpa"]}),
    ("composed_hybrid_delta_tiny", ["--mem-len", "16"], {"cuda": [], "cpu": []}),
]
PARAMS = [pytest.param(arch, base, impl[device], device, id=f"{device}-{arch}-{'-'.join(impl[device]) or 'default'}",
                       marks=pytest.mark.skipif(device == "cuda" and not CUDA, reason="needs CUDA"))
          for arch, base, impl in CASES for device in ("cuda", "cpu") if device in impl]


def run(model: torch.nn.Module, tokens: torch.Tensor) -> List[torch.Tensor]:
    """Outputs of two consecutive segments (eval stream carried, eval mode) and the fp32 gradients of their mean
    square."""
    reset_stream_state(model, "eval")
    model.zero_grad(set_to_none=True)
    outs = [model(seg)[0].float() for seg in tokens.split(T, dim=1)]  # (B, T, V or C) each
    sum(o.pow(2).mean() for o in outs).backward()
    return outs + [p.grad.float() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("arch, base, impl, device", PARAMS)
def test_bf16_fast_path_matches_fp32(arch: str, base: Sequence[str], impl: Sequence[str], device: str):
    torch.manual_seed(0)
    reference = build_model(arch, tiny_dictionary(40), [*base, *impl, "--tokens-per-sample", str(T)],
                            task="streaming_lm").to(device).eval()
    reference.decoder.attach_streams("test")
    half = copy.deepcopy(reference).to(torch.bfloat16)  # fairseq's --bf16: the whole model in bf16
    tokens = torch.randint(4, 44, (2, 2 * T), generator=torch.Generator().manual_seed(1)).to(device)
    expected, actual = run(reference, tokens), run(half, tokens)
    assert len(actual) == len(expected) > 4
    for i, (a, e) in enumerate(zip(actual[:2], expected[:2])):
        assert torch.isfinite(a).all(), f"{arch}: segment {i} output not finite in bf16"
        error = (a - e).abs().max() / e.abs().max().clamp_min(1e-6)
        assert error < 0.05, f"{arch}: segment {i} output off by {error:.3g} of its scale in bf16"
    for i, (a, e) in enumerate(zip(actual[2:], expected[2:])):
        if e.norm() < 1e-8:
            continue  # a gradient that is zero in fp32 (e.g. an unused bias) has no direction to compare
        cosine = torch.nn.functional.cosine_similarity(a.flatten(), e.flatten(), dim=0)
        assert cosine >= 0.98, f"{arch}: gradient {i} cosine {cosine:.4f} to fp32 in bf16"


def imports(module: str) -> bool:
    """Whether an optional kernel package imports here (fla needs Triton, flash-attn a CUDA build)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def assert_bf16_matches(name: str, actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
                        grads: Sequence[torch.Tensor], expected_grads: Sequence[torch.Tensor],
                        grad_names: Sequence[str]) -> None:
    """bf16 outputs within 5% of the fp32 reference's scale, gradients with cosine >= 0.98 to the reference's."""
    for a, e in zip(actual, expected):
        error = (a.float() - e).abs().max() / e.abs().max()
        assert error < 0.05, f"{name}: output off by {error:.3g} of its scale"
    for grad_name, a, e in zip(grad_names, grads, expected_grads):
        cosine = torch.nn.functional.cosine_similarity(a.flatten().float(), e.flatten(), dim=0)
        assert cosine >= 0.98, f"{name}: gradient of {grad_name}: cosine {cosine:.4f} to the fp32 reference"


@pytest.mark.skipif(not (CUDA and imports("fla.ops.delta_rule")), reason="needs CUDA and fla-core with Triton")
@pytest.mark.parametrize("t", [1, 100, 512])
def test_fla_chunk_kernel_matches_our_recurrence(t: int):
    """flash-linear-attention's Triton chunked delta rule (``--attn-impl fla``: bf16 inputs, fp32 state) against
    this package's fp32 recurrence with an initial state: outputs, final state, and gradients (cosine >= 0.98)."""
    from fairseq_ext.ops.fast_weights import delta_rule_recurrent
    from fairseq_ext.ops.fast_weights.fla import delta_rule_fla

    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, dk, dv = 2, 4, 64, 64
    q = torch.randn(b, h, t, dk, device="cuda", generator=g)
    k = torch.rand(b, h, t, dk, device="cuda", generator=g) + 0.05
    k = k / k.sum(-1, keepdim=True)  # sum-normalised keys, as the model feeds the delta rule
    v = torch.randn(b, h, t, dv, device="cuda", generator=g)
    beta = torch.rand(b, h, t, device="cuda", generator=g)
    s0 = torch.randn(b, h, dk, dv, device="cuda", generator=g) * 0.1
    leaves = [x.requires_grad_() for x in (q, k, v, beta, s0)]
    ref, ref_state = delta_rule_recurrent(q, k, v, beta, s0, dk ** -0.5)
    out, state = delta_rule_fla(q, k, v, beta, s0, dk ** -0.5)
    g_out, g_state = torch.randn_like(ref), torch.randn_like(ref_state)
    expected = torch.autograd.grad((ref * g_out).sum() + (ref_state * g_state).sum(), leaves)
    actual = torch.autograd.grad((out * g_out).sum() + (state * g_state).sum(), leaves)
    assert_bf16_matches("fla delta rule", [out, state], [ref, ref_state], actual, expected,
                        ["q", "k", "v", "beta", "initial state"])


@pytest.mark.skipif(not (CUDA and imports("flash_attn")), reason="needs CUDA and flash-attn")
@pytest.mark.parametrize("t,s", [(512, 512), (1, 700), (64, 1088)])
def test_flash_attn_alibi_matches_the_reference(t: int, s: int):
    """FlashAttention-2 with alibi_slopes (``--attn-impl flash``, bf16) against the naive ALiBi attention in fp32:
    training (T = S) and decoding over a cache (T < S); outputs and gradients (cosine >= 0.98)."""
    from fairseq_ext.ops.alibi import alibi_attention, alibi_slopes

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, t, 64, device="cuda", generator=g)
    k, v = (torch.randn(2, 8, s, 64, device="cuda", generator=g) for _ in range(2))
    slopes = alibi_slopes(8).cuda()
    leaves = [x.requires_grad_() for x in (q, k, v)]
    ref = alibi_attention(q, k, v, slopes, q_offset=s - t, impl="naive")
    out = alibi_attention(*(x.bfloat16() for x in (q, k, v)), slopes, q_offset=s - t, impl="flash")
    grad = torch.randn_like(ref)
    assert_bf16_matches("flash ALiBi", [out], [ref], torch.autograd.grad(out.float(), leaves, grad),
                        torch.autograd.grad(ref, leaves, grad), "qkv")
