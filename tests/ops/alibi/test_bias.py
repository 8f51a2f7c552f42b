"""ALiBi slopes and bias matrix: spec acceptance checks 1, 2 and 5 (shared/specs/alibi.md §9)."""
import math

import pytest
import torch

from fairseq_ext.ops.alibi import alibi_attention, alibi_bias, alibi_slopes

SLOPES_16 = [2 ** (-0.5 * (h + 1)) for h in range(16)]
EXPECTED = {
    4: [0.25, 0.0625, 0.015625, 0.00390625],
    6: [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125],
    8: [2.0 ** -(h + 1) for h in range(8)],
    12: [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625,
         0.7071068, 0.3535534, 0.1767767, 0.0883883],
    16: SLOPES_16,
    20: SLOPES_16 + [2 ** -0.25, 2 ** -0.75, 2 ** -1.25, 2 ** -1.75],
}


@pytest.mark.parametrize("heads", sorted(EXPECTED))
def test_slopes_match_paper_in_original_order(heads):
    slopes = alibi_slopes(heads)
    assert slopes.dtype == torch.float32 and slopes.shape == (heads,)
    torch.testing.assert_close(slopes, torch.tensor(EXPECTED[heads], dtype=torch.float32), atol=1e-7, rtol=0)


def test_non_power_of_two_slopes_are_not_sorted():
    slopes = alibi_slopes(12).tolist()
    assert slopes != sorted(slopes, reverse=True)


def test_slopes_reject_zero_heads():
    with pytest.raises(ValueError, match="at least one"):
        alibi_slopes(0)


def test_bias_rows_are_minus_slope_times_distance():
    m = 0.25
    bias = alibi_bias(torch.tensor([m]), 4, 4)[0]  # (T, S)
    for i in range(4):
        expected = [-m * (i - j) for j in range(i + 1)]
        assert bias[i, : i + 1].tolist() == expected


def test_bias_with_query_offset_counts_cached_keys():
    bias = alibi_bias(torch.tensor([0.5]), 2, 5, q_offset=3)[0]  # queries at positions 3 and 4
    assert bias[0].tolist() == [-1.5, -1.0, -0.5, 0.0, 0.5]
    assert bias[1].tolist() == [-2.0, -1.5, -1.0, -0.5, 0.0]


def test_key_index_form_is_slope_times_key_position():
    bias = alibi_bias(torch.tensor([0.5, 0.25]), 3, 3, form="key_index")
    assert bias[1, 2].tolist() == [0.0, 0.25, 0.5]


@pytest.mark.parametrize("impl", ["naive", "sdpa", "flex"])
def test_future_keys_are_masked(impl):
    b, h, t, d = 1, 2, 4, 4
    q = torch.zeros(b, h, t, d)
    k = torch.zeros(b, h, t, d)
    v = torch.eye(t).expand(b, h, t, t)  # output row == attention probabilities
    probs = alibi_attention(q, k, v, alibi_slopes(h), impl=impl)
    assert torch.all(probs.triu(1) == 0)


@pytest.mark.parametrize("head_dim", [4, 8])
def test_bias_is_added_after_scaling_and_not_scaled(head_dim):
    """With zero content the probabilities are softmax(-m (i - j)), independent of the head dimension."""
    t = 5
    slopes = alibi_slopes(2)
    q = torch.zeros(1, 2, t, head_dim, dtype=torch.float64)
    v = torch.eye(t, dtype=torch.float64)[:, :t].expand(1, 2, t, t)
    probs = alibi_attention(q, q, v, slopes, impl="naive")  # (1, H, T, T)
    for h, m in enumerate(slopes.tolist()):
        row = torch.tensor([-m * (t - 1 - j) for j in range(t)], dtype=torch.float64).softmax(-1)
        torch.testing.assert_close(probs[0, h, -1], row, atol=1e-12, rtol=0)
    # Doubling the content scale changes the logits through q.k/sqrt(d) only.
    q2 = torch.randn(1, 2, t, head_dim, dtype=torch.float64)
    scores_only = alibi_attention(q2, q2, v, torch.zeros(2), impl="naive")
    with_bias = alibi_attention(q2, q2, v, slopes, impl="naive")
    logit_gap = (with_bias.clamp_min(1e-300).log() - scores_only.clamp_min(1e-300).log())[0, :, -1]  # (H, T)
    for h, m in enumerate(slopes.tolist()):
        gap = logit_gap[h] - logit_gap[h, -1]  # remove the softmax normaliser
        expected = torch.tensor([-m * (t - 1 - j) for j in range(t)], dtype=torch.float64)
        torch.testing.assert_close(gap, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("impl", ["naive", "sdpa", "flex"])
def test_sign_near_key_beats_far_identical_key(impl):
    """Identical keys at distances 1 and 100: every head puts more probability on the near one."""
    h, t, d = 8, 101, 4
    k = torch.zeros(1, h, t, d)
    k[0, :, 0] = k[0, :, t - 2] = 1.0  # the same key at distance 100 and distance 1
    q = torch.zeros(1, h, t, d)
    q[0, :, -1] = 3.0
    v = torch.eye(t).expand(1, h, t, t)
    probs = alibi_attention(q, k, v, alibi_slopes(h), impl=impl)[0, :, -1]  # (H, S)
    assert torch.all(probs[:, t - 2] > probs[:, 0])
    assert math.isclose(probs.sum(-1).min().item(), 1.0, rel_tol=1e-5)
