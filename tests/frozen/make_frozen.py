"""Write the frozen checkpoints: tiny models of every preset family and converted tiny originals, with log-probs.

Run once with the code *before* a refactor (from a checkout of that commit, so that its ``fairseq_ext`` and test
helpers are imported):

    python -m tests.frozen.make_frozen tests/frozen/data

Each case is a fairseq checkpoint (``<case>/model.pt`` + ``dict.txt``, written as the converters write theirs) with
every float parameter perturbed away from its initialisation, and ``<case>/expected.pt``: the tokens (B, N), the
segment length and the log-probabilities (B, N, V) the code of that commit gave, state carried across segments
(``model(segment)`` on an eval-mode decoder attached to the stream; ALiBi: one pass). ``test_frozen.py`` loads them
through fairseq's loader with today's code and compares.
"""
import argparse
import os
import sys
import tempfile
from typing import Any, Callable, Dict, List, Tuple

import torch

BATCH, SEGMENT, SEGMENTS = 2, 6, 3
WORDS = 40  # native cases: 4 specials + w0..w39

# native cases: arch -> config fields (tiny sizes; every family's mechanisms)
NATIVE: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "alibi": ("alibi_lm_tiny", {"decoder_layers": 2, "decoder_embed_dim": 16, "decoder_ffn_embed_dim": 24,
                                "decoder_attention_heads": 2, "dropout": 0.0}),
    "transformer_xl": ("transformer_xl_tiny", {"decoder_embed_dim": 16, "decoder_attention_heads": 2,
                                               "decoder_ffn_embed_dim": 24, "mem_len": 5, "dropout": 0.0,
                                               "attention_dropout": 0.0}),
    "transformer_xl_adaptive": ("transformer_xl_tiny", {
        "decoder_embed_dim": 16, "decoder_input_dim": 8, "decoder_attention_heads": 2, "decoder_ffn_embed_dim": 24,
        "mem_len": 7, "adaptive_softmax_cutoff": "12,24", "adaptive_softmax_factor": 2, "dropout": 0.0,
        "attention_dropout": 0.0, "same_length": True, "untie_r": True, "clamp_len": 5}),
    "adaptive_span": ("adaptive_span_tiny", {"decoder_embed_dim": 16, "decoder_attention_heads": 2,
                                             "decoder_ffn_embed_dim": 24, "attn_span": 9, "adapt_span_ramp": 3,
                                             "dropout": 0.0}),
    "all_attention": ("adaptive_span_tiny", {"decoder_embed_dim": 16, "decoder_attention_heads": 2,
                                             "decoder_ffn_embed_dim": 24, "attn_span": 9, "adapt_span_ramp": 3,
                                             "pers_mem_size": 5, "dropout": 0.0}),
    "adaptive_span_adaptive_io": ("adaptive_span_tiny", {
        "decoder_embed_dim": 16, "decoder_attention_heads": 2, "decoder_ffn_embed_dim": 24, "attn_span": 9,
        "adapt_span_ramp": 3, "adaptive_softmax_cutoff": "14", "adaptive_softmax_factor": 2, "dropout": 0.0}),
    "fast_weight_delta": ("fast_weight_tiny", {"decoder_embed_dim": 16, "decoder_attention_heads": 2,
                                               "decoder_attention_head_dim": 8, "decoder_ffn_embed_dim": 24,
                                               "dropout": 0.0}),
    "fast_weight_performer_sum": ("fast_weight_tiny", {
        "decoder_embed_dim": 16, "decoder_attention_heads": 2, "decoder_attention_head_dim": 8,
        "decoder_ffn_embed_dim": 24, "attn_type": "performer", "update_rule": "sum", "performer_proj_dim": 3,
        "dropout": 0.0}),
    "fast_weight_dpfp_carry": ("fast_weight_tiny", {
        "decoder_embed_dim": 16, "decoder_attention_heads": 2, "decoder_attention_head_dim": 8,
        "decoder_ffn_embed_dim": 24, "attn_type": "dpfp", "update_rule": "delta", "carry_over_fast_weight": True,
        "no_pos": True, "adaptive_softmax_cutoff": "20", "dropout": 0.0}),
    "fast_weight_softmax": ("fast_weight_tiny", {"decoder_embed_dim": 16, "decoder_attention_heads": 2,
                                                 "decoder_attention_head_dim": 8, "decoder_ffn_embed_dim": 24,
                                                 "attn_type": "softmax", "dropout": 0.0}),
    "sha_rnn": ("sha_rnn_tiny", {"decoder_embed_dim": 16, "decoder_ffn_embed_dim": 32, "max_memory": 10,
                                 "dropout": 0.0, "dropouti": 0.0, "dropouth": 0.0}),
    "sha_rnn_one_attention": ("sha_rnn_tiny", {"decoder_embed_dim": 16, "decoder_ffn_embed_dim": 48,
                                               "attn_layers": "1", "max_memory": 8, "dropout": 0.0, "dropouti": 0.0,
                                               "dropouth": 0.0}),
}


def _dictionary(symbols: List[str]):
    from fairseq_ext.convert.output import fairseq_dictionary

    return fairseq_dictionary(symbols)


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every float parameter off its initialisation (zero biases and gates included); spans stay in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
        if "span" in name:
            p.clamp_(0.05, 0.95)


def native_case(name: str, arch: str, fields: Dict[str, Any], out: str, seed: int) -> None:
    from fairseq_ext.convert.output import (build_registered_model, fairseq_cfg, fairseq_checkpoint,
                                            save_conversion)
    from omegaconf import OmegaConf

    symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(WORDS)]
    cfg = fairseq_cfg(fields, out, arch, SEGMENT)
    torch.manual_seed(seed)
    model = build_registered_model(OmegaConf.create(cfg["model"]), _dictionary(symbols))
    _perturb(model, seed)
    weights = {k: v for k, v in model.state_dict().items()}
    save_conversion(out, fairseq_checkpoint(cfg, weights, symbols, "frozen", {"case": name}), symbols)


def converted_cases() -> Dict[str, Callable[[str], None]]:
    """Tiny originals converted by that commit's converters (the tests' synthetic checkpoints)."""

    def sha_rnn(out: str) -> None:
        from fairseq_ext.convert.output import save_conversion
        from fairseq_ext.convert.sha_rnn import convert_sha_rnn, read_source
        from tests.convert.test_sha_rnn_converter import VOCAB, synthetic_state

        conv = convert_sha_rnn(read_source(synthetic_state([0], False)), VOCAB, data=out, max_memory=8,
                               tokens_per_sample=SEGMENT)
        save_conversion(out, conv.checkpoint, conv.mapping.symbols)

    def transformer_xl(out: str) -> None:
        from dataclasses import replace

        from fairseq_ext.convert.output import save_conversion
        from fairseq_ext.convert.transformer_xl import SourceCheckpoint, convert_transformer_xl
        from tests.convert.test_transformer_xl_converter import BASE, synthetic_state, word_vocab

        conv = convert_transformer_xl(SourceCheckpoint("original", replace(BASE), synthetic_state(BASE, "original")),
                                      word_vocab(), data=out, tokens_per_sample=SEGMENT)
        save_conversion(out, conv.checkpoint, conv.mapping.symbols)

    def adaptive_span(out: str) -> None:
        from fairseq_ext.convert.adaptive_span import convert_adaptive_span, read_source
        from fairseq_ext.convert.output import save_conversion
        from tests.convert.test_adaptive_span_converter import VOCAB, synthetic_checkpoint

        conv = convert_adaptive_span(read_source(synthetic_checkpoint(pers_mem=3)), VOCAB, data=out, ramp=8,
                                     tokens_per_sample=SEGMENT)
        save_conversion(out, conv.checkpoint, conv.mapping.symbols)

    def fast_weight(out: str) -> None:
        from fairseq_ext.convert.output import save_conversion
        from fairseq_ext.convert.fast_weight import LmtoolConfig, LmtoolSource, convert_fast_weight
        from tests.convert.test_fast_weight_converter import (C, CUTOFFS, D, H, INNER, LAYERS, V, Case,
                                                              synthetic_state, word_vocab)

        cfg = LmtoolConfig(attn_type=24, n_token=V, n_layer=LAYERS, n_head=H, d_model=C, d_head=D, d_inner=INNER,
                           d_embed=C, cutoffs=list(CUTOFFS), tgt_len=SEGMENT, carry_over_fast_weight=True,
                           no_pos=True)
        conv = convert_fast_weight(LmtoolSource(cfg, synthetic_state(Case(24, no_pos=True))), word_vocab(),
                                   data=out, tokens_per_sample=SEGMENT)
        save_conversion(out, conv.checkpoint, conv.mapping.symbols)

    return {"converted_sha_rnn": sha_rnn, "converted_transformer_xl": transformer_xl,
            "converted_adaptive_span": adaptive_span, "converted_fast_weight": fast_weight}


def stream_log_probs(model: torch.nn.Module, tokens: torch.Tensor, segment: int) -> torch.Tensor:
    """Log-probs (B, N, V) of tokens (B, N): stateful models over consecutive segments with state carried, full-context
    models (no state, no segment boundaries: ALiBi) in one pass."""
    model.eval()
    decoder = model.decoder
    with torch.no_grad():
        if not hasattr(decoder, "attach_streams") or not (decoder.carries_state or decoder.cuts_at_segments):
            return model.get_normalized_probs(model(tokens), log_probs=True).float()
        decoder.attach_streams("frozen checkpoints")
        decoder.reset_state()
        parts = [model.get_normalized_probs(model(seg), log_probs=True).float()
                 for seg in tokens.split(segment, dim=1)]
        decoder.reset_state()
        return torch.cat(parts, dim=1)


def load(case_dir: str) -> torch.nn.Module:
    """The case's model through fairseq's own loader (upgrade hooks included)."""
    import fairseq_ext  # noqa: F401  (registers the models and tasks)
    from fairseq import checkpoint_utils

    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([os.path.join(case_dir, "model.pt")],
                                                                 arg_overrides={"data": case_dir})
    return models[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output directory (one sub-directory per case)")
    args = parser.parse_args(argv)
    import fairseq_ext  # noqa: F401  (registers the models)

    makers: Dict[str, Callable[[str], None]] = {
        name: (lambda out, n=name, a=arch, f=fields, s=i: native_case(n, a, f, out, s))
        for i, (name, (arch, fields)) in enumerate(NATIVE.items())}
    makers.update(converted_cases())
    for i, (name, make) in enumerate(makers.items()):
        case_dir = os.path.join(args.out, name)
        os.makedirs(case_dir, exist_ok=True)
        with tempfile.TemporaryDirectory():
            make(case_dir)
        model = load(case_dir).float()
        g = torch.Generator().manual_seed(100 + i)
        vocab = len(model.decoder.dictionary)
        tokens = torch.randint(4, vocab, (BATCH, SEGMENT * SEGMENTS), generator=g)
        log_probs = stream_log_probs(model, tokens, SEGMENT)
        torch.save({"tokens": tokens, "segment": SEGMENT, "log_probs": log_probs},
                   os.path.join(case_dir, "expected.pt"))
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, log-probs {tuple(log_probs.shape)}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
