"""fp32 islands of every family under a half-precision model (fairseq's ``--bf16`` / ``--fp16`` cast the whole model
with ``.to(torch.bfloat16)`` / ``.half()``) and under autocast (``--amp`` on CUDA; checked here with CPU bf16
autocast, the same code path): softmax / log-softmax / losses in fp32, carried fast-weight states and key sums in
fp32, adaptive-span z and SHA-RNN's query LayerNorm parameters in fp32; and bf16 log-probabilities close to fp32."""
import collections
import copy
from typing import Counter, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fairseq_ext.criterions.lm_loss import aux_loss, nll_sum
from fairseq_ext.modules.feature_maps import FavorFeatureMap
from fairseq_ext.ops.fast_weights import fast_weight_attention
from tests.harness import build_model, single_thread, tiny_dictionary

one_thread = pytest.fixture(autouse=True)(single_thread)
VOCAB = 24  # 4 specials + 20 words
PAD = 1

# family -> (arch, task, extra args): each family's tiny preset as fairseq-train builds it
FAMILIES = {
    "alibi": ("alibi_lm_tiny", "language_modeling", []),
    "transformer_xl": ("transformer_xl_tiny", "streaming_lm",
                       ["--adaptive-softmax-cutoff", "10,16", "--adaptive-softmax-factor", "2"]),
    "adaptive_span": ("adaptive_span_tiny", "streaming_lm", []),
    "fast_weight": ("fast_weight_tiny", "streaming_lm", []),
    "fast_weight_carry": ("fast_weight_tiny", "streaming_lm",
                          ["--carry-over-fast-weight", "--attn-type", "performer", "--fwp-normalize", "output"]),
    "sha_rnn": ("sha_rnn_tiny", "streaming_lm", ["--tokens-per-sample", "8", "--max-memory", "40"]),
}
NORMALISERS = {torch.softmax, torch.log_softmax, F.softmax, F.log_softmax, torch.Tensor.softmax,
               torch.Tensor.log_softmax, F.cross_entropy, F.nll_loss}


class NormaliserDtypes(TorchFunctionMode):
    """Counts (function name, output dtype) of every softmax / log-softmax / loss call made inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[Tuple[str, torch.dtype]] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in NORMALISERS:
            self.seen[(func.__name__, out.dtype)] += 1
        return out


def make(family: str) -> torch.nn.Module:
    arch, task, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = build_model(arch, tiny_dictionary(VOCAB - 4), extra, task=task)
    if hasattr(model.decoder, "attach_streams"):
        model.decoder.attach_streams("test")  # segments of the same streams, as streaming_lm declares
    return model


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def loss_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """lm_loss's objective (summed NLL + aux terms) of next-token targets for x (B, T)."""
    net_output = model(x[:, :-1])
    loss = nll_sum(model, net_output, x[:, 1:], PAD)
    aux = aux_loss(model)
    return loss if aux is None else loss + aux * x[:, 1:].numel()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_half_model_normalises_and_scores_in_fp32(family, dtype):
    model = make(family).to(dtype).train()  # as fairseq's Trainer under --bf16 / --fp16
    recorder = NormaliserDtypes()
    with recorder:
        loss = loss_of(model, tokens(2, 9))
    assert recorder.seen, "no softmax / loss call recorded"
    assert {out for _, out in recorder.seen} == {torch.float32}, recorder.seen
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all()
               for p in model.parameters() if p.requires_grad and p.grad is not None)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_autocast_normalises_and_scores_in_fp32(family):
    """--amp's autocast region (CPU bf16 autocast: the same code path as CUDA fp16 autocast)."""
    model = make(family).train()
    recorder = NormaliserDtypes()
    with recorder, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, tokens(2, 9))
    assert {out for _, out in recorder.seen} == {torch.float32}, recorder.seen
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_parameters_survive_half_casts(dtype):
    span = make("adaptive_span").to(dtype)
    assert all(m.z.dtype == torch.float32 for m in span.decoder.span_masks())
    sha = make("sha_rnn").to(dtype)
    attention = [layer.attn for layer in sha.decoder.layers if layer.attn is not None]
    assert attention and all(p.dtype == torch.float32 for a in attention for p in a.qln.parameters())
    assert all(a.q.weight.dtype == dtype for a in attention)  # everything else is cast
    assert sha.to(torch.float64).decoder.layers[0].attn.qln.weight.dtype == torch.float64  # only half casts kept


def test_carried_states_under_a_bf16_model():
    """Fast weights and key sums are accumulated, so they are fp32; Transformer-XL / adaptive-span memories and
    SHA-RNN's (h, c, memory) are activations of the bf16 model, carried as computed."""
    x = tokens(2, 8)
    fast = make("fast_weight_carry").to(torch.bfloat16).eval()
    fast.decoder.attach_streams("test")
    _, state, _ = fast.decoder.forward_segment(x, None)
    _, state, _ = fast.decoder.forward_segment(x, state)  # a carried state goes back in
    weights = list(state.tensors())
    assert len(weights) == 2 * len(fast.decoder.layers) and all(t.dtype == torch.float32 for t in weights)
    for family in ("transformer_xl", "adaptive_span", "sha_rnn"):
        model = make(family).to(torch.bfloat16).eval()
        _, state, _ = model.decoder.forward_segment(x, None)
        assert {t.dtype for t in state.tensors()} == {torch.bfloat16}, family


# bf16 compute vs fp32 compute on the same (bf16-rounded) weights, eval mode, two streamed segments of 8: max |log p|
# difference over a (2, 16) batch (log-probs ~ -3.2 to -3.6). Measured (seed 0): alibi 0.0159, transformer_xl 0.00028
# (its tiny preset's N(0, 0.02) init keeps the logits near uniform), adaptive_span 0.0091, fast_weight 0.0019,
# fast_weight_carry 0.0022, sha_rnn 0.0034; the bounds are twice that.
BF16_LOGPROB_ATOL = {"alibi": 0.032, "transformer_xl": 0.0006, "adaptive_span": 0.018, "fast_weight": 0.004,
                     "fast_weight_carry": 0.0045, "sha_rnn": 0.007}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_log_probs_close_to_fp32(family):
    half = make(family).to(torch.bfloat16).eval()
    full = copy.deepcopy(half).float()  # the same rounded weights in fp32
    x = tokens(2, 16, seed=3)
    outs = []
    for model in (half, full):
        with torch.no_grad():
            parts = [model.get_normalized_probs(model(seg), log_probs=True) for seg in x.split(8, dim=1)]
        outs.append(torch.cat(parts, dim=1))  # (B, 16, V)
    assert outs[0].dtype == torch.float32
    err = (outs[0] - outs[1]).abs().max().item()
    assert err < BF16_LOGPROB_ATOL[family], f"{family}: max |log p_bf16 - log p_fp32| = {err:.4f}"
    assert err > 0, "the bf16 model did not compute in bf16"


def test_fast_weight_op_accumulates_in_fp32_inside_autocast():
    """The recurrence turns autocast off: fp32 inputs give bit-identical outputs and states inside and outside a
    bf16 autocast region (inside, an autocast matmul would round every state increment to bf16)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.rand(2, 2, 19, 6, generator=g) for _ in range(3))
    k = k / k.sum(-1, keepdim=True)
    beta = torch.rand(2, 2, 19, generator=g)
    kw = dict(rule="delta", normalize="output", scale=0.5, impl="chunked", chunk_size=4)
    ref, ref_state = fast_weight_attention(q, k, v, beta, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = fast_weight_attention(q, k, v, beta, **kw)
    assert torch.equal(out, ref) and torch.equal(state.weight, ref_state.weight)
    assert torch.equal(state.key_sum, ref_state.key_sum) and state.weight.dtype == torch.float32


def test_favor_features_ignore_autocast():
    """FAVOR+ exponentiates x·Omega unshifted; it is computed in fp32 inside autocast too."""
    torch.manual_seed(0)
    favor = FavorFeatureMap(8, 5)
    x = torch.randn(3, 7, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = favor(x)
    assert inside.dtype == torch.float32 and torch.equal(inside, favor(x))
