"""A bench-only reproduction of the original SHA-RNN's model (Smerity/sha-rnn ``model.py``: ``SHARNN``, ``Block``,
``Attention``, ``Boom``), written here from reading that code so that ``scripts/bench.py --original`` can time the
original algorithm beside ``sha_rnn_lm`` (the original code is not part of this project).

What it keeps of the original, because it decides the speed: time-first (T, B, d) tensors and a time-first
``nn.LSTM``; the attention as the original's ``attention()``: explicit ``matmul(q, k^T.contiguous()) / sqrt(d)``
plus an additive -inf mask (a (T, T) ``triu`` concatenated after zeros for the memory) built in every forward,
softmax, dropout, ``matmul`` with v, with the (T, B, d) -> (B, 1, T, d) transposes of its head split; ``qln`` on
``query.float()``; ``nn.Dropout`` everywhere the original has it (after the embedding, after the LSTM, on q, v and
the attention weights, after attention, inside and after Boom, before the output); the memory trimmed to
``max_memory - T`` before a segment and the new memory the last ``max_memory`` rows of [memory ; lnmem(h)]; the
LSTM state and memories detached between segments (the original's ``repackage_hidden``). The weights are copies of
an ``sha_rnn_lm`` decoder's, so in eval mode both compute the same logits (tested). Changes that compute nothing
different: a PyTorch ``LayerNorm`` for apex's ``FusedLayerNorm`` (not installed), one head only.
"""
from __future__ import annotations

import copy
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class OriginalAttention(nn.Module):
    def __init__(self, ours: nn.Module, dropout: float) -> None:
        super().__init__()
        d = ours.dim
        gates = (ours.qs, ours.ks, ours.vs)
        self.qs, self.ks, self.vs = (nn.Parameter(p.detach().clone().view(1, 1, d)) for p in gates)  # (1, 1, d)
        self.q, self.qln, self.vq = copy.deepcopy(ours.q), copy.deepcopy(ours.qln), copy.deepcopy(ours.vq)
        self.drop = nn.Dropout(dropout)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor) -> Tensor:
        """query (T, B, d), key = value (S, B, d), attn_mask (T, S) additive -> (T, B, d)."""
        qs, ks, vs = torch.sigmoid(self.qs), torch.sigmoid(self.ks), torch.sigmoid(self.vs)
        vs = self.vq(vs) if self.vq is not None else self.vs
        query = self.qln(self.q(query).float())
        q, k, v = self.drop(qs * query), ks * key, self.drop(vs * value)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (B, T|S, d)
        b, t, d = q.shape
        q, k, v = q.view(b, t, 1, d).transpose(1, 2), k.view(b, -1, 1, d).transpose(1, 2), \
            v.view(b, -1, 1, d).transpose(1, 2)  # (B, 1, T|S, d)
        scores = torch.matmul(q, k.transpose(-1, -2).contiguous()) / math.sqrt(d) + attn_mask.view(1, 1, t, -1)
        mix = torch.matmul(self.drop(F.softmax(scores, dim=-1)), v)  # (B, 1, T, d)
        return mix.transpose(1, 2).contiguous().view(b, t, d).transpose(0, 1)  # (T, B, d)


class OriginalBoom(nn.Module):
    def __init__(self, ours: nn.Module, dropout: float) -> None:
        super().__init__()
        self.linear1 = copy.deepcopy(ours.linear1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        z = self.linear1(x)
        z = self.dropout(z * torch.sigmoid(1.702 * z))  # the original's GELU
        return z.view(*z.shape[:-1], z.shape[-1] // x.shape[-1], x.shape[-1]).sum(dim=-2)


class OriginalBlock(nn.Module):
    def __init__(self, ours: nn.Module, dropout: float) -> None:
        super().__init__()
        for name in ("lnstart", "lnmid", "lnmem", "lnff", "lnxff"):
            setattr(self, name, copy.deepcopy(getattr(ours, name)))
        self.rnn = nn.LSTM(ours.dim, ours.dim)  # time-first
        self.rnn.load_state_dict(ours.rnn.state_dict())
        self.attn = OriginalAttention(ours.attn, dropout) if ours.attn is not None else None
        self.ff = OriginalBoom(ours.ff, dropout)
        self.drop = nn.Dropout(dropout)
        self.max_memory = ours.max_memory

    def forward(self, h: Tensor, attn_mask: Tensor, mem: Optional[Tensor], hidden) -> Tuple[Tensor, ...]:
        h = self.lnstart(h)
        x, new_hidden = self.rnn(h, hidden)
        h = self.drop(x.view(*x.shape[:-1], 1, x.shape[-1])).sum(dim=-2)  # no residual around the LSTM
        new_mem = None
        if self.attn is not None:
            mh, h = self.lnmem(h), self.lnmid(h)
            bigh = mh if mem is None else torch.cat([mem, mh], dim=0)  # (S, B, d)
            new_mem = bigh[-self.max_memory:]
            h = self.drop(self.attn(h, bigh, bigh, attn_mask)) + h
        h, x = self.lnff(h), self.lnxff(h)
        return self.drop(self.ff(x)) + h, new_mem, new_hidden


class OriginalSHARNN(nn.Module):
    """The original's stack with a copy of ``decoder``'s (an ``SHARNNDecoder``) weights; ``forward(tokens (B, T))``
    -> logits (T, B, V), carrying the LSTM states and memories (detached) from one call to the next."""

    def __init__(self, decoder: nn.Module, dropout: float, dropouti: float, dropouth: float) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(decoder.embed_tokens)
        self.blocks = nn.ModuleList(OriginalBlock(layer, dropouth) for layer in decoder.layers)
        self.decoder = nn.Linear(decoder.embed_dim, self.encoder.num_embeddings)
        self.decoder.weight = self.encoder.weight  # tied, with its own bias
        self.decoder.bias.data.copy_(decoder.output_bias.data)
        self.drop, self.idrop = nn.Dropout(dropout), nn.Dropout(dropouti)
        self.max_memory = decoder.max_memory
        self.hidden: List = [None] * len(self.blocks)
        self.mems: Optional[List[Optional[Tensor]]] = None

    def reset(self) -> None:
        """Empty LSTM states and memories (the original's ``init_hidden`` and ``mems = None``)."""
        self.hidden, self.mems = [None] * len(self.blocks), None

    def forward(self, tokens: Tensor) -> Tensor:
        x = tokens.t()  # (T, B)
        h = self.idrop(self.encoder(x))  # (T, B, d)
        mems = self.mems
        if mems is not None:
            keep = self.max_memory - len(x)
            mems = [None if m is None else m[len(m) - min(len(m), max(keep, 0)):] for m in mems]
        attn_mask = torch.triu(torch.full((len(x), len(x)), -float("inf"), device=h.device, dtype=h.dtype), 1)
        held = max((len(m) for m in mems or [] if m is not None), default=0)
        if held:
            attn_mask = torch.cat([torch.zeros(len(x), held, device=h.device, dtype=h.dtype), attn_mask], dim=-1)
        new_hidden, new_mems = [], []
        for i, block in enumerate(self.blocks):
            h, m, nh = block(h, attn_mask, None if mems is None else mems[i], self.hidden[i])
            new_hidden.append(nh)
            new_mems.append(m)
        self.hidden = [(a.detach(), b.detach()) for a, b in new_hidden]  # repackage_hidden
        self.mems = [None if m is None else m.detach() for m in new_mems]
        return self.decoder(self.drop(h))  # (T, B, V)


def wrap_original(model_cfg, decoder: nn.Module) -> Tuple[nn.Module, None]:
    """(the original stack with ``decoder``'s weights, no adaptive softmax) for ``originals.OriginalLM``."""
    return OriginalSHARNN(decoder, model_cfg.dropout, model_cfg.dropouti, model_cfg.dropouth), None
