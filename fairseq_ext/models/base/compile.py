"""``--compile-blocks``: ``torch.compile`` every decoder block in place, the decoder loop and output layer eager.

Every model's decoder is a ``CoreDecoder`` over pure blocks ``forward(x, state, context) -> (y, state)``
(models/base/core_decoder.py), so the block is the unit that compiles well: one graph per layer type, the carried
state passed in and out as tensors, no Python state kept on the module. ``nn.Module.compile`` compiles in place, so
parameter names, ``state_dict`` and checkpoints are the same with or without the flag (a checkpoint trained
compiled evaluates eagerly, and the other way round). Shapes that change between calls (the first segment has no
memory; incremental decoding) recompile, then ``torch.compile`` marks the changing dimensions dynamic.

``--compile-backend`` picks ``torch.compile``'s backend: ``inductor`` (generated kernels: C++ on CPU, Triton on
CUDA), or ``aot_eager`` (traced graphs run by eager kernels: checks tracing without code generation).
"""
import logging
from dataclasses import dataclass, field
from typing import Any

from fairseq.dataclass import FairseqDataclass
from torch import nn

logger = logging.getLogger(__name__)
BACKENDS = ("inductor", "aot_eager")


@dataclass
class CompileOptions(FairseqDataclass):
    """The compile flags every model config of this package shares (no ``from __future__ import annotations`` in
    this module: fairseq's argparse builder needs real types on dataclass fields)."""

    compile_blocks: bool = field(default=False, metadata={
        "help": "torch.compile every decoder block in place (same parameters and checkpoints; the decoder loop, "
                "output layer and loss stay eager)"})
    compile_backend: str = field(default="inductor", metadata={
        "help": f"torch.compile backend of --compile-blocks: {', '.join(BACKENDS)}"})


def compile_blocks(decoder: nn.Module, cfg: Any) -> int:
    """Compile ``decoder.layers`` in place when ``cfg.compile_blocks`` is set (configs saved before the flag existed
    have neither field: nothing is compiled); returns the number of blocks compiled."""
    if not getattr(cfg, "compile_blocks", False):
        return 0
    backend = getattr(cfg, "compile_backend", "inductor")
    if backend not in BACKENDS:
        raise ValueError(f"--compile-backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    for layer in decoder.layers:
        layer.compile(backend=backend)
    logger.info("compiled %d decoder blocks with torch.compile(backend=%r)", len(decoder.layers), backend)
    return len(decoder.layers)
