"""``--compile-blocks`` (models/base/compile.py): every family's decoder blocks, torch.compile'd in place, compute the
eager model's outputs and gradients over consecutive segments with carried state (CPU, fp32), and keep its parameter
names, so checkpoints move between compiled and eager runs."""
from typing import List, Sequence

import pytest
import torch

import fairseq_ext  # noqa: F401  (registers the plugin's models)
from fairseq_ext.models.base.stateful_decoder import reset_stream_state
from tests.harness import assert_close, build_model, tiny_dictionary

FAMILIES = {  # a tiny preset of every family, with a memory / span shorter than two segments
    "alibi_lm_tiny": [],
    "transformer_xl_tiny": ["--mem-len", "6"],
    "adaptive_span_tiny": ["--attn-span", "16"],
    "fast_weight_tiny": ["--carry-over-fast-weight"],
    "sha_rnn_tiny": ["--max-memory", "12"],
    "composed_hybrid_delta_tiny": ["--mem-len", "6"],
}
T = 5  # tokens per segment (odd)


def build(arch: str, extra: Sequence[str]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, tiny_dictionary(30), [*FAMILIES[arch], "--tokens-per-sample", str(T), *extra],
                        task="streaming_lm")
    model.decoder.attach_streams("test")
    return model


def run(model: torch.nn.Module, tokens: torch.Tensor) -> List[torch.Tensor]:
    """Outputs of consecutive segments with the eval stream carried, and the gradients of their sum (eval mode: no
    dropout, so eager and compiled draw nothing)."""
    model.eval()
    reset_stream_state(model, "eval")
    model.zero_grad(set_to_none=True)
    outs = [model(seg)[0] for seg in tokens.split(T, dim=1)]  # each (B, T, V or C)
    sum(o.float().pow(2).mean() for o in outs).backward()
    return outs + [p.grad for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_compiled_blocks_equal_eager(arch):
    eager = build(arch, [])
    compiled = build(arch, ["--compile-blocks", "--compile-backend", "aot_eager"])
    assert all(layer._compiled_call_impl is not None for layer in compiled.decoder.layers)
    assert all(layer._compiled_call_impl is None for layer in eager.decoder.layers)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # same names: checkpoints interchange
    compiled.load_state_dict(eager.state_dict())
    tokens = torch.randint(4, 34, (2, 3 * T), generator=torch.Generator().manual_seed(1))
    expected, actual = run(eager, tokens), run(compiled, tokens)
    assert len(actual) == len(expected) > 3
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, atol=1e-5, rtol=1e-4, msg=f"{arch}: output / gradient {i}")


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_compiled_blocks_train_with_dropout(arch):
    """Training mode draws dropout masks inside the compiled blocks (compiled RNG differs from eager, so only the
    run itself and finite gradients over carried segments are checked; the mask's statistics are tested in
    tests/ops/dropout)."""
    model = build(arch, ["--compile-blocks", "--compile-backend", "aot_eager", "--dropout", "0.2"])
    model.train()
    reset_stream_state(model, "train")
    tokens = torch.randint(4, 34, (2, 2 * T), generator=torch.Generator().manual_seed(1))
    for seg in tokens.split(T, dim=1):
        model(seg)[0].float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
def test_inductor_compiled_blocks_equal_eager_on_cpu():
    """The default backend generates C++ kernels on CPU (one family: compilation takes a while on 2 cores)."""
    arch = "transformer_xl_tiny"
    eager, compiled = build(arch, []), build(arch, ["--compile-blocks"])
    compiled.load_state_dict(eager.state_dict())
    tokens = torch.randint(4, 34, (2, 2 * T), generator=torch.Generator().manual_seed(2))
    for i, (a, e) in enumerate(zip(run(compiled, tokens), run(eager, tokens))):
        assert_close(a, e, atol=1e-5, rtol=1e-4, msg=f"inductor: output / gradient {i}")


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="--compile-backend 'cudagraph': choose one of inductor, aot_eager"):
        build("alibi_lm_tiny", ["--compile-blocks", "--compile-backend", "cudagraph"])


def test_a_config_without_the_flag_compiles_nothing():
    """Checkpoints saved before the flag existed have no compile fields: they load eagerly."""
    from types import SimpleNamespace

    from fairseq_ext.models.base.compile import compile_blocks

    model = build("alibi_lm_tiny", [])
    assert compile_blocks(model.decoder, SimpleNamespace()) == 0
    assert all(layer._compiled_call_impl is None for layer in model.decoder.layers)
