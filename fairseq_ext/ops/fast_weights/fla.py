"""Optional kernel of ``impl="fla"``: flash-linear-attention's Triton chunked delta rule (Yang et al. 2024,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length", arXiv 2406.06484; package
``fla-core``, ``fla.ops.delta_rule.chunk_delta_rule``), used only when it imports (it needs Triton and CUDA).

fla's conventions, against this package's delta rule (spec fast_weights.md §1.5, ``recurrent.py``):

* update and output: fla's S_t = S_{t-1} + k_t (beta_t (v_t - S_{t-1}^T k_t))^T and o_t = scale · q_t^T S_t, with S of
  shape (N, H, K, V) -- our S (B, H, D_k, D_v) and our update, element for element (no transpose of the state);
* scale: fla's default is 1/sqrt(K) of the keys' width; ours is 1/sqrt(d) of the head width whatever the feature
  map's D_phi, so it is always passed explicitly;
* key normalisation: none inside the kernel (``use_qk_l2norm_in_kernel=False``): the caller's keys are already
  sum-normalised phi(k) (fla's own layers L2-normalise instead, a different model);
* beta: per token and head, (B, T, H), as ours (B, H, T) transposed;
* layout: fla takes (B, T, H, D); ours is (B, H, T, D);
* precision: fla refuses float32 inputs, so q, k, v and beta enter as bfloat16 (also under ``--fp16``: bfloat16
  keeps float32's range); the initial and final states stay float32, and the output is returned in q's dtype.

``delta_rule_fla`` takes the kernel as an argument so that the conventions can be tested on CPU against fla's own
reference recurrence (``fla/ops/delta_rule/naive.py``, tests/ops/fast_weights/test_fla.py); the CUDA kernel itself
is compared with the recurrence in tests/gpu/test_bf16_fast_paths.py.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

INPUT_DTYPE = torch.bfloat16
Kernel = Callable[..., Tuple[Tensor, Optional[Tensor]]]


def load_chunk_delta_rule() -> Kernel:
    """fla's ``chunk_delta_rule``, or a clear error saying what is missing and what to use instead."""
    try:
        from fla.ops.delta_rule import chunk_delta_rule
    except ImportError as err:  # fla-core absent, or present without Triton (CPU-only machines)
        raise RuntimeError(f"attn_impl 'fla' runs flash-linear-attention's Triton kernel, which does not import here "
                           f"({err}); it needs CUDA, Triton and `pip install fla-core`. Use --attn-impl chunked "
                           f"(the same maths in PyTorch)") from err
    return chunk_delta_rule


def check_fla_inputs(q: Tensor, rule: str) -> None:
    """``impl="fla"`` is the delta rule on CUDA only."""
    if rule != "delta":
        raise ValueError(f"attn_impl 'fla' is flash-linear-attention's delta-rule kernel; the {rule!r} rule has no "
                         f"fla path here (use --attn-impl chunked)")
    if q.device.type != "cuda":
        raise RuntimeError(f"attn_impl 'fla' runs a Triton kernel on CUDA; these tensors are on {q.device.type} "
                           f"(use --attn-impl chunked)")


def delta_rule_fla(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, weight: Optional[Tensor], scale: float,
                   kernel: Optional[Kernel] = None,
                   input_dtype: torch.dtype = INPUT_DTYPE) -> Tuple[Tensor, Tensor]:
    """q, k (B, H, T, D_k); v (B, H, T, D_v); beta (B, H, T); weight (B, H, D_k, D_v) or None -> (o (B, H, T, D_v)
    in q's dtype, S after the last token (B, H, D_k, D_v) float32). ``kernel`` has ``chunk_delta_rule``'s signature
    (default: fla's, imported now); ``input_dtype``: what q, k, v, beta are cast to (fla's kernel: bfloat16)."""
    kernel = kernel if kernel is not None else load_chunk_delta_rule()

    def fla_layout(x: Tensor) -> Tensor:
        return x.transpose(1, 2).to(input_dtype).contiguous()  # (B, H, T, ...) -> (B, T, H, ...)

    initial = weight.float() if weight is not None else None  # None: zero fast weights
    out, final = kernel(fla_layout(q), fla_layout(k), fla_layout(v), fla_layout(beta), scale=scale,
                        initial_state=initial, output_final_state=True, use_qk_l2norm_in_kernel=False)
    return out.transpose(1, 2).to(q.dtype), final.float()  # (B, T, H, D_v) -> (B, H, T, D_v)
