"""composed_lm: what is special to it (the contract tests cover streaming, incremental decoding, save/load).

* The core reproduces two paper systems exactly: softmax + xl + memory, post-LN == transformer_xl_lm --untie-r;
  delta / sum + descending positions + memory (carried), post-LN == fast_weight_lm --carry-over-fast-weight.
* Persistent memory of fast weights is a learned initial state; sources behave as documented (window:
  segmentation-invariant); span layers trim keys exactly; per-layer patterns tile; impossible combinations fail
  at build time naming the valid choices; stateless compositions accept --context-window.
"""
import pytest
import torch

from fairseq_ext.errors import ConfigError
from fairseq_ext.modules.attention.fast_weight_self_attention import FastWeightSelfAttention
from fairseq_ext.modules.composed.positions import PositionTerm
from fairseq_ext.modules.composed.recurrent_mixers import FastWeightMixer
from fairseq_ext.state import DecoderState, HiddenCache, KVCache
from tests.harness import assert_close, build_model, stream_segments, tiny_dictionary

DICT = tiny_dictionary(40)
TINY = ["--dropout", "0", "--decoder-layers", "2", "--decoder-embed-dim", "16", "--decoder-attention-heads", "2",
        "--decoder-ffn-embed-dim", "24", "--tokens-per-sample", "6"]


def composed(*extra: str):
    torch.manual_seed(0)
    return build_model("composed_lm", DICT, [*TINY, *extra]).double().eval()


def tokens(batch: int = 3, length: int = 18, seed: int = 0):
    return torch.randint(4, len(DICT), (batch, length), generator=torch.Generator().manual_seed(seed))


def copy_into(target, source, rename) -> None:
    """Load ``source``'s weights into ``target`` under renamed keys; every target tensor must be covered."""
    state = {rename(k): v for k, v in source.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)


def test_xl_relative_memory_post_ln_is_transformer_xl():
    txl = build_model("transformer_xl_tiny", DICT, [*TINY, "--mem-len", "5", "--untie-r", "--attn-impl", "naive"])
    txl = txl.double().eval()
    core = composed("--mixer", "softmax", "--position", "xl", "--source", "memory", "--mem-len", "5",
                    "--decoder-post-norm", "--attn-impl", "naive")

    def rename(key):
        for leaf in ("r_proj", "content_bias", "position_bias"):
            key = key.replace(f"self_attn.{leaf}", f"self_attn.position.{leaf}")
        return key

    copy_into(core, txl, rename)
    x = tokens()
    expected, _ = stream_segments(txl.decoder, x, [6, 6, 6])
    actual, state = stream_segments(core.decoder, x, [6, 6, 6])
    assert_close(actual, expected)
    assert isinstance(state, DecoderState) and all(s.hidden.shape == (3, 5, 16) for s in state.layers)


@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_fast_weights_carried_with_descending_positions_are_fast_weight_lm(rule):
    fwm = build_model("fast_weight_tiny", DICT, [*TINY, "--attn-type", "linear", "--update-rule", rule,
                                                 "--carry-over-fast-weight"]).double().eval()
    core = composed("--mixer", rule, "--position", "none", "--source", "memory", "--input-position", "descending",
                    "--decoder-post-norm")
    copy_into(core, fwm, lambda key: key)
    x = tokens()
    x[1, 14:] = DICT.pad()  # an end-padded row: positions over its real tokens, as fast_weight_lm
    expected, _ = stream_segments(fwm.decoder, x, [6, 6, 6])
    actual, _ = stream_segments(core.decoder, x, [6, 6, 6])
    assert_close(actual, expected)


def test_persistent_fast_weights_are_a_learned_initial_state():
    model = composed("--mixer", "delta", "--position", "none", "--source", "segment+persistent")
    mixers = [layer.self_attn for layer in model.decoder.layers]
    assert all(isinstance(m, FastWeightMixer) and m.initial_weight is not None and not m.carry for m in mixers)
    x = tokens(length=6)
    plain, _, _ = model.decoder.forward_segment(x, None)
    with torch.no_grad():
        for m in mixers:
            m.initial_weight.normal_()
    learned, state, _ = model.decoder.forward_segment(x, None)
    assert state is None and not torch.allclose(plain, learned)  # W_0 used, nothing carried
    model.train()
    model.decoder.forward_segment(x, None)[0].square().sum().backward()
    assert all(m.initial_weight.grad is not None and m.initial_weight.grad.abs().sum() > 0 for m in mixers)
    # the same as the attention module run from the state W_0
    h = torch.randn(2, 5, 16, dtype=torch.float64)
    expected, _ = FastWeightSelfAttention.forward(mixers[0], h, mixers[0]._initial(2, h))
    assert_close(mixers[0](h, None)[0], expected)


def test_checkpoints_of_the_wrapped_fast_weight_mixer_load():
    """composed_lm checkpoints written while FastWeightMixer wrapped its attention (``self_attn.attention.*``) load
    through fairseq's upgrade hook and give the same outputs."""
    model = composed("--mixer", "softmax,delta", "--position", "alibi,none", "--source", "memory",
                     "--mem-len", "4")
    old = {key.replace("layers.1.self_attn.", "layers.1.self_attn.attention.")
           if "initial_weight" not in key else key: value for key, value in model.state_dict().items()}
    assert any(".self_attn.attention.q_proj" in key for key in old)
    other = composed("--mixer", "softmax,delta", "--position", "alibi,none", "--source", "memory",
                     "--mem-len", "4")
    other.load_state_dict(old)
    x = tokens()
    assert_close(other.decoder.forward_segment(x, None)[0], model.decoder.forward_segment(x, None)[0])


def test_window_source_is_invariant_to_segmentation_and_caches_w_keys():
    model = composed("--source", "window", "--mem-len", "4", "--position", "alibi")
    x = tokens(length=17)
    one, _, _ = model.decoder.forward_segment(x, None)
    parts, state = stream_segments(model.decoder, x, [3, 9, 5])
    assert_close(parts, one)  # each query sees at most W = 4 earlier keys, wherever the segments are cut
    assert all(isinstance(s, KVCache) and s.key.shape == (3, 2, 4, 8) for s in state.layers)
    # and it differs from the unbounded memory of the same length
    memory = composed("--source", "memory", "--mem-len", "4", "--position", "alibi")
    assert not torch.allclose(stream_segments(memory.decoder, x, [3, 9, 5])[0], parts)


@pytest.mark.parametrize("position", ["alibi", "xl", "none"])
@pytest.mark.parametrize("source", ["memory", "segment"])
def test_plain_layers_run_a_family_kernel_equal_to_the_biased_reference(position, source, monkeypatch):
    """--attn-impl auto sends plain ALiBi / Transformer-XL layers to ops.alibi / ops.xl_relative, and layers with no
    score term to ops.alibi with zero slopes (on CPU in training, T >= 256: causal query blocks over [memory ;
    segment]); outputs and every gradient equal ops.biased_attention's naive form (float64, two segments of 300: the
    second over 100 carried memory rows)."""
    import fairseq_ext.modules.composed.softmax_mixer as mixer
    import fairseq_ext.ops.alibi as alibi_ops
    import fairseq_ext.ops.xl_relative as xl_ops

    flags = ["--mixer", "softmax,delta", "--position", f"{position},none", "--source", source, "--mem-len", "100",
             "--tokens-per-sample", "300"]
    naive, auto = composed(*flags, "--attn-impl", "naive"), composed(*flags)
    auto.load_state_dict(naive.state_dict())
    x = tokens(batch=2, length=600)
    expected, _ = stream_segments(naive.train().decoder, x, [300, 300])
    expected.pow(2).sum().backward()
    blocked_calls = []
    kernels = (xl_ops if position == "xl" else alibi_ops)._KERNELS
    blocked = kernels["blocked"]
    monkeypatch.setitem(kernels, "blocked", lambda *a, **k: blocked_calls.append(1) or blocked(*a, **k))
    monkeypatch.setattr(mixer, "biased_attention", lambda *a, **k: pytest.fail("auto built the (T, S) terms"))
    actual, _ = stream_segments(auto.train().decoder, x, [300, 300])
    actual.pow(2).sum().backward()
    assert len(blocked_calls) == 2  # one softmax layer of the two, two segments
    assert_close(actual, expected)
    for (name, a), b in zip(auto.named_parameters(), naive.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert_close(a.grad, b.grad, msg=name)


def test_a_relative_scheme_without_its_own_kernel_keeps_its_terms():
    """The base ``attend`` (plain causal attention) serves schemes that add no score term; a new relative scheme
    that defines ``score_terms`` only gets None, so the mixer builds its bias."""
    class Halved(PositionTerm):
        def score_terms(self, q, distance):
            return q * 0.5, None

    q = torch.randn(1, 2, 3, 4)
    assert Halved().attend(q, q, q, 0, 0.0) is None
    assert_close(PositionTerm().attend(q, q, q, 0, 0.0),
                 torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))


def test_segment_source_forgets_and_memory_source_keeps_m():
    x = tokens(length=12)
    segment = composed("--source", "segment")
    a, _, _ = segment.decoder.forward_segment(x[:, 6:], None)
    b, state = stream_segments(segment.decoder, x, [6, 6])
    assert state is None and torch.equal(b[:, 6:], a)
    memory = composed("--source", "memory", "--mem-len", "7")
    _, state = stream_segments(memory.decoder, x, [6, 6])
    assert all(isinstance(s, HiddenCache) and s.length == 7 for s in state.layers)


def test_span_layers_trim_keys_exactly(monkeypatch):
    """Keys beyond the current span are never projected; the result equals attending to all of them."""
    model = composed("--mixer", "span", "--position", "xl", "--source", "memory", "--mem-len", "12",
                     "--attn-span", "12", "--adapt-span-ramp", "2", "--adapt-span-init", "0.25")
    x = tokens(length=18)
    trimmed, _ = stream_segments(model.decoder, x, [6, 6, 6])
    import fairseq_ext.modules.composed.softmax_mixer as softmax_mixer
    seen = []
    monkeypatch.setattr(softmax_mixer, "current_max_span", lambda z, max_span, ramp: seen.append(1) or max_span)
    untrimmed, _ = stream_segments(model.decoder, x, [6, 6, 6])
    assert seen and len(seen) == 6
    assert_close(trimmed, untrimmed)
    stats = model.decoder.layers[0].self_attn.log_stats()
    assert float(stats["span_avg"]) == pytest.approx(min(12, 3 + 2))


def test_patterns_tile_the_layers():
    model = build_model("composed_lm", DICT, [*TINY, "--decoder-layers", "6", "--mixer", "softmax,softmax,delta",
                                              "--position", "alibi,alibi,none", "--source", "memory",
                                              "--mem-len", "4"])
    kinds = [type(layer.self_attn).__name__ for layer in model.decoder.layers]
    assert kinds == ["SoftmaxMixer", "SoftmaxMixer", "FastWeightMixer"] * 2


@pytest.mark.parametrize("args,match", [
    (["--mixer", "delta", "--position", "none", "--source", "window", "--mem-len", "4"],
     r"use source segment or memory \(valid: segment, memory\)"),
    (["--position", "alibi+xl"], r"one relative position term per layer .* choose one of \('none', 'alibi', 'xl'\)"),
    (["--mixer", "span", "--source", "memory", "--mem-len", "8", "--attn-span", "16"],
     r"--attn-span 16 is larger than the memory of --mem-len 8.*--mem-len >= 16"),
    (["--mixer", "delta", "--position", "alibi"], r"no score matrix .* valid for delta: none"),
    (["--source", "memory"], r"source memory needs --mem-len >= 1"),
    (["--source", "memory+persistent", "--mem-len", "4"], r"needs --pers-mem-size >= 1"),
    (["--mixer", "sha", "--position", "none", "--source", "window", "--mem-len", "3"], r"valid: segment, memory"),
    (["--mixer", "softmax,delta,softmax"], r"do not tile --decoder-layers 2"),
    (["--mixer", "gated"], r"unknown mixer 'gated'; choose one of \('softmax', 'span', 'sum', 'delta', 'sha'\)"),
    (["--source", "segment+cache"], r"optionally followed by '\+persistent'"),
    (["--decoder-attention-heads", "3"], r"does not divide --decoder-embed-dim 16"),
])
def test_impossible_combinations_fail_at_build_naming_the_valid_choices(args, match):
    with pytest.raises(ConfigError, match=match):
        build_model("composed_lm", DICT, [*TINY, *args])


def test_only_stateful_compositions_reject_the_sliding_window():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"eval_lm": {"context_window": 4}, "generation": {"beam": 1, "no_beamable_mm": True}})
    composed("--source", "segment").prepare_for_inference_(cfg)  # stateless: fairseq's protocol applies
    with pytest.raises(ValueError, match="streaming"):
        composed("--source", "memory", "--mem-len", "4").prepare_for_inference_(cfg)


@pytest.mark.parametrize("arch", ["composed_alibi_memory_wiki103", "composed_delta_persistent_wiki103",
                                  "composed_span_xl_enwik8", "composed_hybrid_delta_wiki103"])
def test_paper_size_presets_are_consistent(arch):
    """The presets' layouts pass the build-time rules (checked without allocating the full model)."""
    from fairseq_ext.models.composed_lm import mixer_sizes
    from fairseq_ext.modules.composed import check_layer, parse_layout
    from tests.harness import training_cfg

    cfg = training_cfg(arch, ["--tokens-per-sample", "256"], task="language_modeling").model
    specs = parse_layout(cfg.mixer, cfg.position, cfg.source, cfg.decoder_layers)
    for index, spec in enumerate(specs):
        check_layer(index, spec, cfg.mem_len, cfg.attn_span, cfg.pers_mem_size)
    assert mixer_sizes(cfg).head_dim * cfg.decoder_attention_heads == cfg.decoder_embed_dim


def test_delta_persistent_preset_is_the_small_fwm_plus_its_initial_fast_weights():
    wiki103 = tiny_dictionary(267_735 - 4)  # WikiText-103's dictionary size
    core = build_model("composed_delta_persistent_wiki103", wiki103, ["--tokens-per-sample", "256"])
    fwm = build_model("fast_weight_wiki103_small_fwm", wiki103, ["--tokens-per-sample", "256"])
    count = sum(p.numel() for p in core.parameters())
    assert count == sum(p.numel() for p in fwm.parameters()) + 16 * 8 * 16 * 16 == 44_067_546
