"""ops/eager.py: ``eager_under_compile`` is ``torch.compiler.disable`` without importing Dynamo at import time: a
``--user-dir fairseq_ext`` process that compiles nothing never loads ``torch._dynamo``; under ``torch.compile`` the
function still runs eagerly (a graph break) with the same outputs and gradients."""
import subprocess
import sys

import pytest
import torch

from fairseq_ext.ops.eager import eager_under_compile
from tests.harness import REPO_ROOT

TRACED = []


@eager_under_compile
def cumsum_twice(x: torch.Tensor, *, scale: float) -> torch.Tensor:
    TRACED.append(torch.compiler.is_compiling())  # False when it runs eagerly, also inside a compiled caller
    return x.flatten().cumsum(0).view(x.shape) * scale


def caller(x: torch.Tensor) -> torch.Tensor:
    return cumsum_twice(x.sin(), scale=2.0).cos()


def test_importing_the_plugin_does_not_import_dynamo():
    probe = "import sys, fairseq_ext, fairseq_ext.ops.fast_weights; print('torch._dynamo' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_runs_eagerly_inside_torch_compile_with_the_same_values_and_gradients():
    torch._dynamo.reset()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    expected = caller(x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    TRACED.clear()
    compiled = torch.compile(caller, backend="aot_eager")
    for _ in range(2):  # the second call takes the disabled function built by the first
        out = compiled(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(grad, expected_grad)
    assert TRACED == [False, False]  # never traced: run eagerly both times


def test_calls_the_function_directly_when_nothing_compiles():
    x = torch.randn(4)
    assert cumsum_twice.__wrapped__ is not None and cumsum_twice.__name__ == "cumsum_twice"
    torch.testing.assert_close(cumsum_twice(x, scale=3.0), x.cumsum(0) * 3.0)
    with pytest.raises(TypeError, match="scal"):  # a misspelt keyword reaches the function itself
        cumsum_twice(x, scal=3.0)
