"""Feature maps and the fast-weight attention module: spec fast_weights.md §10 checks 1, 2, 3, 11, 12, 16."""
import math

import pytest
import torch
import torch.nn.functional as F

from fairseq_ext.modules.attention.fast_weight_self_attention import FastWeightSelfAttention
from fairseq_ext.modules.feature_maps import (DpfpFeatureMap, EluFeatureMap, FavorFeatureMap, build_feature_map,
                                              sum_normalize)
from tests.harness import assert_close, single_thread

one_thread = pytest.fixture(autouse=True)(single_thread)


@pytest.mark.parametrize("head_dim,expected", [(16, {"linear": 16, "dpfp": 64, "performer": 32}),
                                               (32, {"linear": 32, "dpfp": 128, "performer": 32})])
def test_feature_dimensions(head_dim, expected):
    """§10.1: D_phi = d (ELU+1), 2 d nu (DPFP, nu = 2), 2m (FAVOR+, m = 16)."""
    for kind, dim in expected.items():
        fmap = build_feature_map(kind, head_dim, performer_proj_dim=16, dpfp_n_roll=2)
        assert fmap.out_dim == dim
        assert fmap(torch.randn(3, 5, head_dim)).shape == (3, 5, dim)
    with pytest.raises(ValueError, match="unknown feature map"):
        build_feature_map("softmax", head_dim)


def test_dpfp_values_and_roll_direction():
    """§10.2: x = [1, -2]: r = [1, 0, 0, 2]; nu = 1 gives a permutation of [2, 0, 0, 0] in either roll direction;
    random q, k: phi(q) . phi(k) identical for both directions."""
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    for sign in (1, -1):
        phi = DpfpFeatureMap(2, n_roll=1, roll_sign=sign)(x)
        assert sorted(phi.tolist()) == [0.0, 0.0, 0.0, 2.0]
        assert phi.dot(phi).item() == 4.0
    q, k = torch.randn(2, 50, 16, dtype=torch.float64).unbind(0)
    for nu in (1, 2, 3):
        a, b = DpfpFeatureMap(16, nu, 1), DpfpFeatureMap(16, nu, -1)
        assert_close((a(q) * a(k)).sum(-1), (b(q) * b(k)).sum(-1), atol=1e-12)


def test_sum_normalised_elu_values():
    """§10.3."""
    k = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    phi = EluFeatureMap(4)(k)
    assert_close(phi, torch.tensor([1.5, math.exp(-1), 3.0, 1.0], dtype=torch.float64))
    normed = sum_normalize(phi)
    assert_close(normed, torch.tensor([0.255629, 0.062694, 0.511258, 0.170419], dtype=torch.float64), atol=1e-6)
    assert normed.sum().item() == pytest.approx(1.0, abs=1e-15)


def test_favor_approximates_the_exponential_kernel():
    """phi(q) . phi(k) is an unbiased estimate of exp(q . k) (no 1/d^(1/4) pre-scaling)."""
    torch.manual_seed(0)
    q, k = (0.3 * torch.randn(2, 8, dtype=torch.float64)).unbind(0)
    for compat in (False, True):
        estimates = []
        for _ in range(100):
            fmap = FavorFeatureMap(8, 512, orthogonal_compat=compat).double()
            estimates.append((fmap(q) * fmap(k)).sum())  # + O(1e-4) from the additive epsilon
        assert torch.stack(estimates).mean().item() == pytest.approx(math.exp(q.dot(k).item()), rel=0.05)


def test_favor_exact_formula_with_offset():
    """§1.3: phi(x) = (2m)^(-1/2) ([exp(u - |x|^2/2), exp(-u - |x|^2/2)] + 1e-4), u = x Omega, no pre-scaling."""
    torch.manual_seed(5)
    fmap = FavorFeatureMap(4, 3).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    omega = fmap.omega  # (d, m)
    for i, j in ((0, 0), (1, 4)):
        row = x[i, j]
        u = [float(row @ omega[:, c]) for c in range(3)]
        half = 0.5 * float(row @ row)
        expected = [(math.exp(uc - half) + 1e-4) / math.sqrt(6) for uc in u] + \
                   [(math.exp(-uc - half) + 1e-4) / math.sqrt(6) for uc in u]
        assert_close(fmap(x)[i, j], torch.tensor(expected, dtype=torch.float64), atol=1e-15, rtol=0)
    # the offset is there: x far from every projection still has features 1e-4 / sqrt(2m)
    far = torch.full((4,), 30.0, dtype=torch.float64)
    assert_close(fmap(far), torch.full((6,), 1e-4 / math.sqrt(6), dtype=torch.float64), atol=1e-18, rtol=0)


def test_favor_orthogonal_blocks_reference_and_lmtool_compat():
    """Reference: the m features (columns of Omega (d, m)) come from d x d orthogonal blocks; compat (lmtool): the
    d rows come from m x m orthogonal blocks."""
    torch.manual_seed(1)
    ref = FavorFeatureMap(8, 4).omega.double()  # (8, 4): 4 features of dim 8, one orthogonal block
    gram = ref.t() @ ref  # (4, 4)
    assert_close(gram - torch.diag(torch.diagonal(gram)), torch.zeros(4, 4, dtype=torch.float64), atol=1e-5)
    compat = FavorFeatureMap(8, 4, orthogonal_compat=True).omega.double()  # (8, 4): rows in two 4 x 4 blocks
    for block in (compat[:4], compat[4:]):
        gram = block @ block.t()  # (4, 4)
        assert_close(gram - torch.diag(torch.diagonal(gram)), torch.zeros(4, 4, dtype=torch.float64), atol=1e-5)
    assert abs((compat.t() @ compat)[0, 1].item()) > 1e-3  # columns are not orthogonal: the transposed construction


def test_favor_redraws_in_training_only_and_omega_is_saved():
    """§10.12: training redraws Omega at every forward (shared by q and k), eval keeps it; Omega is in the state
    dict and a reload reproduces the eval outputs."""
    torch.manual_seed(2)
    attn = FastWeightSelfAttention(16, 2, 8, "performer", "delta", "none", performer_proj_dim=6)
    assert "feature_map.omega" in attn.state_dict() and attn.feature_map.omega.shape == (8, 6)
    x = torch.randn(2, 5, 16)
    attn.train()
    seen = []
    for _ in range(3):
        attn(x)
        seen.append(attn.feature_map.omega.clone())
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    attn.eval()
    a, _ = attn(x)
    b, _ = attn(x)
    assert torch.equal(a, b) and torch.equal(attn.feature_map.omega, seen[-1])
    other = FastWeightSelfAttention(16, 2, 8, "performer", "delta", "none", performer_proj_dim=6).eval()
    other.load_state_dict(attn.state_dict())
    assert torch.equal(other(x)[0], a)


def reference_attention(attn, x, rule, normalize):
    """Token loop written from the paper (value-rows W, Eq. 15-17), scale 1/sqrt(d_head)."""
    b, t, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    fmap = attn.feature_map
    q = fmap(attn.q_proj(x).view(b, t, h, d))  # (B, T, H, D_phi)
    k = fmap(attn.k_proj(x).view(b, t, h, d))
    v = attn.v_proj(x).view(b, t, h, d)
    if rule == "delta":
        q, k = q / q.sum(-1, keepdim=True), k / k.sum(-1, keepdim=True)
        beta = torch.sigmoid(attn.beta_proj(x))  # (B, T, H)
    w = x.new_zeros(b, h, d, fmap.out_dim)  # value rows
    z = x.new_zeros(b, h, fmap.out_dim)
    ys = []
    for i in range(t):
        kt, qt = k[:, i], q[:, i]  # (B, H, D_phi)
        if rule == "sum":
            w = w + v[:, i, :, :, None] * kt[:, :, None, :]
        else:
            vbar = torch.einsum("bhvk,bhk->bhv", w, kt)
            w = w + beta[:, i, :, None, None] * (v[:, i] - vbar)[..., None] * kt[:, :, None, :]
        z = z + kt
        y = torch.einsum("bhvk,bhk->bhv", w, qt) / math.sqrt(d)
        if normalize == "output":
            y = y / ((z * qt).sum(-1, keepdim=True) + 1e-5)
        ys.append(y)
    y = torch.stack(ys, dim=1).reshape(b, t, h * d)
    return attn.out_proj(y)


@pytest.mark.parametrize("kind", ["linear", "dpfp", "performer"])
@pytest.mark.parametrize("rule,normalize", [("sum", "none"), ("sum", "output"), ("delta", "none"),
                                            ("delta", "output")])
def test_attention_equals_the_papers_recurrence_with_head_dim_scale(kind, rule, normalize):
    """§10.11: the output scale is 1/sqrt(d_head) also when D_phi != d_head (DPFP: 4 d, FAVOR+: 2m = 10)."""
    torch.manual_seed(3)
    attn = FastWeightSelfAttention(12, 3, 4, kind, rule, normalize, performer_proj_dim=5, dpfp_n_roll=2,
                                   chunk_size=3).double().eval()
    assert attn.scale == 0.5
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    out, state = attn(x)
    assert_close(out, reference_attention(attn, x, rule, normalize))
    assert state.weight.shape == (2, 3, attn.feature_map.out_dim, 4)


def test_autocast_bf16_keeps_the_state_fp32():
    """§10.16: under CPU bf16 autocast the fast weights and key sums are fp32, close to the fp32 run."""
    torch.manual_seed(4)
    attn = FastWeightSelfAttention(16, 2, 8, "linear", "delta", "output").eval()
    x = torch.randn(2, 64, 16)
    ref, ref_state = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = attn(x)
        out2, state2 = attn(x[:, :1], state)
    assert state.weight.dtype == torch.float32 and state.key_sum.dtype == torch.float32
    assert state2.weight.dtype == torch.float32
    assert_close(state.weight, ref_state.weight, atol=1e-2)  # measured 3.3e-3
    assert_close(out.float(), ref, atol=5e-3)  # outputs are ~0.08 in magnitude; measured 4.5e-4


def test_softmax_attention_equals_explicit_causal_softmax_and_its_cache():
    """fast_weight_lm's softmax baseline (the core's SoftmaxMixer, no position term, source segment) ==
    softmax(Q K^T / sqrt(d) + causal mask) V written out, fp64, odd sizes; feeding the same tokens in pieces through
    its segment cache gives the same outputs."""
    from fairseq_ext.modules.composed.positions import PositionTerm
    from fairseq_ext.modules.composed.softmax_mixer import SoftmaxMixer
    from fairseq_ext.modules.composed.sources import SegmentSource

    torch.manual_seed(0)
    attn = SoftmaxMixer(10, 2, 3, 0.0, PositionTerm(), SegmentSource()).double().eval()
    x = torch.randn(2, 7, 10, dtype=torch.float64)
    out, cache = attn(x, None)
    q, k, v = ((x @ w.t()).view(2, 7, 2, 3).transpose(1, 2) for w in attn.qkv_proj.weight.chunk(3))
    scores = q @ k.transpose(-1, -2) / math.sqrt(3)  # (B, H, T, T)
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 6))
    assert torch.allclose(out, expected, atol=1e-12, rtol=0)
    first, part = attn(x[:, :3], None)
    rest, _ = attn(x[:, 3:], part)
    assert torch.allclose(torch.cat([first, rest], 1), expected, atol=1e-12, rtol=0) and cache.length == 7
