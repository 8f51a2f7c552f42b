"""Independent plain forward pass of the original adaptive-span model (spec adaptive_span.md §1.1-§1.6), read from the
original key names (``module.`` stripped), for the converter tests.

Written per query from the spec, sharing no code with fairseq_ext: post-LN layers; layer l attends over its cache of
the previous L layer inputs (zeros at a stream start) followed by the block; query i attends to exactly the L
previous positions (distances L..1, never itself) with logits (q.k + q.p_delta) / sqrt(d), key_pe column j =
distance L - j; softmax jointly with the N persistent slots (keys x sqrt(d), values x sqrt(N)); span mask
m(delta) = clamp((zL - (delta - 1)) / R + 1, 0, 1) on the context part; joint renormalisation a / (sum a + 1e-8).
No trimming: the full window is always computed (trimming is exact in the original). float64 throughout.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


class ReferenceAdaptiveSpan:
    def __init__(self, state: Dict[str, Tensor], heads: int, ramp: int = 32) -> None:
        self.w = {k: v.detach().double() for k, v in state.items()}
        self.heads, self.ramp = heads, ramp
        self.head_dim, self.span = self.w["key_pe"].shape[1:]
        self.hidden = self.w["in_emb.weight"].shape[1]
        self.layers = len({k.split(".")[1] for k in state if k.startswith("layers.")})

    def _attention(self, p: str, h: Tensor, cache: Tensor) -> Tensor:
        """h (B, M, H) over [cache (B, L, H) ; h] -> (B, M, H)."""
        w, k_heads, d, span = self.w, self.heads, self.head_dim, self.span
        b, m, _ = h.shape
        both = torch.cat([cache, h], dim=1)  # (B, L + M, H)

        def split(x: Tensor) -> Tensor:  # (B, T, H) -> (B, K, T, d)
            return x.view(b, x.size(1), k_heads, d).transpose(1, 2)

        q = split(h @ w[p + "attn.proj_query.weight"].t())
        k = split(both @ w[p + "attn.proj_key.weight"].t())
        v = split(both @ w[p + "attn.proj_val.weight"].t())
        key_pe = w["key_pe"][0]  # (d, L); column j <-> distance L - j
        distance = torch.arange(span, 0, -1, dtype=torch.float64)  # window column j -> L - j
        z_key = p + "attn.attn.adaptive_span._mask.current_val"
        mask = None
        if z_key in w:
            z = w[z_key].view(k_heads, 1)  # (K, 1)
            mask = ((z * span - (distance - 1)) / self.ramp + 1).clamp(0, 1)  # (K, L)
        pers_k = w.get(p + "attn.attn.persistent_memory.key")  # (K, d, N)
        pers_v = w.get(p + "attn.attn.persistent_memory.val")  # (K, N, d)
        outs = []
        for i in range(m):  # query i sits at index L + i; its keys are indices i .. i + L - 1
            qi = q[:, :, i]  # (B, K, d)
            kw, vw = k[:, :, i:i + span], v[:, :, i:i + span]  # (B, K, L, d)
            logits = torch.einsum("bkd,bkld->bkl", qi, kw) + torch.einsum("bkd,dl->bkl", qi, key_pe)
            if pers_k is not None:
                logits = torch.cat([logits, torch.einsum("bkd,kdn->bkn", qi, pers_k * math.sqrt(d))], dim=-1)
            a = torch.softmax(logits / math.sqrt(d), dim=-1)  # (B, K, L [+ N])
            ctx, pers = a[..., :span], a[..., span:]
            if mask is not None:
                ctx = ctx * mask
                total = ctx.sum(-1, keepdim=True) + pers.sum(-1, keepdim=True)
                ctx, pers = ctx / (total + 1e-8), pers / (total + 1e-8)
            o = torch.einsum("bkl,bkld->bkd", ctx, vw)
            if pers_k is not None:
                o = o + torch.einsum("bkn,knd->bkd", pers, pers_v * math.sqrt(pers_v.size(1)))
            outs.append(o)
        out = torch.stack(outs, dim=2).transpose(1, 2).reshape(b, m, self.hidden)  # (B, M, H)
        return out @ w[p + "attn.proj_out.weight"].t()

    def _norm(self, x: Tensor, key: str) -> Tensor:
        return F.layer_norm(x, (self.hidden,), self.w[key + ".weight"], self.w[key + ".bias"])

    def forward(self, tokens: Tensor, caches: Optional[List[Tensor]]) -> Tuple[Tensor, List[Tensor]]:
        """tokens (B, M) original ids; caches: per layer (B, L, H) previous layer inputs or None (zeros).
        Returns (log-probs (B, M, V), next caches)."""
        b = tokens.size(0)
        if caches is None:
            caches = [torch.zeros(b, self.span, self.hidden, dtype=torch.float64) for _ in range(self.layers)]
        h = self.w["in_emb.weight"][tokens]  # (B, M, H), not scaled
        next_caches = []
        for layer in range(self.layers):
            p = f"layers.{layer}."
            next_caches.append(torch.cat([caches[layer], h], dim=1)[:, -self.span:])
            h = self._norm(h + self._attention(p, h, caches[layer]), p + "norm1")
            if p + "ff.fc1.weight" in self.w:
                inner = F.relu(h @ self.w[p + "ff.fc1.weight"].t() + self.w[p + "ff.fc1.bias"])
                h = self._norm(h + inner @ self.w[p + "ff.fc2.weight"].t() + self.w[p + "ff.fc2.bias"], p + "norm2")
        logits = h @ self.w["out_emb.weight"].t() + self.w["out_emb.bias"]
        return torch.log_softmax(logits, dim=-1), next_caches
