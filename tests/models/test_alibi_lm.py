"""alibi_lm: presets, length and batch independence, incremental decoding, attention paths, generation.

Spec acceptance checks 6-9 of shared/specs/alibi.md §9 (1-5 are in tests/ops/alibi).
"""
import pytest
import torch

from fairseq_ext.errors import ConfigError
from fairseq_ext.models.alibi_lm import MAX_POSITIONS, AlibiLanguageModel
from tests.harness import assert_close, build_model, tiny_dictionary

VOCAB = 50


def tiny(*extra: str, vocab: int = VOCAB):
    return build_model("alibi_lm_tiny", tiny_dictionary(vocab), ["--dropout", "0", *extra]).eval()


def tokens(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 4 + VOCAB, (b, t), generator=g)


def logits(model, x, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kw)[0]


def incremental_logits(model, x) -> torch.Tensor:
    state: dict = {}
    with torch.no_grad():
        steps = [model(x[:, : i + 1], incremental_state=state)[0] for i in range(x.size(1))]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("arch", ["alibi_lm", "alibi_lm_tiny", "alibi_lm_wiki103", "alibi_lm_gpt2_small"])
def test_presets_resolve_to_alibi_lm(arch):
    from fairseq.models import ARCH_MODEL_REGISTRY

    assert ARCH_MODEL_REGISTRY[arch] is AlibiLanguageModel


def test_wiki103_preset_is_the_papers_247m_model():
    model = build_model("alibi_lm_wiki103", tiny_dictionary(267_744 - 4))
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 246_933_504
    assert len([k for k in state if not k.endswith("._extra_state")]) == 272  # + the (empty) train stream
    assert not any("embed_positions" in k for k in state)
    args = model.decoder.args
    assert (args.decoder_layers, args.decoder_embed_dim, args.decoder_ffn_embed_dim,
            args.decoder_attention_heads) == (16, 1024, 4096, 8)
    assert args.adaptive_input and args.tie_adaptive_weights and args.tie_adaptive_proj
    assert args.decoder_normalize_before and args.no_decoder_final_norm
    assert (args.dropout, args.attention_dropout, args.activation_dropout) == (0.3, 0.1, 0.1)


def test_same_parameter_names_as_stock_transformer_lm():
    d = tiny_dictionary(VOCAB)
    dims = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
            "--decoder-attention-heads", "4", "--no-token-positional-embeddings", "--decoder-normalize-before"]
    stock = build_model("transformer_lm", d, dims)
    ours = build_model("alibi_lm", d, dims)
    shapes = [{k: v.shape for k, v in m.state_dict().items() if not k.endswith("_extra_state")} for m in (stock, ours)]
    assert shapes[0] == shapes[1]
    assert ours.decoder.layer_norm is not None and ours.decoder.layers[0].normalize_before


def test_forward_backward_reaches_every_parameter():
    model = build_model("alibi_lm_tiny", tiny_dictionary(VOCAB)).train()
    out = model(tokens(2, 9))[0]
    assert out.shape == (2, 9, len(model.decoder.dictionary))
    torch.nn.functional.cross_entropy(out.flatten(0, 1), tokens(2, 9, seed=1).flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_length_independence_without_overrides():
    """Built for 512-token samples, the model scores 3072 tokens; the first 512 logits are unchanged."""
    model = tiny("--tokens-per-sample", "512")
    assert model.max_positions() == MAX_POSITIONS
    x = tokens(1, 3072)
    assert_close(logits(model, x)[:, :512], logits(model, x[:, :512]))


def test_batch_independence():
    model = tiny()
    x = tokens(17, 24)
    full = logits(model, x)
    for bsz in (1, 3):
        assert_close(logits(model, x[:bsz]), full[:bsz])


def test_incremental_equals_full_pass():
    model = tiny()
    x = tokens(3, 64)
    assert_close(incremental_logits(model, x), logits(model, x))


def test_left_padding_incremental_full_and_unpadded_agree():
    model = tiny()
    pad = model.decoder.padding_idx
    x = tokens(2, 40)
    padded = x.clone()
    padded[0, :7] = pad  # sequence 0 is left-padded by 7
    full = logits(model, padded)
    assert_close(incremental_logits(model, padded), full)
    # ALiBi only sees distances, so left padding does not change the real tokens' logits.
    assert_close(full[0, 7:], logits(model, x[:1, 7:])[0])
    assert_close(full[1], logits(model, x[1:2])[0])


def test_reorder_incremental_state_for_beam_search():
    model = tiny()
    x = tokens(3, 12)
    state: dict = {}
    with torch.no_grad():
        for i in range(8):
            model(x[:, : i + 1], incremental_state=state)
        order = torch.tensor([2, 0, 0])
        model.decoder.reorder_incremental_state_scripting(state, order)
        stepped = model(x[order, :9], incremental_state=state)[0]
    assert_close(stepped[:, -1], logits(model, x[order, :9])[:, -1])


def test_attention_implementations_agree_in_float64():
    x = tokens(2, 11)
    ref = tiny("--attn-impl", "naive").double()
    for impl in ("sdpa", "flex"):
        other = tiny("--attn-impl", impl).double()
        other.load_state_dict(ref.state_dict())
        assert_close(logits(other, x), logits(ref, x))
    # gradients of the whole model: sdpa vs naive
    sdpa = tiny("--attn-impl", "sdpa").double()
    sdpa.load_state_dict(ref.state_dict())
    grads = []
    for model in (ref, sdpa):
        model.zero_grad()
        model(x)[0].square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for ga, gb in zip(*grads):
        assert_close(ga, gb)


def test_key_index_flag_matches_relative_form_in_fp32():
    rel = tiny()
    key = tiny("--alibi-bias-form", "key_index")
    key.load_state_dict(rel.state_dict())
    x = tokens(2, 33)
    assert_close(logits(key, x), logits(rel, x), atol=1e-5)


def test_slopes_stay_fp32_when_the_model_is_cast():
    model = tiny().half()
    slopes = model.decoder.layers[0].self_attn.positional.slopes
    assert slopes.dtype == torch.float32


def test_impossible_head_dim_combination_names_the_fix():
    with pytest.raises(ValueError, match="divisible by the number of attention heads"):
        tiny("--decoder-attention-heads", "5")


@pytest.mark.parametrize("arch,extra,flag", [
    ("alibi_lm_wiki103", [], "--adaptive-softmax-cutoff 20000,60000"),
    ("alibi_lm_wiki103", ["--adaptive-softmax-cutoff", "10,30", "--adaptive-input-cutoff", "10,100"],
     "--adaptive-input-cutoff 10,100"),
    ("alibi_lm_tiny", ["--adaptive-softmax-cutoff", "10,100"], "--adaptive-softmax-cutoff 10,100"),
])
def test_paper_cutoffs_on_a_small_dictionary_name_the_flags(arch, extra, flag):
    """fairseq's adaptive input asserts 'cannot specify cutoff larger than vocab size'; the error names the flag."""
    with torch.device("meta"), pytest.raises(ConfigError, match=flag + ".*Set --adaptive-softmax-cutoff below it"):
        build_model(arch, tiny_dictionary(60), ["--tokens-per-sample", "8", *extra])


def test_one_cutoff_flag_sets_the_tied_adaptive_input_and_softmax():
    """As in the other families, --adaptive-softmax-cutoff alone fits the paper preset to another dictionary: the
    adaptive input follows it; --adaptive-input-cutoff, when given, still wins."""
    with torch.device("meta"):
        model = build_model("alibi_lm_wiki103", tiny_dictionary(60), ["--adaptive-softmax-cutoff", "10,30"])
        with pytest.raises(ConfigError, match="--tie-adaptive-weights needs equal"):
            build_model("alibi_lm_wiki103", tiny_dictionary(60), ["--adaptive-softmax-cutoff", "10,30",
                                                                  "--adaptive-input-cutoff", "20,30"])
    assert model.decoder.embed_tokens.cutoff == [10, 30, 64]
    assert model.decoder.adaptive_softmax.cutoff == [10, 30, 64]
    assert model.decoder.args.adaptive_input_cutoff == "10,30"


def test_greedy_generation_follows_full_pass_argmax():
    """fairseq's SequenceGenerator (incremental decoding) picks the full pass's argmax at every step."""
    from fairseq.sequence_generator import SequenceGenerator

    model = tiny()
    d = model.decoder.dictionary
    prefix = tokens(2, 5)
    gen = SequenceGenerator([model], d, beam_size=1, max_len_b=12, min_len=12)
    sample = {"net_input": {"src_tokens": prefix, "src_lengths": torch.full((2,), 5)}}
    hypos = gen.generate([model], sample, prefix_tokens=prefix)
    for b in range(2):
        out = hypos[b][0]["tokens"]  # prefix + generated tokens (+ eos)
        seq = out[:-1]
        full = logits(model, torch.cat([torch.tensor([d.eos()]), seq])[None])[0]  # generator starts from eos
        for i in range(5, len(seq)):
            lprobs = full[i].clone()
            lprobs[d.pad()] = -float("inf")  # the generator bans pad; unk only gets --unk-penalty (0)
            lprobs[d.eos()] = -float("inf")  # min_len forbids eos
            assert seq[i].item() == lprobs.argmax().item()


def test_one_bias_tensor_is_shared_by_all_layers():
    """Like the fork, one (1, H, T, T) bias per forward, not one per layer (memory at long T); it is part of the call's
    layer context, so nothing keeps it once the forward returns."""
    model = build_model("alibi_lm_tiny", tiny_dictionary(VOCAB), ["--decoder-layers", "3"]).train()
    t = 40
    saved = {}

    def pack(tensor):
        if tensor.shape == (1, 4, t, t):
            saved[tensor.data_ptr()] = tensor
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(tokens(2, t))[0]
    assert len(saved) == 1
    assert not [b for b in model.decoder.buffers() if b.shape == (1, 4, t, t)]
    out.sum().backward()


def test_chunked_attention_matches_sdpa_in_float64_logits_gradients_and_decoding():
    """--attn-impl chunked (5-row query blocks) is the sdpa model's function: logits, every parameter's gradient, and
    token-by-token decoding (one query per step) equal to rounding."""
    x = tokens(2, 13)
    sdpa = tiny("--attn-impl", "sdpa").double()
    chunked = tiny("--attn-impl", "chunked", "--alibi-chunk-size", "5").double()
    chunked.load_state_dict(sdpa.state_dict())
    assert chunked.decoder.layers[0].self_attn.chunk_size == 5
    assert_close(logits(chunked, x), logits(sdpa, x))
    assert_close(incremental_logits(chunked, x), logits(sdpa, x))
    grads = []
    for model in (sdpa, chunked):
        model.zero_grad()
        model(x)[0].square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for ga, gb in zip(*grads):
        assert_close(ga, gb)


def test_auto_evaluation_chunks_long_inputs_without_a_shared_bias():
    """Without gradients and T beyond one chunk, ``auto`` builds no (1, H, T, T) bias and gives sdpa's logits bitwise
    (8-row chunks); with gradients it keeps the shared sdpa bias."""
    auto = tiny("--alibi-chunk-size", "8")
    sdpa = tiny("--attn-impl", "sdpa")
    sdpa.load_state_dict(auto.state_dict())
    x = tokens(2, 40)
    shared = []
    original = auto.decoder.layer_context

    def recording_context(*args):
        context = original(*args)
        shared.append(context.bias)
        return context

    auto.decoder.layer_context = recording_context
    assert torch.equal(logits(auto, x), logits(sdpa, x))
    assert shared and all(bias is None for bias in shared)
    shared.clear()
    auto(x)[0].sum().backward()  # gradients recorded: sdpa with the shared bias
    assert shared and all(bias is not None and bias.shape == (1, 4, 40, 40) for bias in shared)


def test_auto_on_cpu_runs_blocked_with_one_strip_for_all_layers():
    """On CPU at T >= 256, ``auto`` runs the causal-block kernel: the sdpa model's logits and every parameter's
    gradient in float64, every layer's blocks reading views of one (1, H, 128, T) strip; evaluation likewise."""
    t = 260
    auto = build_model("alibi_lm_tiny", tiny_dictionary(VOCAB), ["--dropout", "0", "--decoder-layers", "3",
                                                                 "--tokens-per-sample", str(t)]).double()
    sdpa = build_model("alibi_lm_tiny", tiny_dictionary(VOCAB), ["--dropout", "0", "--decoder-layers", "3",
                                                                 "--attn-impl", "sdpa", "--tokens-per-sample",
                                                                 str(t)]).double()
    sdpa.load_state_dict(auto.state_dict())
    x = tokens(2, t)
    storages = set()

    def pack(tensor):
        if tensor.dim() == 4 and tensor.size(0) == 1 and tensor.size(1) == 4 and tensor.size(2) <= 128:
            storages.add(tensor.untyped_storage().data_ptr())
        return tensor

    grads = []
    for model in (auto, sdpa):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model(x)[0]
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad for p in model.parameters()]))
        if model is auto:
            assert len(storages) == 1, storages  # 3 layers x 3 blocks: one strip
    assert_close(grads[0][0], grads[1][0])
    for ga, gb in zip(grads[0][1], grads[1][1]):
        assert_close(ga, gb)
    shared = []  # evaluation (no gradients) runs it too, with the strip built once by the decoder
    original = auto.decoder.layer_context
    auto.decoder.layer_context = lambda *args: shared.append(original(*args)) or shared[-1]
    assert_close(logits(auto.eval(), x), logits(sdpa.eval(), x))
    assert [tuple(c.bias.shape) for c in shared] == [(1, 4, 128, t)]


def test_negative_chunk_size_is_refused():
    with pytest.raises(ValueError, match="chunk_size"):
        tiny("--alibi-chunk-size", "-1")


@pytest.mark.parametrize("flags", [
    [],
    ["--decoder-normalize-before", "--no-decoder-final-norm", "--no-scale-embedding"],
    ["--decoder-input-dim", "48", "--decoder-output-dim", "40", "--layernorm-embedding", "--activation-fn", "gelu"],
    ["--share-decoder-input-output-embed", "--decoder-normalize-before"],
    ["--adaptive-input", "--adaptive-input-cutoff", "10,30", "--adaptive-softmax-cutoff", "10,30",
     "--tie-adaptive-weights", "--tie-adaptive-proj", "--decoder-normalize-before", "--decoder-input-dim", "32",
     "--decoder-output-dim", "32"],
])
def test_with_zero_slopes_it_is_stock_transformer_lm_without_positions(flags):
    """The decoder stages around the ALiBi layers are fairseq's: with every slope 0 (no bias), the model is stock
    transformer_lm without position embeddings, on the same weights (post- and pre-LN, input/output projections,
    embedding LayerNorm, shared or adaptive output), in float64."""
    d = tiny_dictionary(VOCAB)
    dims = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
            "--decoder-attention-heads", "4", "--dropout", "0", *flags]
    ours = build_model("alibi_lm", d, dims).double().eval()
    stock = build_model("transformer_lm", d, dims + ["--no-token-positional-embeddings"]).double().eval()
    weights = {k: v for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    stock.load_state_dict({k: v for k, v in weights.items() if "positional.slopes" not in k})
    for layer in ours.decoder.layers:
        layer.self_attn.positional.slopes.zero_()
    x = tokens(2, 13)
    out, expected = logits(ours, x), logits(stock, x)
    if "--adaptive-input" in flags:
        out, expected = (m.get_normalized_probs((o,), log_probs=True) for m, o in ((ours, out), (stock, expected)))
    assert_close(out, expected)


def test_normformer_scalings_are_built_and_trained():
    """fairseq 0.12.3.1's transformer_lm drops --scale-attn/-fc/-heads/-resids; alibi_lm builds them, they change the
    function, and every one gets a gradient."""
    flags = ["--scale-attn", "--scale-fc", "--scale-heads", "--scale-resids", "--decoder-normalize-before"]
    model = build_model("alibi_lm_tiny", tiny_dictionary(VOCAB), ["--dropout", "0", *flags]).train()
    layer = model.decoder.layers[0]
    assert layer.attn_ln is not None and layer.ffn_layernorm is not None
    with torch.no_grad():
        layer.c_attn.fill_(0.5)
        layer.w_resid.fill_(2.0)
    plain = build_model("alibi_lm_tiny", tiny_dictionary(VOCAB), ["--dropout", "0", "--decoder-normalize-before"])
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not any(s in k for s in ("c_attn", "attn_ln", "ffn_layernorm", "w_resid"))})
    x = tokens(2, 9)
    assert not torch.allclose(logits(plain.eval(), x), logits(model.eval(), x))
    model.train()
    model(x)[0].square().mean().backward()
    scalings = [p for n, p in model.named_parameters()
                if any(s in n for s in ("c_attn", "w_resid", "attn_ln", "ffn_layernorm"))]
    assert len(scalings) == 2 * 6 and all(p.grad is not None for p in scalings)  # 6 tensors per layer, 2 layers


def test_checkpoint_without_normformer_tensors_names_the_override(tmp_path):
    from fairseq_ext.modules.blocks.alibi_layer import AlibiLayer

    model = build_model("alibi_lm_tiny", tiny_dictionary(VOCAB), ["--scale-attn"])
    weights = {k: v for k, v in model.state_dict().items() if "attn_ln" not in k}
    layer = model.decoder.layers[0]
    assert isinstance(layer, AlibiLayer)
    with pytest.raises(ConfigError, match="--model-overrides .*'scale_attn': False"):
        model.upgrade_state_dict(weights)


def test_layerdrop_skips_layers_only_while_training():
    model = tiny("--decoder-layerdrop", "1.0")
    x = tokens(2, 9)
    decoder = model.decoder
    with torch.no_grad():
        no_layers = decoder.output_layer(decoder.finish(decoder.embed(x, 0, None)))  # (B, T, V)
    assert not torch.allclose(logits(model, x), no_layers)  # eval: every layer runs
    model.train()
    assert_close(logits(model, x), no_layers)  # training at p = 1: every layer skipped


def test_activation_checkpointing_gives_the_same_gradients():
    x = tokens(2, 11)
    plain = tiny().double().train()
    checkpointed = tiny("--checkpoint-activations").double().train()
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.decoder.layers[0].checkpoint_activations
    grads = []
    for model in (plain, checkpointed):
        model(x)[0].square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for ga, gb in zip(*grads):
        assert_close(ga, gb)


@pytest.mark.parametrize("flag", ["--base-layers 1", "--character-embeddings"])
def test_transformer_lm_options_alibi_lm_lacks_are_refused(flag):
    with pytest.raises((ConfigError, ValueError), match=flag.split()[0]):
        tiny(*flag.split())
