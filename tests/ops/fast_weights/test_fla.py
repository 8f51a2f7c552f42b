"""ops/fast_weights/fla.py: flash-linear-attention's conventions (layout, state orientation, scale, beta, initial and
final state, no in-kernel key normalisation) match this package's delta rule. On CPU the adapter drives fla's own
reference recurrence (``fla/ops/delta_rule/naive.py`` of the installed fla-core, given chunk_delta_rule's
signature by a shim that only moves layouts and the scale) and is compared with ``delta_rule_recurrent``: outputs,
final states and the gradients of q, k, v, beta and the initial state. The Triton kernel itself needs CUDA
(tests/gpu/test_bf16_fast_paths.py)."""
import importlib.util
import os

import pytest
import torch

from fairseq_ext.ops.fast_weights import delta_rule_recurrent, fast_weight_attention
from fairseq_ext.ops.fast_weights.fla import delta_rule_fla, load_chunk_delta_rule
from tests.harness import assert_close
from tests.ops.fast_weights.test_fast_weight_ops import inputs


def fla_reference_recurrence():
    """fla-core's ``delta_rule_recurrence`` (pure PyTorch), loaded from its file: ``import fla.ops`` needs Triton."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla-core is not installed (scripts/install.sh installs it)")
    path = os.path.join(spec.submodule_search_locations[0], "ops", "delta_rule", "naive.py")
    module_spec = importlib.util.spec_from_file_location("fla_delta_rule_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.delta_rule_recurrence


def as_chunk_kernel(recurrence):
    """fla's reference recurrence behind ``chunk_delta_rule``'s signature: (B, T, H, D) in and out, an explicit scale
    (the reference always scales q by K^-0.5)."""
    def kernel(q, k, v, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel):
        assert not use_qk_l2norm_in_kernel
        d_k = q.size(-1)
        heads_first = [x.transpose(1, 2) for x in (q * (scale * d_k ** 0.5), k, v, beta)]  # (B, H, T, ...)
        out, final = recurrence(*heads_first, initial_state=initial_state, output_final_state=output_final_state)
        return out.transpose(1, 2), final  # (B, T, H, D_v)
    return kernel


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("t,dk,dv", [(13, 5, 4), (1, 3, 7)])
def test_fla_conventions_equal_our_recurrence(with_state, t, dk, dv):
    kernel = as_chunk_kernel(fla_reference_recurrence())
    q, k, v, beta, s0 = (x.float() for x in inputs(t=t, dk=dk, dv=dv, seed=3))
    s0 = s0 if with_state else None
    leaves = [x.requires_grad_() for x in (q, k, v, beta, *([s0] if with_state else []))]
    scale = 0.37  # neither 1 nor fla's default 1/sqrt(D_k): the adapter must pass ours
    ours, ours_state = delta_rule_recurrent(q, k, v, beta, s0, scale)
    theirs, their_state = delta_rule_fla(q, k, v, beta, s0, scale, kernel=kernel, input_dtype=torch.float32)
    assert theirs.shape == ours.shape and their_state.shape == ours_state.shape == (2, 3, dk, dv)
    assert_close(theirs, ours, atol=1e-5, rtol=1e-5, msg="output")
    assert_close(their_state, ours_state, atol=1e-5, rtol=1e-5, msg="final state")
    g_out, g_state = torch.randn_like(ours), torch.randn_like(ours_state)
    expected = torch.autograd.grad((ours * g_out).sum() + (ours_state * g_state).sum(), leaves)
    actual = torch.autograd.grad((theirs * g_out).sum() + (their_state * g_state).sum(), leaves)
    for name, a, e in zip(["q", "k", "v", "beta", "initial state"], actual, expected):
        assert_close(a, e, atol=1e-4, rtol=1e-4, msg=f"gradient of {name}")


def test_bfloat16_inputs_keep_a_float32_state():
    """The default input dtype is bfloat16 (fla's kernel refuses float32); the state comes back float32 and the
    output in q's dtype, within bfloat16's rounding of the inputs."""
    kernel = as_chunk_kernel(fla_reference_recurrence())
    q, k, v, beta, s0 = (x.float() for x in inputs(t=9, seed=4))
    out, state = delta_rule_fla(q, k, v, beta, s0, 0.5, kernel=kernel)
    ref, ref_state = delta_rule_recurrent(q, k, v, beta, s0, 0.5)
    assert out.dtype == torch.float32 and state.dtype == torch.float32
    assert_close(out, ref, atol=0.05, rtol=0.05, msg="bf16 output")
    assert_close(state, ref_state, atol=0.05, rtol=0.05, msg="bf16 state")


def test_fla_impl_refuses_what_it_cannot_run():
    q, k, v, beta, _ = inputs(t=4)
    with pytest.raises(RuntimeError, match="Triton kernel on CUDA; these tensors are on cpu .*--attn-impl chunked"):
        fast_weight_attention(q, k, v, beta, rule="delta", normalize="none", scale=1.0, impl="fla")
    with pytest.raises(ValueError, match="the 'sum' rule has no fla path"):
        fast_weight_attention(q, k, v, rule="sum", normalize="none", scale=1.0, impl="fla")


def test_missing_triton_or_fla_is_a_clear_error():
    try:
        import fla.ops.delta_rule  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("fla's Triton kernel imports on this machine")
    with pytest.raises(RuntimeError, match="needs CUDA, Triton and `pip install fla-core`. Use --attn-impl chunked"):
        load_chunk_delta_rule()


def test_the_model_flag_reaches_the_op():
    """``--attn-impl fla`` is a choice of the fast-weight model; on CPU its first forward says what to use."""
    from tests.harness import build_model, tiny_dictionary

    model = build_model("fast_weight_tiny", tiny_dictionary(30), ["--attn-impl", "fla"])
    with pytest.raises(RuntimeError, match="use --attn-impl chunked"):
        model(torch.randint(4, 34, (2, 5)))
