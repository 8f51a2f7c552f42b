"""transformer_xl_lm: the spec's acceptance checks (transformer_xl.md §14) on tiny models.

A reference forward written from the paper's equations (explicit r_{i-j} per (i, j), explicit mask) runs the
whole stack over one long sequence with any visibility rule; the model's segment recurrence must reproduce it.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fairseq_ext.models.transformer_xl_lm import TransformerXLLanguageModel
from fairseq_ext.state import DecoderState
from tests.harness import assert_close, build_model, single_thread, split_segments, stream_segments, tiny_dictionary

VOCAB = 60  # 4 specials + 56 words


one_thread = pytest.fixture(autouse=True)(single_thread)


def make(extra=(), vocab=VOCAB, dtype=torch.float64, tokens_per_sample=5) -> TransformerXLLanguageModel:
    torch.manual_seed(0)
    model = build_model("transformer_xl_tiny", tiny_dictionary(vocab - 4),
                        ["--tokens-per-sample", str(tokens_per_sample), "--decoder-layers", "2",
                         "--decoder-embed-dim", "16", "--decoder-attention-heads", "2", "--decoder-ffn-embed-dim",
                         "24", "--attn-impl", "naive", *extra])
    return model.to(dtype).eval()


def tokens(b, t, vocab=VOCAB, seed=1):
    return torch.randint(4, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def reference_features(decoder, x, visible):
    """Features (B, N, C) of the whole sequence x (B, N) when query n sees key m iff visible(n, m); one pass,
    no memory, written from Sec. 3.3 with an explicit relative encoding per (n, m)."""
    b, n = x.shape
    h = decoder.embed_tokens(x)  # (B, N, C)
    c = h.size(-1)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, c, 2, dtype=torch.float64) / c))
    clamp = decoder.clamp_len

    def encoding(distance):  # (C,) [sin | cos]
        p = min(distance, clamp) if clamp > 0 else distance
        return torch.cat([torch.sin(p * inv_freq), torch.cos(p * inv_freq)]).to(h.dtype)

    enc = torch.stack([torch.stack([encoding(max(i - j, 0)) for j in range(n)]) for i in range(n)])  # (N, N, C)
    mask = torch.tensor([[not visible(i, j) for j in range(n)] for i in range(n)])  # (N, N)
    for layer in decoder.layers:
        attn = layer.self_attn
        u = attn.content_bias if attn.content_bias is not None else decoder.content_bias
        v = attn.position_bias if attn.position_bias is not None else decoder.position_bias
        inp = layer.self_attn_layer_norm(h) if layer.normalize_before else h
        heads, dim = attn.num_heads, attn.head_dim
        w_q, w_k, w_v = attn.qkv_proj.weight.chunk(3)  # the original qkv_net's row thirds
        q = (inp @ w_q.T).view(b, n, heads, dim)
        k = (inp @ w_k.T).view(b, n, heads, dim)
        val = (inp @ w_v.T).view(b, n, heads, dim)
        r = attn.r_proj(enc).view(n, n, heads, dim)  # (N, N, H, D): W_kR R_{i-j}
        scores = (torch.einsum("bihd,bjhd->bhij", q + u, k) + torch.einsum("bihd,ijhd->bhij", q + v, r)) / math.sqrt(dim)
        probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
        out = attn.out_proj(torch.einsum("bhij,bjhd->bihd", probs, val).reshape(b, n, heads * dim))
        if layer.normalize_before:
            h = h + out
            h = h + layer.fc2(F.relu(layer.fc1(layer.final_layer_norm(h))))
        else:
            h = layer.self_attn_layer_norm(h + out)
            h = layer.final_layer_norm(h + layer.fc2(F.relu(layer.fc1(h))))
    return h



# ----------------------------------------------------------------------------------------------------------------
def test_positional_encoding_layout_order_and_clamp():
    """§14.2: row for distance p is [sin(p f) | cos(p f)], rows descend klen-1..0, distances > c reuse c: R as the
    layers receive it (the layer context of a 7-token call without memory)."""
    decoder = make().decoder.double().eval()
    x = torch.zeros(1, 7, 16, dtype=torch.float64)
    enc = decoder.layer_context(tokens(1, 7), x, (None, None), 0, 7).positions
    f = 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    for row in range(7):
        p = 6 - row
        assert_close(enc[row], torch.cat([torch.sin(p * f), torch.cos(p * f)]))
    decoder.clamp_len = 3
    clamped = decoder.layer_context(tokens(1, 7), x, (None, None), 0, 7).positions
    assert_close(clamped[:4], enc[3:4].expand(4, -1))  # distances 6, 5, 4, 3 -> 3
    assert_close(clamped[4:], enc[4:])


@pytest.mark.parametrize("extra", [(), ("--decoder-normalize-before",), ("--untie-r",), ("--clamp-len", "3")])
def test_one_pass_equals_reference(extra):
    decoder = make(extra).decoder
    x = tokens(2, 9)
    feats, _, _ = decoder.forward_segment(x, None)
    assert_close(feats, reference_features(decoder, x, lambda i, j: j <= i))


@pytest.mark.parametrize("mem_len,lengths", [(2, (5, 4)), (3, (4, 4, 4)), (5, (3, 3, 3)), (1, (2, 1, 3))])
@pytest.mark.parametrize("extra", [(), ("--decoder-normalize-before", "--clamp-len", "2")])
def test_short_memory_equals_one_pass_restricted_to_memory_window(mem_len, lengths, extra):
    """§14.3: with M < len(A), a query of segment k sees the M keys before its segment plus the causal keys of
    its segment. Every query of every segment is compared."""
    decoder = make(("--mem-len", str(mem_len), *extra)).decoder
    x = tokens(2, sum(lengths))
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    segment_start = {n: s for s, l in zip(starts, lengths) for n in range(s, s + l)}
    carried, _ = stream_segments(decoder, x, lengths)
    expected = reference_features(decoder, x, lambda i, j: segment_start[i] - mem_len <= j <= i)
    assert_close(carried, expected)


@pytest.mark.parametrize("convention,extra_key", [("original", 0), ("nvidia", 1)])
def test_same_length_equals_one_pass_with_fixed_window(convention, extra_key):
    """same_length: every query sees the last mem_len (original) / mem_len + 1 (NVIDIA) keys, memory allowing."""
    mem_len, lengths = 3, (4, 4, 4)
    decoder = make(("--mem-len", str(mem_len), "--same-length", "--same-length-convention", convention)).decoder
    x = tokens(2, sum(lengths))
    starts = {n: s for s in (0, 4, 8) for n in range(s, s + 4)}
    window = mem_len + extra_key
    carried, _ = stream_segments(decoder, x, lengths)
    expected = reference_features(decoder, x, lambda i, j: max(starts[i] - mem_len, i - window + 1) <= j <= i)
    assert_close(carried, expected)


def test_memory_update_lengths_contents_and_no_grad():
    """§14.4: after each segment every layer's memory has min(mem_len, seen) entries = its latest inputs."""
    model = make(("--mem-len", "6"), dtype=torch.float32)
    model.train()
    decoder = model.decoder
    x = tokens(3, 12)
    state = None
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach()))
             for layer in decoder.layers]
    seen = 0
    for seg in split_segments(x, [4, 4, 4]):
        inputs.clear()
        feats, state, _ = decoder.forward_segment(seg, state)
        feats.sum().backward()
        seen += 4
        assert isinstance(state, DecoderState) and all(s.length == min(6, seen) for s in state.layers)
        for layer_memory, layer_input in zip((s.hidden for s in state.layers), inputs):
            assert not layer_memory.requires_grad
            assert torch.equal(layer_memory[:, -4:], layer_input)  # this segment's inputs are the newest entries
    for hook in hooks:
        hook.remove()


def test_memory_persists_through_the_stream_api_in_training_and_is_detached():
    model = make(("--mem-len", "4"), dtype=torch.float32)
    model.decoder.attach_streams("tests")  # consecutive calls continue the same streams (as streaming_lm does)
    model.train()
    x = tokens(2, 8)
    for seg in split_segments(x, [4, 4]):
        logits, _ = model(seg)
        model.get_normalized_probs((logits, {}), log_probs=True).sum().backward()
    state = model.decoder.stream_state("train")
    assert all(s.length == 4 for s in state.layers) and all(not t.requires_grad for t in state.tensors())
    assert model.decoder.stream_state("eval") is None


@pytest.mark.parametrize("mem_len", [0, 3])
def test_causality(mem_len):
    """§14.6: perturbing token t changes no output at positions < t, with and without memory."""
    decoder = make(("--mem-len", str(mem_len))).decoder
    x = tokens(1, 10)
    y = x.clone()
    y[0, 6] = 4 if x[0, 6] != 4 else 5
    a, _ = stream_segments(decoder, x, (5, 5))
    b, _ = stream_segments(decoder, y, (5, 5))
    assert_close(a[:, :6], b[:, :6])
    assert (a[:, 6] - b[:, 6]).abs().max() > 1e-6


# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cutoffs,factor", [("10,20,40", 1), ("9,19,39", 2), ("30", 4), (None, 1)])
@pytest.mark.parametrize("embed", [None, "8"])
def test_adaptive_softmax_normalises_and_matches_its_loss_path(cutoffs, factor, embed):
    """§14.7: log-probabilities over the vocabulary sum to 1 (both cutoff conventions); the per-cluster
    (logits, targets) path used by lm_loss gives the same NLL as get_log_prob."""
    extra = ["--adaptive-softmax-factor", str(factor)]
    if cutoffs:
        extra += ["--adaptive-softmax-cutoff", cutoffs]
    if embed:
        extra += ["--decoder-input-dim", embed]
    model = make(extra)
    x = tokens(2, 7)
    feats, _ = model(x)
    lprobs = model.get_normalized_probs((feats, {}), log_probs=True)  # (B, T, V)
    assert_close(torch.logsumexp(lprobs, dim=-1), torch.zeros(2, 7, dtype=torch.float64), atol=1e-10)
    target = tokens(2, 7, seed=5)
    target[0, 0], target[1, 3] = 2, 55  # </s> (head) and a word of the last cluster
    logits, targets = model.decoder.adaptive_softmax(feats, target.reshape(-1))
    nll = sum(F.cross_entropy(lg, tg, reduction="sum") for lg, tg in zip(logits, targets) if tg is not None)
    assert_close(nll, -lprobs.gather(-1, target[..., None]).sum())


def test_tying_shares_tensors_and_wt103_base_has_no_projections():
    model = make(["--adaptive-softmax-cutoff", "10,20,40", "--adaptive-softmax-factor", "2"])
    emb, sm = model.decoder.embed_tokens, model.decoder.adaptive_softmax
    for i in range(4):
        assert sm.weights[str(i)] is emb.emb_layers[i].weight
    assert sm.out_projs["0"] is not emb.emb_projs["0"]  # tails tied, head untied (wt103 tie_projs)
    for i in (1, 2, 3):
        assert sm.out_projs[str(i)] is emb.emb_projs[str(i)]
    untied = make(["--adaptive-softmax-cutoff", "10,20", "--adaptive-softmax-factor", "2", "--tie-projs", "none",
                   "--untie-adaptive-weights"])
    assert untied.decoder.adaptive_softmax.weights["1"] is not untied.decoder.embed_tokens.emb_layers[1].weight
    base = make(["--adaptive-softmax-cutoff", "10,20,40"])  # div_val 1, d_embed = d: wt103 base
    names = [n for n, _ in base.named_parameters()]
    assert not any("proj" in n and ("emb_projs" in n or "out_projs" in n) for n in names)


def test_initialisation_statistics():
    """§14.8: weights N(0, 0.02), projections N(0, 0.01), LayerNorm gains N(1, 0.02), biases 0."""
    torch.manual_seed(0)
    model = build_model("transformer_xl_tiny", tiny_dictionary(3000),
                        ["--tokens-per-sample", "8", "--decoder-embed-dim", "256", "--decoder-ffn-embed-dim", "512",
                         "--adaptive-softmax-cutoff", "1000,2000", "--adaptive-softmax-factor", "2",
                         "--decoder-input-dim", "128", "--init-std", "0.02", "--proj-init-std", "0.01"])
    d = model.decoder
    assert d.layers[0].fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert d.layers[0].self_attn.qkv_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert d.embed_tokens.emb_layers[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert d.embed_tokens.emb_projs["0"].std().item() == pytest.approx(0.01, rel=0.05)
    assert d.adaptive_softmax.out_projs["0"].std().item() == pytest.approx(0.01, rel=0.05)
    ln = torch.cat([l.self_attn_layer_norm.weight for l in d.layers] + [l.final_layer_norm.weight for l in d.layers])
    assert ln.mean().item() == pytest.approx(1.0, abs=0.005) and ln.std().item() == pytest.approx(0.02, rel=0.1)
    for bias in (d.layers[0].fc1.bias, d.layers[0].self_attn_layer_norm.bias, *d.adaptive_softmax.biases.values(),
                 d.adaptive_softmax.cluster_bias):  # div_val 2: one output bias per cluster, as the original
        assert torch.count_nonzero(bias) == 0
    assert d.content_bias.std().item() == pytest.approx(0.02, rel=0.5)


def test_paper_parameter_counts():
    """§14.9 and §5.3: original wt103 base (vocabulary 267,735) 151.1M; enwik8 12L 41M and 24L 277M."""
    expected = {("transformer_xl_wiki103_base", 267_735): 151_107_538,
                ("transformer_xl_wiki103_nvidia_base", 267_735): 191_950_298,
                ("transformer_xl_enwik8_base", 204): 41_055_436,
                ("transformer_xl_enwik8_large", 204): 277_231_820}
    for (arch, vocab), count in expected.items():
        with torch.device("meta"):
            model = build_model(arch, tiny_dictionary(vocab - 4), ["--tokens-per-sample", "8"])
        assert sum(p.numel() for p in model.parameters()) == count, arch


# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mem_len,tps,extra", [(4, 3, ()), (2, 4, ("--same-length",)), (0, 3, ()),
                                               (5, 5, ("--clamp-len", "2", "--same-length",
                                                       "--same-length-convention", "nvidia"))])
def test_incremental_decoding_equals_streaming(mem_len, tps, extra):
    """Token-by-token decoding through fairseq's incremental_state gives the streaming pass's log-probs over
    segments of tokens_per_sample, memory cut at the same boundaries."""
    model = make(("--mem-len", str(mem_len), *extra), tokens_per_sample=tps)
    x = tokens(2, 11)
    lengths = [tps] * (11 // tps) + ([11 % tps] if 11 % tps else [])
    streamed, _ = stream_segments(model.decoder, x, lengths)
    incremental_state = {}
    steps = []
    for t in range(11):
        feats, _ = model.decoder(x[:, :t + 1], incremental_state=incremental_state)
        steps.append(feats)
    assert_close(torch.cat(steps, dim=1), streamed)
    # a prompt fed at once (crossing segment boundaries) then one token: same again
    incremental_state = {}
    prompt, _ = model.decoder(x[:, :8], incremental_state=incremental_state)
    rest = [model.decoder(x[:, :t + 1], incremental_state=incremental_state)[0] for t in range(8, 11)]
    assert_close(torch.cat([prompt, *rest], dim=1), streamed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["sdpa", "shift"])
def test_half_precision_forward_is_finite_with_narrow_windows(dtype, impl):
    """§14.12: fp16/bf16 forward, same_length with a 1-key memory (rows with the fewest visible keys)."""
    model = make(("--mem-len", "1", "--same-length", "--attn-impl", impl), dtype=torch.float32)
    ref, _ = stream_segments(model.decoder, tokens(2, 9), (3, 3, 3))
    model = model.to(dtype)
    out, _ = stream_segments(model.decoder, tokens(2, 9), (3, 3, 3))
    assert torch.isfinite(out).all()
    assert_close(out.float(), ref, atol=0.1 if dtype == torch.bfloat16 else 0.02)


@pytest.mark.parametrize("impl", ["shift", "sdpa"])
def test_kernels_agree_in_the_model_with_gradients(impl):
    model = make(("--mem-len", "3", "--dropout", "0.0", "--adaptive-softmax-cutoff", "10,30"))
    x = tokens(2, 8)
    ref = model.get_normalized_probs((stream_segments(model.decoder, x, (4, 4))[0], {}), log_probs=True)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), list(model.parameters()))
    for layer in model.decoder.layers:
        layer.self_attn.attn_impl = impl
    out = model.get_normalized_probs((stream_segments(model.decoder, x, (4, 4))[0], {}), log_probs=True)
    grads = torch.autograd.grad(out.pow(2).sum(), list(model.parameters()))
    assert_close(out, ref)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg)


@pytest.mark.parametrize("same_length", [False, True])
def test_auto_runs_query_blocks_from_256_queries_equal_to_naive_with_gradients(same_length, monkeypatch):
    """Two segments of 300 after a memory of 100 (the window cuts the front of later blocks with --same-length):
    ``auto`` runs the CPU query blocks, equal to ``naive`` in outputs and every gradient."""
    import fairseq_ext.ops.xl_relative as xl

    model = make(("--mem-len", "100", "--dropout", "0.0", *(["--same-length"] if same_length else [])),
                 tokens_per_sample=300).train()
    x = tokens(2, 600)
    params = list(model.decoder.layers.parameters())
    ref, _ = stream_segments(model.decoder, x, (300, 300))
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), params)
    calls = []
    blocked = xl._KERNELS["blocked"]
    monkeypatch.setitem(xl._KERNELS, "blocked", lambda *a, **k: calls.append(1) or blocked(*a, **k))
    for layer in model.decoder.layers:
        layer.self_attn.attn_impl = "auto"
    out, _ = stream_segments(model.decoder, x, (300, 300))
    grads = torch.autograd.grad(out.pow(2).sum(), params)
    assert len(calls) == 4  # 2 layers x 2 segments
    assert_close(out, ref)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg)


# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,match", [
    (["--mem-len", "-1"], "mem-len"),
    (["--decoder-attention-heads", "3"], "does not divide"),
    (["--adaptive-softmax-cutoff", "20,10"], "increasing"),
    (["--adaptive-softmax-cutoff", "10,60"], "below the vocabulary size"),
    (["--adaptive-softmax-cutoff", "10,x"], "integers"),
    (["--same-length", "--mem-len", "0"], "same_length needs mem_len"),
    (["--adaptive-softmax-factor", "0", "--adaptive-softmax-cutoff", "10"], "div_val"),
    (["--attn-impl", "flash"], "attn"),
])
def test_bad_configurations_are_clear_errors(args, match):
    with pytest.raises((ValueError, SystemExit)) as info:
        make(args)
    if info.type is ValueError:
        assert match in str(info.value)


def test_heads_times_head_dim_need_not_equal_model_dim_when_explicit():
    model = make(["--decoder-attention-heads", "3", "--decoder-attention-head-dim", "7"])
    assert model.decoder.layers[0].self_attn.qkv_proj.weight.shape == (3 * 21, 16)


def test_context_window_is_rejected():
    from omegaconf import OmegaConf

    model = make()
    cfg = OmegaConf.create({"eval_lm": {"context_window": 64}})
    with pytest.raises(ValueError, match="streaming"):
        model.prepare_for_inference_(cfg)


def test_detached_memory_rows_are_projected_without_an_input_gradient():
    """``constant_rows``: the memory's keys and values come from detached inputs (the same values, no input gradient
    for rows whose gradient would be discarded); the layer passes it only for a memory that carries no graph."""
    from fairseq_ext.modules.attention.xl_relative_self_attention import XLRelativeSelfAttention

    attn = XLRelativeSelfAttention(8, 2, 4, 0.0, "naive", own_biases=True).double()
    with torch.no_grad():
        attn.content_bias.normal_(), attn.position_bias.normal_()
    memory = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    positions = torch.randn(11, 8, dtype=torch.float64)
    split = attn(x, torch.cat([memory * 1.0, x], 1), positions, constant_rows=6)
    split.sum().backward()
    assert memory.grad is None and x.grad.abs().sum() > 0
    whole = attn(x, torch.cat([memory, x], 1), positions)
    assert_close(split, whole, atol=1e-12, rtol=0)
    whole.sum().backward()
    assert memory.grad.abs().sum() > 0  # without it the memory rows' input gradient is computed
    with pytest.raises(ValueError, match="constant_rows must be 0 or the 6 memory rows, got 5"):
        attn(x, torch.cat([memory, x], 1), positions, constant_rows=5)
