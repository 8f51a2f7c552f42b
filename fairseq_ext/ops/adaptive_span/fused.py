"""Adaptive-span attention for CPU training: the banded skew layout of blocked.py computed head group by head group,
with a hand-written backward (Sukhbaatar et al. 2019, arXiv 1905.07799, Sec. 2.2, Eq. 1-5; persistent memory:
All-attention, arXiv 1907.01470, Sec. 4, Eq. 7-8; spec adaptive_span.md §1.3, §1.6).

Per head g and block of R query rows a .. a + R - 1 (keys a .. a + W - 1, W = R + L), as blocked.py, with N
persistent slots (effective keys K_p = sqrt(D) k^p (D, N), values V_p = sqrt(N) v^p (N, D); N = 0 without them)
appended to each row:

    s   = [unskew(q_s K_w^T) + q_s P ; q_s K_p]          (R, L + N) joint logits, q_s = q / sqrt(D)
    p   = softmax(s)                                     (R, L + N)
    a   = p m / (sum_j p m + eps)                        span mask m (K or 1, L), 1 on the slots, renormalised (Eq. 5)
    o   = skew(a_w * drop_w) V_w + (a_p * drop_p) V_p    (R, D), a = [a_w ; a_p]

and the backward by hand, with u = p m, S = sum_j u + eps:

    da  = [unskew(do V_w^T) ; do V_p^T] * drop           (R, L + N)
    du  = (da - sum_j da a) / S                          (renormalisation; du = da without it)
    dm += sum_i du_w p_w                                 (the spans' gradient)
    ds  = p (du m - sum_j du m p)                        (softmax)
    dq_s = skew(ds_w) K_w + ds [P ; K_p]^T ;  dK_w += skew(ds_w)^T q_s ;  dV_w += skew(a_w * drop_w)^T do
    [dP ; dK_p] += q_s^T ds ;  dV_p += (a_p * drop_p)^T do

The skew and blocked kernels run each elementwise step, and autograd its backward, over the whole (B, H, M, L [+ N])
tensors, each several megabytes, so every step streams them from memory once more; here all steps of one head group
run on (c, R, W) tiles of about ``TILE_BYTES`` (the size of a core's L2 cache), and only p and the row sums (and the
dropout mask) are kept for the backward. On CPU at B 8, H 4, M 256, D 64 (2 threads, forward + backward, the
model's strided q, k, v, best of 5) this took the op from 60.1 to 43.8 ms at L 320, 88.2 to 69.9 ms at L 576 and
320.1 to 138.0 ms at L 1024 against ``skew``; at L 64 it matched ``blocked`` (16.2 vs 15.8 ms, skew 22.7). With
N = 1,024 slots and dropout 0.3 (B 2, H 8, M 512, D 64, best of 4): 282.7 (blocked) to 141.3 ms at L 64, 719.3
(skew) to 413.5 ms at L 1,024.

The dropout mask is drawn for the whole (B, H, M, L + N) tensor before the loop, as ``dropout`` draws it in the
skew path (``draw_float_mask`` on CPU, ``F.dropout``'s otherwise), so both paths drop the same weights for one seed
(tested on CPU). Float32 / float64 only.
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
    """Heads per group: as many (R, width) tiles as fit ``tile_bytes`` (default ``TILE_BYTES``), at least 1, at most
    ``heads``; the callers' width is W = R + L plus the N persistent slots of a joint row."""
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
                pers_k: Optional[Tensor], pers_v: Optional[Tensor], drop: Optional[Tensor], renorm: bool, eps: float,
                rows: int) -> Tensor:
        b, h, m, d = q.shape
        s, span = k.size(2), key_pe.size(-1)  # L + M, L
        slots = 0 if pers_k is None else pers_k.size(-1)  # N
        n, width, cols = b * h, rows + span, span + slots  # heads, keys per block, columns of a joint row
        qs = (q * (1.0 / math.sqrt(d))).reshape(n, m, d)  # (G, M, D) scaled before the products
        k3, v3 = k.reshape(n, s, d), v.reshape(n, s, d)  # (G, L + M, D)
        pe = key_pe.to(q.dtype)  # (D, L) shared or (H, D, L)
        mask = _row_mask(span_mask, slots, q.dtype)  # (K or 1, 1, L + N) or None
        keep = any(ctx.needs_input_grad[:7])  # evaluation and no_grad store nothing for a backward
        renorm = renorm and mask is not None
        probs = q.new_empty(n, m, cols) if keep else None  # p, saved
        sums = q.new_empty(n, m, 1) if keep and renorm else None  # S, saved
        out = q.new_empty(n, m, d)  # (G, M, D)
        group = group_size(n, rows, width + slots, q.element_size())
        tile = q.new_zeros(group, rows, width)  # skew(a) tiles: only the window diagonal band is ever written
        for g0 in range(0, n, group):
            g = slice(g0, min(n, g0 + group))
            heads = torch.arange(g.start, g.stop, device=q.device) % h  # (c,) head of each row of the group
            qg = qs[g]  # (c, M, D)
            logits = torch.matmul(qg, _row_keys(pe, pers_k, heads))  # (c, M, L + N) position and persistent part
            pv = None if pers_v is None else pers_v[heads]  # (c, N, D)
            mg = None if mask is None else mask[heads] if mask.size(0) > 1 else mask[0]  # (c, 1, L + N) or (1, L + N)
            t = tile[:qg.size(0)]
            for a0 in range(0, m, rows):
                r, w = slice(a0, a0 + rows), slice(a0, a0 + width)
                scores = logits[:, r]  # (c, R, L + N) view
                scores[..., :span] += _window(torch.bmm(qg[:, r], k3[g, w].transpose(1, 2)), span)  # + content
                p = torch.softmax(scores, dim=-1)  # (c, R, L + N)
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
                _window(t, span).copy_(a[..., :span])
                o = torch.bmm(t, v3[g, w])  # (c, R, D) contiguous: bmm's batched path, not one product per head
                out[g, r] = o if pv is None else o.baddbmm_(a[..., span:], pv)  # + the slots' weights x values
        ctx.save_for_backward(qs, k3, v3, pe, mask, pers_k, pers_v, drop, probs, sums)
        ctx.shape, ctx.rows = (b, h, m, d), rows
        return out.view(b, h, m, d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        qs, k3, v3, pe, mask, pers_k, pers_v, drop, probs, sums = ctx.saved_tensors
        (b, h, m, d), rows = ctx.shape, ctx.rows
        n, span, cols = b * h, pe.size(-1), probs.size(-1)
        slots, width = cols - span, rows + span
        grad = grad.reshape(n, m, d)  # (G, M, D)
        dqs, dk, dv = torch.empty_like(qs), torch.zeros_like(k3), torch.zeros_like(v3)
        dpe = torch.zeros_like(pe)
        dpk = None if pers_k is None else torch.zeros_like(pers_k)  # (H, D, N)
        dpv = None if pers_v is None else torch.zeros_like(pers_v)  # (H, N, D)
        dmask = torch.zeros_like(mask[:, 0, :span]) if mask is not None and ctx.needs_input_grad[4] else None
        group = group_size(n, rows, width + slots, qs.element_size())
        tile = qs.new_zeros(group, rows, width)
        for g0 in range(0, n, group):
            g = slice(g0, min(n, g0 + group))
            heads = torch.arange(g.start, g.stop, device=qs.device) % h
            qg, c = qs[g], g.stop - g.start  # (c, M, D)
            keys = _row_keys(pe, pers_k, heads)  # (D, L) or (c, D, L + N)
            pv = None if pers_v is None else pers_v[heads]  # (c, N, D)
            dpv_g = None if pv is None else torch.zeros_like(pv)  # (c, N, D)
            mg = None if mask is None else mask[heads] if mask.size(0) > 1 else mask[0]
            dlogits = qs.new_empty(c, m, cols)  # ds of the group, for the position and persistent products
            t = tile[:c]
            for a0 in range(0, m, rows):
                r, w = slice(a0, a0 + rows), slice(a0, a0 + width)
                p = probs[g, r]  # (c, R, L + N)
                a = p if mg is None else p * mg  # u
                if sums is not None:
                    a.div_(sums[g, r])  # a (before dropout)
                ad = a if drop is None else a * drop[g, r]  # the weights the forward used
                _window(t, span).copy_(ad[..., :span])
                gr = grad[g, r]  # (c, R, D)
                dv[g, w] += torch.bmm(t.transpose(1, 2), gr)  # (c, W, D)
                da = _window(torch.bmm(gr, v3[g, w].transpose(1, 2)), span)  # (c, R, L) view
                if pv is not None:
                    dpv_g += torch.bmm(ad[..., span:].transpose(1, 2), gr)  # (c, N, D)
                    da = torch.cat([da, torch.bmm(gr, pv.transpose(1, 2))], -1)  # (c, R, L + N)
                da = da * drop[g, r] if drop is not None else da.contiguous()
                if mg is not None:
                    if sums is not None:  # du = (da - sum_j da a) / S
                        da -= (da * a).sum(-1, keepdim=True)
                        da /= sums[g, r]
                    if dmask is not None:
                        dm = (da[..., :span] * p[..., :span]).sum(1)  # (c, L)
                        if mask.size(0) > 1:
                            dmask.index_add_(0, heads, dm)
                        else:
                            dmask += dm.sum(0, keepdim=True)
                    da *= mg
                ds = dlogits[:, r]
                torch.mul(p, da - (da * p).sum(-1, keepdim=True), out=ds)  # softmax backward (c, R, L + N)
                _window(t, span).copy_(ds[..., :span])
                dqs[g, r] = torch.bmm(t, k3[g, w])  # content part of dq_s (c, R, D)
                dk[g, w] += torch.bmm(t.transpose(1, 2), qg[:, r])  # (c, W, D)
            dqs[g] += torch.matmul(dlogits, keys.transpose(-1, -2))  # (c, M, D) position and persistent part
            if keys.dim() == 2:  # shared (D, L), no persistent slots
                dpe.addmm_(qg.reshape(-1, d).t(), dlogits.reshape(-1, span))  # (D, L)
                continue
            dkeys = torch.bmm(qg.transpose(1, 2), dlogits)  # (c, D, L + N)
            if pe.dim() == 2:
                dpe += dkeys[..., :span].sum(0)  # (D, L)
            else:
                dpe.index_add_(0, heads, dkeys[..., :span])  # (H, D, L)
            if dpk is not None:
                dpk.index_add_(0, heads, dkeys[..., span:])  # (H, D, N)
                dpv.index_add_(0, heads, dpv_g)  # (H, N, D)
        dq = (dqs * (1.0 / math.sqrt(d))).view(b, h, m, d)
        s = k3.size(1)
        return (dq, dk.view(b, h, s, d), dv.view(b, h, s, d), dpe, dmask, dpk, dpv, None, None, None, None)


def _row_mask(span_mask: Optional[Tensor], slots: int, dtype: torch.dtype) -> Optional[Tensor]:
    """The span mask (K or 1, L) as the multiplier of a joint row: (K or 1, 1, L + N), persistent slots 1."""
    if span_mask is None:
        return None
    mask = span_mask.to(dtype)[..., None, :]  # (K or 1, 1, L)
    return F.pad(mask, (0, slots), value=1.0) if slots else mask


def _row_keys(pe: Tensor, pers_k: Optional[Tensor], heads: Tensor) -> Tensor:
    """What a scaled query multiplies for the non-content part of its row: the position embeddings (D, L) when shared
    and there are no persistent slots, else per head of the group [P_h | sqrt(D) k^p_h]: (c, D, L [+ N])."""
    if pers_k is None:
        return pe if pe.dim() == 2 else pe[heads]
    pe_g = pe.expand(heads.numel(), *pe.shape) if pe.dim() == 2 else pe[heads]  # (c, D, L)
    return torch.cat([pe_g, pers_k[heads]], -1)  # (c, D, L + N)


def adaptive_span_attention_fused(q: Tensor, k: Tensor, v: Tensor, key_pe: Tensor,
                                  span_mask: Optional[Tensor] = None, pers_k: Optional[Tensor] = None,
                                  pers_v: Optional[Tensor] = None, *, dropout_p: float = 0.0, renorm: bool = True,
                                  eps: float = 1e-8, rows: Optional[int] = None) -> Tensor:
    """Same arguments as ``adaptive_span_attention_naive``; ``rows``: query rows per block, a divisor of M (None:
    ``block_rows(M)``). Returns (B, H, M, D)."""
    if q.dtype not in DTYPES:
        raise ValueError(f"adaptive-span attention 'fused' runs in float32 / float64, got {q.dtype}: use "
                         f"--attn-impl skew (auto picks it for other dtypes)")
    if (pers_k is None) != (pers_v is None):
        raise ValueError("persistent memory needs both pers_k and pers_v")
    m = q.size(2)
    rows = block_rows(m) if rows is None else rows
    if rows < 1 or m % rows:
        raise ValueError(f"fused adaptive-span attention: {rows} rows per block do not divide the {m} queries")
    b, h, _, d = q.shape
    slots = 0 if pers_k is None else pers_k.size(-1)
    drop = _dropout_mask((b * h, m, key_pe.size(-1) + slots), dropout_p, q)  # (G, M, L + N) or None
    mask = None if span_mask is None else span_mask.reshape(-1, span_mask.size(-1))  # (K or 1, L)
    if pers_k is not None:  # the effective vectors sqrt(D) k^p (H, D, N) and sqrt(N) v^p (H, N, D), as skew.py
        pers_k = pers_k.to(q.dtype) * math.sqrt(d)
        pers_v = pers_v.to(q.dtype) * math.sqrt(slots)
    out = _FusedSpanAttention.apply(q, k, v, key_pe, mask, pers_k, pers_v, drop, renorm, eps, rows)
    return out  # (B, H, M, D)
