"""Kernel choice shared by the op dispatchers: ``impl="auto"`` resolves to one named implementation and is logged
once per op; an unknown name is an error (never a silent fallback)."""
from __future__ import annotations

import logging
from typing import Sequence

logger = logging.getLogger("fairseq_ext.ops")


class ImplResolver:
    """``resolver(impl) -> concrete impl`` for one op: ``auto`` maps to ``auto_impl`` (logged with ``reason``
    the first time), explicit names are validated against ``impls``."""

    def __init__(self, op: str, impls: Sequence[str], auto_impl: str, reason: str, flag: str = "attn_impl") -> None:
        if "auto" not in impls or auto_impl not in impls:
            raise ValueError(f"{op}: impls {tuple(impls)} must contain 'auto' and {auto_impl!r}")
        self.op = op
        self.impls = tuple(impls)
        self.auto_impl = auto_impl
        self.reason = reason
        self.flag = flag
        self._logged = False

    def __call__(self, impl: str) -> str:
        if impl not in self.impls:
            raise ValueError(f"unknown {self.flag} {impl!r}; choose one of {self.impls}")
        if impl != "auto":
            return impl
        if not self._logged:
            logger.info("%s: %s=auto -> %s (%s)", self.op, self.flag, self.auto_impl, self.reason)
            self._logged = True
        return self.auto_impl
