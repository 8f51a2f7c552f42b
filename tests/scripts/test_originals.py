"""scripts/originals: each bench-only reproduction of an original code base holds the weights of the row it is built
for and computes what our model computes (so `--original` timings compare equal work): the ALiBi fork's mask and
logits, Transformer-XL's layer stack with its memories, SHA-RNN's stack with carried LSTM states and memories,
fairseq's adaptive-span port with its caches."""
from typing import List

import pytest
import torch

from tests.harness import assert_close
from tests.scripts.tables import scripts_on_path

scripts_on_path()
from benchrow import STREAM_TASK, FairseqRow  # noqa: E402


def row(arch: str, *flags: str, tgt: int = 8, batch: int = 2, vocab: int = 40, original: bool = False,
        max_tokens: int = 0) -> FairseqRow:
    """A fairseq-built row (fairseq's Trainer, CPU fp32), or its original reproduction holding the same weights."""
    sizes = ["--tokens-per-sample", str(tgt), "--batch-size", str(batch), "--optimizer", "adam", "--lr", "1e-3"]
    sizes += ["--max-tokens", str(max_tokens)] if max_tokens else []
    return FairseqRow([*STREAM_TASK, *sizes, "--arch", arch, *flags], vocab, "cpu", original=original)


# --------------------------------------------------------------------------------------------------------------------
# ALiBi: the fork (ofirpress/attention_with_linear_biases) on stock fairseq layers
# --------------------------------------------------------------------------------------------------------------------

ALIBI_SIZE = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64"]


@pytest.mark.parametrize("heads", [4, 6])
def test_fork_mask_is_causal_plus_key_index_bias_at_b_times_h_plus_h(heads):
    from originals.alibi import ForkAlibiDecoder

    from fairseq_ext.ops.alibi import alibi_slopes

    t, b_max, b = 8, 3, 2
    fork = row("alibi_lm", *ALIBI_SIZE, "--decoder-attention-heads", str(heads), "--decoder-embed-dim",
               str(8 * heads), tgt=t, batch=b_max, original=True).model
    decoder = fork.decoder
    assert type(decoder) is ForkAlibiDecoder and decoder.embed_positions is None
    assert decoder.alibi.shape == (b_max * heads, 1, t)  # sized from max_tokens // tokens_per_sample
    mask = decoder.buffered_future_mask(torch.zeros(t, b, 8 * heads))  # x is (T, B, C) at the call site
    assert mask.shape == (b * heads, t, t) and mask.dtype == torch.float32
    slopes = alibi_slopes(heads)
    j = torch.arange(t, dtype=torch.float32)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    for bi in range(b):
        for h in range(heads):
            expected = (slopes[h] * j).expand(t, t).masked_fill(future, float("-inf"))
            assert torch.equal(mask[bi * heads + h], expected), (bi, h)
    assert decoder._future_mask.shape == (b_max * heads, t, t)  # built once at the largest size, cached


def test_fork_buffer_follows_max_tokens():
    fork = row("alibi_lm_tiny", tgt=8, batch=2, max_tokens=40, original=True).model
    heads = fork.decoder.fork_heads
    assert fork.decoder.alibi.shape == (5 * heads, 1, 8)  # 40 // 8 sequences, as the fork sizes it


@pytest.mark.parametrize("bias_form", ["key_index", "relative"])
def test_fork_logits_equal_alibi_lm_logits_for_the_same_weights(bias_form):
    ours = row("alibi_lm", *ALIBI_SIZE, "--decoder-attention-heads", "4", "--alibi-bias-form", bias_form, tgt=16,
               batch=3)
    fork = row("alibi_lm", *ALIBI_SIZE, "--decoder-attention-heads", "4", "--alibi-bias-form", bias_form, tgt=16,
               batch=3, original=True)
    assert type(fork.model).__name__ == "TransformerLanguageModel" and fork.params == ours.params
    theirs = dict(fork.model.named_parameters())
    for name, p in ours.model.named_parameters():
        assert torch.equal(theirs[name], p), name  # the same seed and weights
    tokens = torch.randint(4, 40, (3, 16), generator=torch.Generator().manual_seed(0))
    ours.model.eval(), fork.model.eval()
    with torch.no_grad():
        assert_close(fork.model(tokens)[0], ours.model(tokens)[0], atol=1e-5, msg=f"fork vs alibi_lm ({bias_form})")


# the paper's WikiText-103 structure at test size (the README's ALiBi row at CPU size): pre-LN, adaptive input and
# adaptive softmax with tied weights and projections, the preset's dropouts
WIKI103_SMALL = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-input-dim", "32",
                 "--decoder-output-dim", "32", "--decoder-attention-heads", "4", "--decoder-ffn-embed-dim", "64",
                 "--adaptive-softmax-cutoff", "10,20"]


def test_fork_log_probs_equal_alibi_lm_at_the_wiki103_structure():
    ours = row("alibi_lm_wiki103", *WIKI103_SMALL, tgt=16, batch=3)
    fork = row("alibi_lm_wiki103", *WIKI103_SMALL, tgt=16, batch=3, original=True)
    assert ours.decoder.adaptive_softmax is not None and fork.decoder.adaptive_softmax is not None
    assert type(fork.decoder.embed_tokens).__name__ == "AdaptiveInput" and fork.params == ours.params
    theirs = dict(fork.model.named_parameters())
    for name, p in ours.model.named_parameters():
        assert torch.equal(theirs[name], p), name
    tokens = torch.randint(4, 40, (3, 16), generator=torch.Generator().manual_seed(0))
    ours.model.eval(), fork.model.eval()
    with torch.no_grad():
        got, want = (m.model.get_normalized_probs(m.model(tokens), log_probs=True) for m in (fork, ours))
    assert got.shape == (3, 16, 40)
    assert_close(got, want, atol=1e-5, msg="fork vs alibi_lm (wiki103 structure)")


# --------------------------------------------------------------------------------------------------------------------
# Transformer-XL: kimiyoung/transformer-xl mem_transformer.py
# --------------------------------------------------------------------------------------------------------------------

def xl_pair(extra: List[str], tgt: int, mem: int):
    """Our fairseq-built tiny model and the original reproduction carrying its weights, float64, eval mode."""
    from originals.transformer_xl import build_original

    ours = row("transformer_xl_tiny", "--decoder-layers", "2", "--decoder-embed-dim", "16",
               "--decoder-attention-heads", "2", "--decoder-ffn-embed-dim", "24", "--adaptive-softmax-cutoff",
               "10,20", "--attn-impl", "naive", "--mem-len", str(mem), *extra, tgt=tgt)
    model = ours.model.double().eval()
    with torch.no_grad():  # non-zero u, v and LayerNorm biases so every copied tensor matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, build_original(ours.cfg.model, model.decoder).double().eval(), ours.task


@pytest.mark.parametrize("extra,tgt,mem", [
    ([], 5, 3),  # memory shorter than a segment: cut to M
    ([], 4, 7),  # memory longer than a segment: mlen < mem_len on the second segment
    (["--decoder-normalize-before", "--clamp-len", "3"], 5, 4),
    (["--same-length"], 5, 4),  # original same_length convention
])
def test_transformer_xl_reproduction_equals_our_model_over_two_segments(extra, tgt, mem):
    """float64 throughout, except that the original rounds the attention scores to fp32 for the masked_fill
    (``attn_score.float().masked_fill(...).type_as(attn_score)``): about 1e-8 relative, hence atol 1e-8; a wrong
    shift, mask, weight copy or memory update is off by 1e-2 or more."""
    from originals.transformer_xl import original_nll_sum

    from fairseq_ext.criterions.lm_loss import nll_sum

    ours, original, task = xl_pair(extra, tgt, mem)
    assert sum(p.numel() for p in original.parameters()) == sum(p.numel() for p in ours.parameters())
    assert original.word_emb is ours.decoder.embed_tokens and original.crit is ours.decoder.adaptive_softmax
    tokens = torch.randint(4, 40, (2, 2 * tgt + 1), generator=torch.Generator().manual_seed(3))
    state, mems = None, original.init_mems(2)
    for seg in range(2):
        src = tokens[:, seg * tgt:(seg + 1) * tgt]
        tgt_tokens = tokens[:, seg * tgt + 1:(seg + 1) * tgt + 1]
        with torch.no_grad():
            features, state, _ = ours.decoder.forward_segment(src, state)  # (B, T, C)
            hidden, mems = original(src.t(), mems)  # (T, B, C)
            assert_close(hidden.transpose(0, 1), features, atol=1e-8, msg=f"features, segment {seg}")
            for layer, (ours_mem, their_mem) in enumerate(zip(state.layers, mems)):
                assert_close(their_mem.transpose(0, 1), ours_mem.hidden, atol=1e-8,
                             msg=f"memory {layer}, segment {seg}")
            ours_nll = nll_sum(ours, (features, {}), tgt_tokens, task.dictionary.pad())
            their_nll = original_nll_sum(original, hidden, tgt_tokens.t(), task.dictionary.pad())
            assert_close(their_nll, ours_nll, atol=1e-7, msg=f"NLL, segment {seg}")
        assert mems[0].size(0) == min(mem, (seg + 1) * tgt) and len(mems) == len(original.layers) + 1


def test_transformer_xl_original_rel_shift_is_ours():
    from originals.transformer_xl import OriginalRelPartialLearnableMultiHeadAttn

    from fairseq_ext.ops.xl_relative import rel_shift_pad

    x = torch.randn(5, 9, 2, 3, dtype=torch.float64)  # (T, S, B, H)
    ours = rel_shift_pad(x.permute(2, 3, 0, 1)).permute(2, 3, 0, 1)  # ours is (..., T, S)
    assert torch.equal(OriginalRelPartialLearnableMultiHeadAttn._rel_shift(x), ours)


# --------------------------------------------------------------------------------------------------------------------
# SHA-RNN: Smerity/sha-rnn model.py
# --------------------------------------------------------------------------------------------------------------------

def test_sha_rnn_reproduction_computes_our_logits():
    """The original's time-first stack with a copy of our weights gives sha_rnn_lm's logits over three consecutive
    segments with carried LSTM states and a memory trimmed to W - T, two attention blocks, random gates (eval mode,
    fp32)."""
    from originals.sha_rnn import OriginalSHARNN

    model = row("sha_rnn_lm", "--decoder-layers", "3", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
                "--attn-layers", "0,2", "--max-memory", "12", vocab=32).model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    original = OriginalSHARNN(model.decoder, 0.1, 0.1, 0.1).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            tokens = torch.randint(4, 32, (2, 8), generator=gen)
            ours, theirs = model(tokens)[0], original(tokens).transpose(0, 1)  # (B, T, V)
            assert ours.abs().max() > 0.1
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert [len(m) for m in original.mems if m is not None] == [12, 12]


# --------------------------------------------------------------------------------------------------------------------
# adaptive span: fairseq's examples/adaptive_span, the MIT-licensed port of facebookresearch/adaptive-span
# --------------------------------------------------------------------------------------------------------------------

SPAN_SIZE = ["--attn-span", "160", "--adapt-span-ramp", "8", "--no-span-renorm"]


@pytest.mark.parametrize("extra", [[], ["--adapt-span-layer"]])
def test_adaptive_span_port_computes_our_logits_over_carried_segments(extra):
    """With the renormalisation the port lacks switched off, fairseq's example holding our weights gives our logits
    over four consecutive segments with carried caches; spans that trim one layer's window by 64 keys and keep the
    other's whole, so trimming, cache sizing and the skew layout all count."""
    ours = row("adaptive_span_tiny", *SPAN_SIZE, *extra, tgt=16, batch=2, vocab=40)
    with torch.no_grad():
        for z, value in zip((layer.self_attn.span.z for layer in ours.model.decoder.layers), (0.2, 0.7)):
            z.copy_(torch.linspace(value, value / 2, z.numel()).reshape(z.shape))  # the max: value
        for p in ours.model.parameters():
            if p.dim() > 1:
                p.add_(0.05 * torch.randn_like(p))
    port = row("adaptive_span_tiny", *SPAN_SIZE, *extra, tgt=16, batch=2, vocab=40, original=True)
    from originals.adaptive_span import wrap_original

    loop, _ = wrap_original(ours.cfg.model, ours.model.decoder)  # the port built from these (changed) weights
    assert type(port.model).__name__ == "OriginalLM" and loop.batch_first
    assert sum(p.numel() for p in loop.parameters()) == sum(p.numel() for p in ours.model.parameters())
    windows = [layer.attn.attn.adaptive_span.get_trim_len() for layer in loop.seq.layers]
    assert windows == [64, 0], windows
    ours.model.eval(), loop.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for segment in range(4):
            tokens = torch.randint(4, 40, (2, 16), generator=gen)
            mine, theirs = ours.model(tokens)[0], loop(tokens)  # (B, T, V)
            assert mine.abs().max() > 0.1
            assert_close(theirs, mine, atol=1e-5, msg=f"segment {segment}")
    assert [c.size(1) for c in loop.caches] == [160, 160]  # min(L, L - trim + 64) over a stream longer than L


def test_adaptive_span_port_is_trained_with_batch_first_targets():
    port = row("adaptive_span_tiny", *SPAN_SIZE, tgt=8, batch=2, vocab=40, original=True)
    before = [p.detach().clone() for p in port.model.parameters()]
    port.train_step()
    assert any(not torch.equal(a, p) for a, p in zip(before, port.model.parameters()))
    sample = port.next_sample()
    net_output = port.model(**sample["net_input"])
    assert port.model.get_targets(sample, net_output).shape == net_output[0].shape[:2] == (2, 8)


@pytest.mark.parametrize("flag", [["--pers-mem-size", "4"], ["--fixed-span"], ["--no-adapt-span-cache"],
                                  ["--adaptive-softmax-cutoff", "20"]])
def test_adaptive_span_port_refuses_what_fairseqs_example_lacks(flag):
    with pytest.raises(ValueError, match=f"has no {flag[0]}"):
        row("adaptive_span_tiny", "--attn-span", "16", *flag, original=True)


def test_unreproduced_family_names_the_ones_that_are():
    with pytest.raises(ValueError, match="no reproduction of the original code for FastWeightLanguageModel"):
        row("fast_weight_tiny", original=True)



# --------------------------------------------------------------------------------------------------------------------
# the originals' loss: fairseq's own criteria, where ours is lm_loss over ops/cross_entropy
# --------------------------------------------------------------------------------------------------------------------

XL_SIZE = ["--decoder-layers", "2", "--decoder-embed-dim", "16", "--decoder-attention-heads", "2",
           "--decoder-ffn-embed-dim", "24", "--mem-len", "8", "--dropout", "0", "--attention-dropout", "0"]


@pytest.mark.parametrize("arch,flags,adaptive", [
    ("alibi_lm", [*ALIBI_SIZE, "--decoder-attention-heads", "4"], False),
    ("alibi_lm_wiki103", WIKI103_SMALL, True),
    ("transformer_xl_tiny", [*XL_SIZE, "--adaptive-softmax-cutoff", "10,20"], True),
    ("transformer_xl_tiny", XL_SIZE, True),  # one cluster: Transformer-XL's softmax is always the projected one
    ("sha_rnn_tiny", [], False),
    ("adaptive_span_tiny", SPAN_SIZE, False),
])
def test_originals_train_with_fairseqs_criteria_and_score_as_lm_loss(arch, flags, adaptive):
    """Each original row is trained by fairseq's adaptive_loss / cross_entropy (log-softmax and pick, as the
    originals compute it); on one sample at the same weights (eval mode) it scores what our lm_loss scores, up to
    the tokens fairseq's adaptive_loss drops (a tail target whose in-cluster id equals pad)."""
    from fairseq.criterions.adaptive_loss import AdaptiveLoss
    from fairseq.criterions.cross_entropy import CrossEntropyCriterion

    ours = row(arch, *flags, tgt=8, batch=2)
    original = row(arch, *flags, tgt=8, batch=2, original=True)
    assert type(original.trainer.criterion) is (AdaptiveLoss if adaptive else CrossEntropyCriterion)
    assert type(ours.trainer.criterion).__name__ == "LMLossCriterion"
    sample = ours.samples[0]
    pad = ours.task.dictionary.pad()
    if adaptive:  # no target at a cluster offset + pad, which fairseq's adaptive_loss would ignore
        sample["target"] = sample["target"].masked_fill(sample["target"].eq(10 + pad) | sample["target"].eq(20 + pad),
                                                        30)
    ours.model.eval(), original.model.eval()
    with torch.no_grad():
        want = ours.trainer.criterion(ours.model, sample)[0]
        got = original.trainer.criterion(original.model, sample)[0]
    assert_close(got.reshape(()).float(), want, atol=1e-4, rtol=1e-5)
    original.model.train()
    before = [p.detach().clone() for p in original.model.parameters()]
    original.train_step()
    assert any(not torch.equal(a, p) for a, p in zip(before, original.model.parameters()))
