"""adaptive_span_lm: the spec's acceptance checks (adaptive_span.md §10) on tiny models.

``reference_lprobs`` is written from the spec (§1.1-§1.6), independent of the op and of the model's trimming and
caching: every layer sees the whole stream with zeros before its start, and query t attends to the inputs at
t-L .. t-1 explicitly. Streaming with carried caches (any segment length), trimming, the adaptive cache and
incremental decoding must all reproduce it. fairseq's own ``examples/adaptive_span`` model (shipped in the
fairseq package) is an external check: ours equals it exactly with ``--no-span-renorm`` and equals it with the
renormalisation patched back in, as the spec's §6.2 says.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fairseq_ext.models.adaptive_span_lm import AdaptiveSpanLanguageModel
from fairseq_ext.modules.attention.adaptive_span_mask import AdaptiveSpanMask
from fairseq_ext.optim.bounds import collect_bounds
from fairseq_ext.ops.adaptive_span import select_impl
from tests.harness import assert_close, build_model, single_thread, tiny_dictionary

VOCAB = 40  # 4 specials + 36 words
one_thread = pytest.fixture(autouse=True)(single_thread)


def make(extra=(), span=200, z=None, dtype=torch.float64, vocab=VOCAB, eps=0.0) -> AdaptiveSpanLanguageModel:
    """Tiny model (2 layers, H 16, 4 heads of 4, ramp 8); z: per-head spans of every layer (fractions). The
    renormalisation epsilon defaults to 0 here: with the original's 1e-8, a trimmed window's renormalised weights
    differ from the untrimmed ones by ~eps·(trimmed softmax mass) / (kept mass)^2 (test_original_epsilon)."""
    torch.manual_seed(0)
    model = build_model("adaptive_span_tiny", tiny_dictionary(vocab - 4),
                        ["--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "24", "--attn-span", str(span),
                         "--adapt-span-ramp", "8", *extra])
    model = model.to(dtype).eval()
    for layer in model.decoder.layers:
        layer.self_attn.renorm_eps = eps
    if z is not None:
        with torch.no_grad():
            for layer, values in zip(model.decoder.layers, z):
                layer.self_attn.span.z.copy_(torch.tensor(values))
    model.decoder.attach_streams("test")
    return model


def tokens(b, t, seed=1):
    return torch.randint(4, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def reference_lprobs(model, x, zero_from=None):
    """Log-probs (B, N, V) of stream x (B, N) from the spec's equations, no trimming, no cache. zero_from =
    (t0, c, old_z): queries t >= t0 see the inputs at positions < c as zeros (a cache that was cut to start at c),
    queries t < t0 were computed with the span values old_z (one (K,) tensor per layer; the model's are newer)."""
    dec = model.decoder
    b, n = x.shape
    big = dec.max_span
    key_pe = dec.key_pe  # (d, L): column j = distance L - j
    d = key_pe.size(0)
    h = dec.embed_tokens(x)  # (B, N, H)
    for index, layer in enumerate(dec.layers):
        att = layer.self_attn
        heads = att.num_heads
        padded = torch.cat([h.new_zeros(b, big, h.size(-1)), h], dim=1)  # (B, L + N, H): zeros before the start
        q = att.q_proj(h).view(b, n, heads, d)
        k = att.k_proj(padded).view(b, big + n, heads, d)
        v = att.v_proj(padded).view(b, big + n, heads, d)
        outs = []
        for t in range(n):
            kk, vv = k[:, t:t + big].clone(), v[:, t:t + big].clone()  # (B, L, K, d): positions t-L .. t-1
            if zero_from is not None and t >= zero_from[0]:
                for j in range(big):
                    if t - big + j < zero_from[1]:
                        kk[:, j] = 0
                        vv[:, j] = 0
            logits = torch.einsum("bkd,bjkd->bkj", q[:, t], kk) + torch.einsum("bkd,dj->bkj", q[:, t], key_pe)
            if att.pers_key is not None:
                pers = torch.einsum("bkd,kdn->bkn", q[:, t], att.pers_key * math.sqrt(d))
                logits = torch.cat([logits, pers], dim=-1)
            probs = torch.softmax(logits / math.sqrt(d), dim=-1)  # (B, K, L [+ N])
            if att.span is not None:
                z, ramp = att.span.z, att.span.ramp
                if zero_from is not None and t < zero_from[0]:
                    z = zero_from[2][index]
                distance = torch.arange(big, 0, -1, dtype=probs.dtype)  # (L,)
                mask = ((z[:, None] * big - (distance - 1)) / ramp + 1).clamp(0, 1)  # (K or 1, L)
                probs = torch.cat([probs[..., :big] * mask, probs[..., big:]], dim=-1)
                if att.renorm:
                    probs = probs / (probs.sum(-1, keepdim=True) + att.renorm_eps)
            o = torch.einsum("bkj,bjkd->bkd", probs[..., :big], vv)  # (B, K, d)
            if att.pers_value is not None:
                n_pers = att.pers_value.size(1)
                o = o + torch.einsum("bkn,knd->bkd", probs[..., big:], att.pers_value * math.sqrt(n_pers))
            outs.append(o.reshape(b, -1))
        h = layer.self_attn_layer_norm(h + att.out_proj(torch.stack(outs, dim=1)))
        if layer.fc1 is not None:
            h = layer.final_layer_norm(h + layer.fc2(F.relu(layer.fc1(h))))
    return F.log_softmax(dec.output_projection(h), dim=-1)


def stream_lprobs(model, x, lengths):
    """Log-probs of x streamed in segments of the given lengths with carried caches (eval stream)."""
    model.decoder.reset_state()
    outs, start = [], 0
    for length in lengths:
        logits, _ = model(x[:, start:start + length])
        outs.append(F.log_softmax(logits, dim=-1))
        start += length
    return torch.cat(outs, dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# checks 1, 5, 9: window, orientation, trimming, block-carried evaluation = single pass
# ----------------------------------------------------------------------------------------------------------------------
Z = [[0.05, 0.3, 0.0, 0.15], [0.0, 0.02, 0.4, 0.1]]  # L = 200, R = 8: layer windows L_pos 136 and 136


@pytest.mark.parametrize("impl", ["skew", "naive"])
def test_streaming_any_segment_length_equals_reference(impl):
    model = make(["--attn-impl", impl], z=Z)
    x = tokens(3, 45)
    expected = reference_lprobs(model, x)
    for lengths in ([45], [7] * 6 + [3], [13, 13, 13, 6], [1] * 45):
        assert_close(stream_lprobs(model, x, lengths), expected)


def test_original_epsilon_keeps_trimmed_within_its_bound():
    model = make(z=Z, eps=1e-8)
    x = tokens(3, 45)
    assert_close(stream_lprobs(model, x, [7] * 6 + [3]), reference_lprobs(model, x), atol=1e-6, rtol=0)


def test_trimming_happens_and_is_exact():
    model = make(z=[[0.0] * 4, [0.125] * 4])
    windows = [layer.self_attn.window() for layer in model.decoder.layers]
    assert [(w.max_size, w.trim, w.span, w.cache) for w in windows] == [(8, 192, 8, 72), (33, 128, 72, 136)]
    x = tokens(2, 90)
    assert_close(stream_lprobs(model, x, [30, 30, 30]), reference_lprobs(model, x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("impl", ["auto", "blocked", "fused"])
def test_segments_longer_than_the_window_run_banded_and_equal_the_reference(impl):
    """Windows of 8 and 72 keys under segments of 96 and 128 queries, over carried caches: the banded kernels (2 blocks
    of 48 rows, 2 of 64); auto runs blocked at these sizes (fused from 8 MiB of scores on, test_fused.py)."""
    model = make(["--attn-impl", impl], z=[[0.0] * 4, [0.125] * 4])
    assert [layer.self_attn.window().span for layer in model.decoder.layers] == [8, 72]
    assert select_impl("auto", 72, 96, dtype=torch.float64, batch_heads=2 * 4) == "blocked"
    x = tokens(2, 224)
    assert_close(stream_lprobs(model, x, [96, 128]), reference_lprobs(model, x), atol=1e-10, rtol=0)
    model.decoder.reset_state()
    model(x[:, :30])
    assert [c.length for c in model.decoder.stream_state("eval").layers] == [30, 30]
    model(x[:, 30:90])
    assert [c.length for c in model.decoder.stream_state("eval").layers] == [72, 90]  # cut to C = L_pos + 64


@pytest.mark.parametrize("extra,z", [(["--adapt-span-layer"], [[0.2], [0.05]]), (["--fixed-span"], None),
                                     (["--no-adapt-span-cache"], Z), (["--pers-mem-size", "5"], Z),
                                     (["--pers-mem-size", "3", "--fixed-span"], None),
                                     (["--pers-mem-size", "5", "--attn-impl", "fused"], Z)])
def test_variants_equal_reference(extra, z):
    model = make(extra, span=70 if "--fixed-span" in extra else 200, z=z)
    x = tokens(2, 40)
    assert_close(stream_lprobs(model, x, [9, 9, 9, 9, 4]), reference_lprobs(model, x), atol=1e-10, rtol=0)


def test_orientation_distance_one_is_last_key_pe_column_and_self_is_never_seen():
    model = make(["--decoder-layers", "1"], span=4, z=[[1.0] * 4])
    x = tokens(1, 6)
    base = stream_lprobs(model, x, [6])
    # changing token t changes the outputs at t+1 .. t+L only: a query never sees itself (residual aside)
    y = x.clone()
    y[0, 2] = 4 if x[0, 2] != 4 else 5
    changed = (stream_lprobs(model, y, [6]) - base).abs().amax(-1)[0]
    assert changed[:2].max() == 0 and changed[2] > 0  # position 2 itself changes only through the residual
    # the last key_pe column is distance 1: perturbing it changes nothing at the stream's first token ...
    with torch.no_grad():
        model.decoder.key_pe[:, -1] += 1.0
    after = stream_lprobs(model, x, [6])
    assert_close(after, reference_lprobs(model, x), atol=1e-10, rtol=0)
    assert (after - base).abs().amax() > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# check 6: cache too short (spans grew since the cache was sized) = zeros at the positions that were dropped
# ----------------------------------------------------------------------------------------------------------------------
def test_cache_too_short_is_zero_padded():
    model = make(z=[[0.0] * 4, [0.0] * 4])  # cache C = 72
    x = tokens(2, 130)
    model.decoder.reset_state()
    first, _ = model(x[:, :100])
    assert [c.length for c in model.decoder.stream_state("eval").layers] == [72, 72]
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.self_attn.span.z.fill_(0.5)  # S_max 108 -> L_pos 136 > 72 cached
    second, _ = model(x[:, 100:])
    old_z = [torch.zeros(4, dtype=torch.float64)] * 2
    expected = reference_lprobs(model, x, zero_from=(100, 100 - 72, old_z))
    assert_close(F.log_softmax(second, -1), expected[:, 100:], atol=1e-10, rtol=0)
    assert (F.log_softmax(second, -1) - reference_lprobs(model, x, zero_from=(100, 0, old_z))[:, 100:]).abs().max() \
        > 1e-4  # the zeros matter


# ----------------------------------------------------------------------------------------------------------------------
# incremental decoding through fairseq's incremental_state == streaming; beam reorder
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [[], ["--pers-mem-size", "4"]])
def test_incremental_decoding_equals_streaming(extra):
    model = make(extra, z=Z)
    x = tokens(2, 25)
    expected = stream_lprobs(model, x, [25])
    state, outs = {}, []
    for t in range(25):
        logits, _ = model(x[:, :t + 1], incremental_state=state)
        outs.append(F.log_softmax(logits[:, -1:], -1))
    assert_close(torch.cat(outs, 1), expected, atol=1e-10, rtol=0)
    model.decoder.reorder_incremental_state(state, torch.tensor([1, 1, 0]))
    logits, _ = model(torch.cat([x[[1, 1, 0]], x[[1, 1, 0], :1]], 1), incremental_state=state)
    following = stream_lprobs(model, torch.cat([x[[1, 1, 0]], x[[1, 1, 0], :1]], 1), [26])[:, -1]
    assert_close(F.log_softmax(logits[:, -1], -1), following, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# external check: fairseq's examples/adaptive_span (no renormalisation) on the same weights
# ----------------------------------------------------------------------------------------------------------------------
def _fairseq_example(model):
    from fairseq.examples.adaptive_span.adaptive_span_model import TransformerSeq

    dec = model.decoder
    att0 = dec.layers[0].self_attn
    ref = TransformerSeq(vocab_size=len(dec.dictionary), d_model=dec.embed_dim, n_head=att0.num_heads,
                         n_layer=len(dec.layers), attn_span=dec.max_span, emb_dropout=0.0, aux_loss_scaler=0.0,
                         adapt_span_layer=False, d_inner=dec.layers[0].fc1.out_features, dropout=0.0,
                         adapt_span_ramp=att0.span.ramp, adapt_span_init=0.0).to(torch.float64).eval()
    with torch.no_grad():
        ref.in_emb.weight.copy_(dec.embed_tokens.weight)
        ref.out_emb.weight.copy_(dec.output_projection.weight)
        ref.out_emb.bias.copy_(dec.output_projection.bias)
        ref.key_pe.copy_(dec.key_pe[None])
        for theirs, ours in zip(ref.layers, dec.layers):
            for name in ("query", "key", "val", "out"):
                mine = {"query": "q", "key": "k", "val": "v", "out": "out"}[name] + "_proj"
                getattr(theirs.attn, "proj_" + name).weight.copy_(getattr(ours.self_attn, mine).weight)
            theirs.attn.attn.adaptive_span._mask.current_val.copy_(ours.self_attn.span.z.view(-1, 1, 1))
            for a, b in ((theirs.norm1, ours.self_attn_layer_norm), (theirs.norm2, ours.final_layer_norm),
                         (theirs.ff.fc1, ours.fc1), (theirs.ff.fc2, ours.fc2)):
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
    return ref


def _run_fairseq_example(ref, x, block):
    caches = [x.new_zeros(x.size(0), layer.attn.attn.get_cache_size(), ref.in_emb.weight.size(1),
                          dtype=torch.float64) for layer in ref.layers]
    outs = []
    for start in range(0, x.size(1), block):
        out, caches, _ = ref(x[:, start:start + block], caches)
        outs.append(out)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("renorm", [False, True])
def test_fairseq_example_parity(renorm, monkeypatch):
    from fairseq.examples.adaptive_span import adaptive_span_attention as fs

    model = make([] if renorm else ["--no-span-renorm"], z=Z, eps=1e-8)
    ref = _fairseq_example(model)
    if renorm:  # the original's renormalisation, which fairseq's example dropped (spec §6.2)
        masked = fs.AdaptiveMask.forward
        monkeypatch.setattr(fs.AdaptiveMask, "forward",
                            lambda self, a: (lambda m: m / (m.sum(-1, keepdim=True) + 1e-8))(masked(self, a)))
    x = tokens(2, 48)
    ours = stream_lprobs(model, x, [16, 16, 16])
    # fairseq's mask is computed in fp32 (mask_template.float()): agreement to fp32 resolution
    assert_close(ours, _run_fairseq_example(ref, x, 16), atol=0, rtol=1e-6)
    if not renorm:
        assert (ours - reference_lprobs(make(z=Z), x)).abs().max() > 1e-3  # renormalisation matters


# ----------------------------------------------------------------------------------------------------------------------
# checks 4, 7, 8, 10, 11: span gradient, loss, telemetry, clamp, persistent memory, parameter counts
# ----------------------------------------------------------------------------------------------------------------------
def test_span_gradient_matches_finite_differences():
    model = make(["--decoder-layers", "1"], span=40, z=[[0.0123, 0.0061, 0.3172, 0.2013]])  # z·L off the kinks
    x = tokens(2, 30)
    z = model.decoder.layers[0].self_attn.span.z

    def loss():
        model.decoder.reset_state()
        return -stream_lprobs(model, x, [30]).sum()

    loss().backward()
    grad = z.grad.clone()
    assert (grad.abs() > 1e-6).all()  # nonzero near z = 0 too (the ramp covers distances 1..R)
    for h in range(4):
        with torch.no_grad():
            z[h] += 1e-6
            up = loss()
            z[h] -= 2e-6
            down = loss()
            z[h] += 1e-6
        assert abs((up - down).item() / 2e-6 - grad[h].item()) < 1e-5 * max(1.0, abs(grad[h].item()))


def test_span_loss_telemetry_and_bounds():
    masks = [AdaptiveSpanMask(8, 8192, 32, 0.5, 5e-7).train() for _ in range(12)]
    assert sum(m.aux_loss() for m in masks).item() == pytest.approx(0.024576, rel=1e-6)  # z in fp32
    assert masks[0].eval().aux_loss() is None  # training only
    model = make(z=[[0.0, 0.5, 0.02, 1.0], [0.125] * 4])
    assert model.decoder.layer_spans() == [[8.0, 108.0, 12.0, 200.0], [33.0] * 4]
    stats = model.decoder.log_stats()
    assert stats["span_avg"] == pytest.approx((82.0 + 33.0) / 2) and stats["span_max"] == 200.0
    assert stats["attn_len"] == (200 + 72) / 2
    model(tokens(3, 10))
    per_token = 2 * 4 * 4 * ((2 * (200 + 10) + 200) + (2 * (72 + 10) + 72)) / 1e6  # 2·K·d·(2(L_pos + M) + L_pos)
    assert model.decoder.log_stats()["attn_mflop_tok"] == pytest.approx(per_token)
    assert model.decoder.attention_gflop(3, 10) == pytest.approx(per_token * 30 / 1e3)
    # segments of 256 > L_pos run blocked (4 blocks of 64 rows): each block's keys only
    blocked = 2 * 4 * 4 * 256 * ((2 * (200 + 64) + 200) + (2 * (72 + 64) + 72)) / 1e9
    assert model.decoder.attention_gflop(1, 256) == pytest.approx(blocked)
    assert [p for p, _, _ in collect_bounds(model)] == [layer.self_attn.span.z for layer in model.decoder.layers]
    model.train()
    aux = sum(m.aux_loss() for m in model.decoder.span_masks())
    assert aux.item() == pytest.approx(2e-6 * 200 * (1.52 / 4 + 0.125))


def test_z_stays_fp32_under_half_and_clamp_reaches_it():
    from fairseq_ext.optim.bounds import clamp_parameters

    model = make(dtype=torch.float32, z=[[1.3, -0.2, 0.5, 0.5], [0.5] * 4]).half()
    z = model.decoder.layers[0].self_attn.span.z
    assert z.dtype == torch.float32 and model.decoder.key_pe.dtype == torch.float16
    clamp_parameters(model, object())
    assert z.tolist() == [1.0, 0.0, 0.5, 0.5]


def test_persistent_memory_layers_have_no_feed_forward():
    model = make(["--pers-mem-size", "6"], z=Z)
    names = [n for n, _ in model.named_parameters() if n.startswith("decoder.layers.0.")]
    assert not any(part in n for n in names for part in ("fc1", "fc2", "final_layer_norm"))
    att = model.decoder.layers[0].self_attn
    assert att.pers_key.shape == (4, 4, 6) and att.pers_value.shape == (4, 6, 4)
    assert att.pers_key.numel() + att.pers_value.numel() == 2 * 6 * 16  # 2·N·H per layer


@pytest.mark.parametrize("arch,vocab,expected", [
    ("adaptive_span_enwik8_small", 205, 6.48e6), ("adaptive_span_enwik8", 205, 38.54e6),
    ("adaptive_span_enwik8_large", 205, 208.91e6), ("adaptive_span_text8", 28, 38.36e6),
    ("adaptive_span_text8_large", 28, 208.64e6), ("all_attention_enwik8_small", 205, 38.50e6),
    ("all_attention_enwik8", 205, 114.02e6), ("all_attention_wiki103", 267736, 132.49e6)])
def test_preset_parameter_counts(arch, vocab, expected):
    """Spec §10 check 11, counted on the meta device (no memory), vocabularies of the spec's sizes."""
    with torch.device("meta"):
        model = build_model(arch, _dictionary_of_size(vocab))
    count = sum(p.numel() for p in model.parameters())  # tied tensors once
    assert round(count / 1e4) == round(expected / 1e4), count


def _dictionary_of_size(size):
    d = tiny_dictionary(size - 4)
    assert len(d) == size
    return d


def test_bad_configurations_name_the_fix():
    with pytest.raises(ValueError, match="does not divide"):
        make(["--decoder-attention-heads", "3"])
    with pytest.raises(ValueError, match="adapt-span-init"):
        make(["--adapt-span-init", "1.5"])
    with pytest.raises(ValueError, match="dictionary size"):
        make(["--adaptive-softmax-cutoff", "10,100"])


def test_adaptive_io_forward_and_ties():
    model = make(["--adaptive-softmax-cutoff", "10,20", "--pers-mem-size", "3"], z=Z)
    dec = model.decoder
    assert dec.adaptive_softmax.weights["1"] is dec.embed_tokens.emb_layers[1].weight
    assert dec.adaptive_softmax.out_projs["0"] is dec.embed_tokens.emb_projs["0"]
    x = tokens(2, 12)
    features, _ = model(x)
    lprobs = model.get_normalized_probs((features, {}), log_probs=True)
    assert_close(lprobs.exp().sum(-1), torch.ones(2, 12, dtype=torch.float64), atol=1e-10, rtol=0)


def test_cache_rows_are_projected_without_an_input_gradient():
    """Keys and values of the cache rows come from detached inputs (truncated BPTT): a cache that still carries a
    graph gets no gradient through them, the segment does, and the output equals one projection of [cache ; x]."""
    from fairseq_ext.modules.attention.adaptive_span_self_attention import AdaptiveSpanSelfAttention

    attn = AdaptiveSpanSelfAttention(8, 2, 6, 0.0, None).double()
    cache = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    window = attn.window()
    out = attn(x, torch.cat([cache * 1.0, x], 1), torch.randn(4, 6, dtype=torch.float64), window)
    out.sum().backward()
    assert cache.grad is None and x.grad.abs().sum() > 0
    k_all = attn.k_proj(torch.cat([cache, x], 1))  # one projection of [cache ; x]
    k_split = torch.cat([attn.k_proj(cache.detach()), attn.k_proj(x)], 1)
    assert_close(k_split, k_all, atol=0, rtol=0)
