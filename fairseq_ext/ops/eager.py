"""``eager_under_compile``: ``torch.compiler.disable`` built on first use under ``torch.compile``.

``torch.compiler.disable`` imports ``torch._dynamo`` when it is applied (about 1 s on a 2-core CPU). As a decorator
at import it made every ``--user-dir fairseq_ext`` process pay that, ``fairseq-eval-lm`` and
``fairseq-interactive`` included, which never compile. This decorator calls the function directly while nothing is
compiling; inside a ``torch.compile`` trace it builds ``torch.compiler.disable(fn)`` once (Dynamo is imported by
then) and calls that, so the function runs eagerly there, a graph break, exactly as with the decorator.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def eager_under_compile(fn: F) -> F:
    disabled: Optional[Callable] = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # forwards fn's own signature: a wrong keyword fails in fn
        nonlocal disabled
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
