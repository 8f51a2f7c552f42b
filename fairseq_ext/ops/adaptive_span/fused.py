"""Adaptive-span attention for CPU training: the banded skew layout of blocked.py computed head group by head group,
with a hand-written backward (Sukhbaatar et al. 2019, arXiv 1905.07799, Sec. 2.2, Eq. 1-5; spec adaptive_span.md
§1.3).

Per head g and block of R query rows a .. a + R - 1 (keys a .. a + W - 1, W = R + L), as blocked.py:

    s   = unskew(q_s K_w^T) + q_s P                      (R, L) window logits, q_s = q / sqrt(D)
    p   = softmax(s)                                     (R, L)
    a   = p m / (sum_j p m + eps)                        span mask m (K or 1, L), renormalised (Eq. 5)
    o   = skew(a * drop) V_w                             (R, D)

and the backward by hand, with u = p m, S = sum_j u + eps:

    da  = unskew(do V_w^T) * drop                        (R, L)
    du  = (da - sum_j da a) / S                          (renormalisation; du = da without it)
    dm += sum_i du p                                     (the spans' gradient)
    ds  = p (du m - sum_j du m p)                        (softmax)
    dq_s = skew(ds) K_w + ds P^T ;  dK_w += skew(ds)^T q_s ;  dV_w += skew(a * drop)^T do ;  dP += q_s^T ds

The skew and blocked kernels run each elementwise step, and autograd its backward, over the whole (B, H, M, L)
tensors, each several megabytes, so every step streams them from memory once more; here all steps of one head group
run on (c, R, W) tiles of about ``TILE_BYTES`` (the size of a core's L2 cache), and only p and the row sums (and the
dropout mask) are kept for the backward. On CPU at B 8, H 4, M 256, D 64 (2 threads, forward + backward, the
model's strided q, k, v, best of 5) this took the op from 60.1 to 43.8 ms at L 320, 88.2 to 69.9 ms at L 576 and
320.1 to 138.0 ms at L 1024 against ``skew``; at L 64 it matched ``blocked`` (16.2 vs 15.8 ms, skew 22.7).

The dropout mask is drawn for the whole (B, H, M, L) tensor before the loop, as ``dropout`` draws it in the skew
path (``draw_float_mask`` on CPU, ``F.dropout``'s otherwise), so both paths drop the same weights for one seed
(tested on CPU).
Float32 / float64 only; persistent memory (All-attention) runs on ``skew`` / ``blocked``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dropout import FLOAT_MASK_DTYPES, draw_float_mask, quantized_drop_count, uses_packed_bits
from .blocked import block_rows

TILE_BYTES = 1 << 20  # (c, R, W) tile per head group: 1 MiB, a core's L2 here (c 4 at L 1024, 32 at L 64 was best)
DTYPES = (torch.float32, torch.float64)


def group_size(heads: int, rows: int, width: int, itemsize: int, tile_bytes: Optional[int] = None) -> int:
    """Heads per group: as many (R, W) tiles as fit ``tile_bytes`` (default ``TILE_BYTES``), at least 1, at most
    ``heads``."""
    budget = TILE_BYTES if tile_bytes is None else tile_bytes
    return max(1, min(heads, budget // max(1, rows * width * itemsize)))


def _window(x: Tensor, span: int) -> Tensor:
    """x (c, R, W) contiguous -> (c, R, span) view, out[g, i, j] = x[g, i, i + j] (skew.py's ``unskew``)."""
    c, r, w = x.shape
    return x.as_strided((c, r, span), (r * w, w + 1, 1), x.storage_offset())


def _dropout_mask(shape: Tuple[int, ...], p: float, like: Tensor) -> Optional[Tensor]:
    """The inverted-dropout multiplier of ``shape`` (None: nothing dropped), drawn as ``dropout`` would draw it."""
    if p <= 0.0:
        return None
    if uses_packed_bits(like, p, True) and like.dtype in FLOAT_MASK_DTYPES:
        drops = quantized_drop_count(p)
        return None if drops == 0 else draw_float_mask(shape, drops, like.device, like.dtype)
    return F.dropout(like.new_ones(shape), p, True)


class _FusedSpanAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, key_pe: Tensor, span_mask: Optional[Tensor],
                drop: Optional[Tensor], renorm: bool, eps: float, rows: int) -> Tensor:
        b, h, m, d = q.shape
        s, span = k.size(2), key_pe.size(-1)  # L + M, L
        n, width = b * h, rows + span  # heads, keys per block
        qs = (q * (1.0 / math.sqrt(d))).reshape(n, m, d)  # (G, M, D) scaled before the products
        k3, v3 = k.reshape(n, s, d), v.reshape(n, s, d)  # (G, L + M, D)
        pe = key_pe.to(q.dtype)  # (D, L) shared or (H, D, L)
        mask = None if span_mask is None else span_mask.to(q.dtype)[..., None, :]  # (K or 1, 1, L)
        keep = any(ctx.needs_input_grad[:5])  # evaluation and no_grad store nothing for a backward
        renorm = renorm and mask is not None
        probs = q.new_empty(n, m, span) if keep else None  # p, saved
        sums = q.new_empty(n, m, 1) if keep and renorm else None  # S, saved
        out = q.new_empty(n, m, d)  # (G, M, D)
        group = group_size(n, rows, width, q.element_size())
        tile = q.new_zeros(group, rows, width)  # skew(a) tiles: only the window diagonal band is ever written
        for g0 in range(0, n, group):
            g = slice(g0, min(n, g0 + group))
            heads = torch.arange(g.start, g.stop, device=q.device) % h  # (c,) head of each row of the group
            qg = qs[g]  # (c, M, D)
            logits = torch.matmul(qg, pe) if pe.dim() == 2 else torch.bmm(qg, pe[heads])  # (c, M, L) position part
            mg = None if mask is None else mask[heads] if mask.size(0) > 1 else mask[0]  # (c, 1, L) or (1, L)
            t = tile[:qg.size(0)]
            for a0 in range(0, m, rows):
                r, w = slice(a0, a0 + rows), slice(a0, a0 + width)
                scores = logits[:, r]  # (c, R, L) view
                scores += _window(torch.bmm(qg[:, r], k3[g, w].transpose(1, 2)), span)  # + content (c, R, L)
                p = torch.softmax(scores, dim=-1)  # (c, R, L)
                if probs is not None:
                    probs[g, r] = p
                a = p
                if mg is not None:
                    a = p * mg
                    if renorm:
                        total = a.sum(-1, keepdim=True).add_(eps)  # (c, R, 1)
                        if sums is not None:
                            sums[g, r] = total
                        a.div_(total)
                if drop is not None:
                    a = a * drop[g, r]
                _window(t, span).copy_(a)
                torch.bmm(t, v3[g, w], out=out[g, r])  # (c, R, D)
        ctx.save_for_backward(qs, k3, v3, pe, mask, drop, probs, sums)
        ctx.shape, ctx.rows = (b, h, m, d), rows
        return out.view(b, h, m, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        qs, k3, v3, pe, mask, drop, probs, sums = ctx.saved_tensors
        (b, h, m, d), rows = ctx.shape, ctx.rows
        n, span = b * h, probs.size(-1)
        width = rows + span
        grad = grad.reshape(n, m, d)  # (G, M, D)
        dqs, dk, dv = torch.empty_like(qs), torch.zeros_like(k3), torch.zeros_like(v3)
        dpe = torch.zeros_like(pe)
        dmask = torch.zeros_like(mask[:, 0]) if mask is not None and ctx.needs_input_grad[4] else None  # (K|1, L)
        group = group_size(n, rows, width, qs.element_size())
        tile = qs.new_zeros(group, rows, width)
        for g0 in range(0, n, group):
            g = slice(g0, min(n, g0 + group))
            heads = torch.arange(g.start, g.stop, device=qs.device) % h
            qg, c = qs[g], g.stop - g.start  # (c, M, D)
            mg = None if mask is None else mask[heads] if mask.size(0) > 1 else mask[0]
            dlogits = qs.new_empty(c, m, span)  # ds of the group, for the position products
            t = tile[:c]
            for a0 in range(0, m, rows):
                r, w = slice(a0, a0 + rows), slice(a0, a0 + width)
                p = probs[g, r]  # (c, R, L)
                a = p if mg is None else p * mg  # u
                if sums is not None:
                    a.div_(sums[g, r])  # a (before dropout)
                _window(t, span).copy_(a if drop is None else a * drop[g, r])
                gr = grad[g, r]  # (c, R, D)
                dv[g, w] += torch.bmm(t.transpose(1, 2), gr)  # (c, W, D)
                da = _window(torch.bmm(gr, v3[g, w].transpose(1, 2)), span)  # (c, R, L) view
                da = da * drop[g, r] if drop is not None else da.contiguous()
                if mg is not None:
                    if sums is not None:  # du = (da - sum_j da a) / S
                        da -= (da * a).sum(-1, keepdim=True)
                        da /= sums[g, r]
                    if dmask is not None:
                        dm = (da * p).sum(1)  # (c, L)
                        if mask.size(0) > 1:
                            dmask.index_add_(0, heads, dm)
                        else:
                            dmask += dm.sum(0, keepdim=True)
                    da *= mg
                ds = dlogits[:, r]
                torch.mul(p, da - (da * p).sum(-1, keepdim=True), out=ds)  # softmax backward (c, R, L)
                _window(t, span).copy_(ds)
                torch.bmm(t, k3[g, w], out=dqs[g, r])  # content part of dq_s (c, R, D)
                dk[g, w] += torch.bmm(t.transpose(1, 2), qg[:, r])  # (c, W, D)
            if pe.dim() == 2:
                dpe.addmm_(qg.reshape(-1, d).t(), dlogits.reshape(-1, span))  # (D, L)
                dqs[g] += torch.matmul(dlogits, pe.t())  # (c, M, D)
            else:
                dpe.index_add_(0, heads, torch.bmm(qg.transpose(1, 2), dlogits))  # (H, D, L)
                dqs[g] += torch.bmm(dlogits, pe[heads].transpose(1, 2))
        dq = (dqs * (1.0 / math.sqrt(d))).view(b, h, m, d)
        s = k3.size(1)
        return dq, dk.view(b, h, s, d), dv.view(b, h, s, d), dpe, dmask, None, None, None, None


def adaptive_span_attention_fused(q: Tensor, k: Tensor, v: Tensor, key_pe: Tensor,
                                  span_mask: Optional[Tensor] = None, pers_k: Optional[Tensor] = None,
                                  pers_v: Optional[Tensor] = None, *, dropout_p: float = 0.0, renorm: bool = True,
                                  eps: float = 1e-8, rows: Optional[int] = None) -> Tensor:
    """Same arguments as ``adaptive_span_attention_naive`` (no persistent memory); ``rows``: query rows per block,
    a divisor of M (None: ``block_rows(M)``). Returns (B, H, M, D)."""
    if pers_k is not None or pers_v is not None:
        raise ValueError("adaptive-span attention 'fused' has no persistent memory (All-attention): use "
                         "--attn-impl skew or blocked (auto picks them for persistent memory)")
    if q.dtype not in DTYPES:
        raise ValueError(f"adaptive-span attention 'fused' runs in float32 / float64, got {q.dtype}: use "
                         f"--attn-impl skew (auto picks it for other dtypes)")
    m = q.size(2)
    rows = block_rows(m) if rows is None else rows
    if rows < 1 or m % rows:
        raise ValueError(f"fused adaptive-span attention: {rows} rows per block do not divide the {m} queries")
    b, h, _, _ = q.shape
    drop = _dropout_mask((b * h, m, key_pe.size(-1)), dropout_p, q)  # (G, M, L) or None
    mask = None if span_mask is None else span_mask.reshape(-1, span_mask.size(-1))  # (K or 1, L)
    out = _FusedSpanAttention.apply(q, k, v, key_pe, mask, drop, renorm, eps, rows)
    return out  # (B, H, M, D)
