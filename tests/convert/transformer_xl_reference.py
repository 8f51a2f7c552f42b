"""Plain-torch reference forward of the original Transformer-XL over an ORIGINAL-format state dict.

Written from shared/specs/transformer_xl.md (§1-§3, §7) and the algorithm of the original PyTorch code
(kimiyoung/transformer-xl ``pytorch/mem_transformer.py``, ``utils/proj_adaptive_softmax.py``) and NVIDIA's copy
(DeepLearningExamples ``Transformer-XL/pytorch``); it imports nothing from fairseq_ext, so converter tests compare
the converted ``transformer_xl_lm`` against an independent implementation. Everything is time-first, as in the
originals: tokens (T, B), hidden states (T, B, C), memories (M, B, C) per layer.

Covered (attn_type 0 only): adaptive embedding (``div_val``, projections, x sqrt(d_model)); descending relative
positions with ``clamp_len``, [sin | cos] encodings; ``qkv_net`` on cat(mem, h) (pre-LN: on LN(cat)); the pad-and-view
``rel_shift``; the triu/tril mask incl. ``same_length`` with the original (``klen - mem_len``) or NVIDIA
(``klen - mem_len - 1``) ``mask_len``; post- or pre-LN; the memory update (last ``mem_len`` layer inputs); the
projected adaptive log-softmax with cluster rows read in reverse (tail i uses head column -i), for both the
original softmax keys (``crit.out_layers.{i}``) and NVIDIA's (``crit.out_layers_biases.{i}``,
``crit.shared_out_projs.{i}``, tied output matrices not stored under ``crit``).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, used by both originals


@dataclass
class ReferenceConfig:
    """The MemTransformerLM settings the forward needs (names as in the originals)."""

    n_token: int
    n_layer: int
    n_head: int
    d_head: int
    d_model: int
    d_embed: int
    div_val: int = 1
    cutoffs: Sequence[int] = ()
    pre_lnorm: bool = False
    mem_len: int = 0
    clamp_len: int = -1
    same_length: bool = False
    nvidia_same_length: bool = False  # NVIDIA's mask_len = klen - mem_len - 1
    layout: str = "original"  # softmax key names: "original" | "nvidia"
    tie_weight: bool = True  # NVIDIA layout only: output word matrices are the input embeddings
    tie_projs: Sequence[bool] = field(default_factory=list)  # NVIDIA layout only: per cluster


def rel_shift(x: Tensor) -> Tensor:
    """The original ``_rel_shift`` (time-first): x (qlen, klen, B, H) -> (qlen, klen, B, H); row i is shifted so
    that column j holds the slot of distance i + mlen - j (entries above the causal diagonal are junk)."""
    zero_pad = x.new_zeros((x.size(0), 1) + tuple(x.shape[2:]))  # (qlen, 1, B, H)
    padded = torch.cat([zero_pad, x], dim=1)  # (qlen, klen + 1, B, H)
    padded = padded.view(x.size(1) + 1, x.size(0), *x.shape[2:])  # (klen + 1, qlen, B, H)
    return padded[1:].reshape(x.shape)  # (qlen, klen, B, H)


def attention_mask(qlen: int, mlen: int, mem_len: int, same_length: bool, nvidia: bool) -> Tensor:
    """The original ``dec_attn_mask``: (qlen, klen) bool, True = hidden."""
    klen = mlen + qlen
    ones = torch.ones(qlen, klen)
    if not same_length:
        return torch.triu(ones, diagonal=1 + mlen).bool()
    mask_len = klen - mem_len - (1 if nvidia else 0)
    mask_shift_len = qlen - mask_len if mask_len > 0 else qlen
    return (torch.triu(ones, 1 + mlen) + torch.tril(ones, -mask_shift_len)).bool()


class ReferenceTransformerXL:
    """Original-format state dict -> log-probabilities over the original vocabulary, memory carried across calls."""

    def __init__(self, state: Dict[str, Tensor], cfg: ReferenceConfig, dtype: torch.dtype = torch.float64) -> None:
        self.s = {k: v.detach().to(dtype) for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}
        self.cfg = cfg
        self.dtype = dtype
        self.cutoff_ends = [0] + list(cfg.cutoffs) + [cfg.n_token]

    # ------------------------------------------------------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """tokens (T, B) -> (T, B, d_model), scaled by sqrt(d_model)."""
        cfg, s = self.cfg, self.s
        if cfg.div_val == 1:
            out = s["word_emb.emb_layers.0.weight"][tokens]  # (T, B, d_embed)
            if "word_emb.emb_projs.0" in s:
                out = F.linear(out, s["word_emb.emb_projs.0"])  # (T, B, d_model)
        else:
            flat = tokens.reshape(-1)
            out = torch.zeros(flat.numel(), cfg.d_model, dtype=self.dtype)
            for i in range(len(self.cutoff_ends) - 1):
                lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
                rows = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
                emb = s[f"word_emb.emb_layers.{i}.weight"][flat[rows] - lo]  # (N_i, d_i)
                out[rows] = F.linear(emb, s[f"word_emb.emb_projs.{i}"])  # (N_i, d_model)
            out = out.view(*tokens.shape, cfg.d_model)
        return out * cfg.d_model ** 0.5

    def positions(self, klen: int) -> Tensor:
        """(klen, d_model): [sin | cos] of the descending distances klen-1 .. 0, clamped at clamp_len."""
        d = self.cfg.d_model
        pos_seq = torch.arange(klen - 1, -1, -1.0, dtype=self.dtype)
        if self.cfg.clamp_len > 0:
            pos_seq = pos_seq.clamp(max=self.cfg.clamp_len)
        inv_freq = 1 / (10000 ** (torch.arange(0.0, d, 2.0, dtype=self.dtype) / d))
        sinusoid = torch.outer(pos_seq, inv_freq)  # (klen, d/2)
        return torch.cat([sinusoid.sin(), sinusoid.cos()], dim=-1)

    def _layer_norm(self, x: Tensor, prefix: str) -> Tensor:
        return F.layer_norm(x, (x.size(-1),), self.s[prefix + ".weight"], self.s[prefix + ".bias"], LAYER_NORM_EPS)

    def layer(self, index: int, w: Tensor, mem: Optional[Tensor], r: Tensor, mask: Tensor) -> Tensor:
        """One RelPartialLearnableDecoderLayer: w (T, B, C), mem (M, B, C) or None, r (K, C), mask (T, K)."""
        cfg, s, p = self.cfg, self.s, f"layers.{index}."
        qlen, bsz = w.shape[:2]
        cat = w if mem is None or mem.size(0) == 0 else torch.cat([mem, w], dim=0)  # (K, B, C)
        attn_in = self._layer_norm(cat, p + "dec_attn.layer_norm") if cfg.pre_lnorm else cat
        w_heads = F.linear(attn_in, s[p + "dec_attn.qkv_net.weight"])  # (K, B, 3*H*D)
        r_head_k = F.linear(r, s[p + "dec_attn.r_net.weight"])  # (K, H*D)
        q, k, v = torch.chunk(w_heads, 3, dim=-1)
        q = q[-qlen:]
        klen = k.size(0)
        q = q.reshape(qlen, bsz, cfg.n_head, cfg.d_head)
        k = k.reshape(klen, bsz, cfg.n_head, cfg.d_head)
        v = v.reshape(klen, bsz, cfg.n_head, cfg.d_head)
        r_head_k = r_head_k.reshape(klen, cfg.n_head, cfg.d_head)
        ac = torch.einsum("ibnd,jbnd->ijbn", q + s["r_w_bias"], k)  # (T, K, B, H)
        bd = rel_shift(torch.einsum("ibnd,jnd->ijbn", q + s["r_r_bias"], r_head_k))  # (T, K, B, H)
        score = (ac + bd) * (1 / math.sqrt(cfg.d_head))
        score = score.masked_fill(mask[:, :, None, None], float("-inf"))
        prob = torch.softmax(score, dim=1)
        vec = torch.einsum("ijbn,jbnd->ibnd", prob, v).reshape(qlen, bsz, cfg.n_head * cfg.d_head)
        out = F.linear(vec, s[p + "dec_attn.o_net.weight"])  # (T, B, C)
        if cfg.pre_lnorm:
            h = w + out
            ff_in = self._layer_norm(h, p + "pos_ff.layer_norm")
        else:
            h = self._layer_norm(w + out, p + "dec_attn.layer_norm")
            ff_in = h
        core = F.linear(F.relu(F.linear(ff_in, s[p + "pos_ff.CoreNet.0.weight"], s[p + "pos_ff.CoreNet.0.bias"])),
                        s[p + "pos_ff.CoreNet.3.weight"], s[p + "pos_ff.CoreNet.3.bias"])
        return h + core if cfg.pre_lnorm else self._layer_norm(h + core, p + "pos_ff.layer_norm")

    def forward(self, tokens: Tensor, mems: Optional[List[Tensor]]) -> Tuple[Tensor, Optional[List[Tensor]]]:
        """tokens (T, B) -> (hidden (T, B, C), new memories: n_layer tensors (<= mem_len, B, C) or None)."""
        cfg = self.cfg
        qlen = tokens.size(0)
        mlen = mems[0].size(0) if mems else 0
        klen = mlen + qlen
        mask = attention_mask(qlen, mlen, cfg.mem_len, cfg.same_length, cfg.nvidia_same_length)
        r = self.positions(klen)
        h = self.embed(tokens)
        hids = []
        for i in range(cfg.n_layer):
            hids.append(h)
            h = self.layer(i, h, mems[i] if mems else None, r, mask)
        if cfg.mem_len <= 0:
            return h, None
        end = mlen + qlen
        beg = max(0, end - cfg.mem_len)
        new_mems = [(torch.cat([mems[i], hids[i]], 0) if mems else hids[i])[beg:end] for i in range(cfg.n_layer)]
        return h, new_mems

    # ------------------------------------------------------------------------------------------------------------
    def _out_params(self, i: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """(word matrix, bias, projection or None) of cluster i, read with the layout's key names."""
        cfg, s = self.cfg, self.s
        lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
        j = 0 if cfg.div_val == 1 else i  # div_val 1: one full-vocabulary matrix, sliced
        if cfg.layout == "original":
            weight, bias = s[f"crit.out_layers.{j}.weight"], s[f"crit.out_layers.{j}.bias"]
            proj = s.get(f"crit.out_projs.{i}")
        elif cfg.layout == "nvidia":
            weight = s[f"word_emb.emb_layers.{j}.weight"] if cfg.tie_weight else s[f"crit.out_layers_weights.{j}"]
            bias = s[f"crit.out_layers_biases.{j}"]
            tie_projs = list(cfg.tie_projs) + [False] * (len(self.cutoff_ends) - 1 - len(cfg.tie_projs))
            if tie_projs[i]:  # NVIDIA get_out_proj
                shared = sorted(k for k in s if k.startswith("crit.shared_out_projs."))
                proj = None if not shared else s["crit.shared_out_projs.0" if len(shared) == 1
                                                 else f"crit.shared_out_projs.{i}"]
            else:
                proj = s.get(f"crit.out_projs.{i}")
        else:
            raise ValueError(f"unknown layout {cfg.layout!r}")
        if cfg.div_val == 1:
            weight, bias = weight[lo:hi], bias[lo:hi]
        return weight, bias, proj

    @staticmethod
    def _logit(hidden: Tensor, weight: Tensor, bias: Tensor, proj: Optional[Tensor]) -> Tensor:
        if proj is not None:
            hidden = F.linear(hidden, proj.t())  # (N, d_i)
        return F.linear(hidden, weight, bias)

    def log_probs(self, hidden: Tensor) -> Tensor:
        """hidden (..., C) -> log p over the whole original vocabulary (..., V), in vocabulary order."""
        flat = hidden.reshape(-1, hidden.size(-1))  # (N, C)
        n_clusters = len(self.cutoff_ends) - 2
        weight, bias, proj = self._out_params(0)
        if n_clusters == 0:
            out = torch.log_softmax(self._logit(flat, weight, bias, proj), dim=-1)
            return out.view(*hidden.shape[:-1], -1)
        head_weight = torch.cat([weight, self.s["crit.cluster_weight"]], 0)
        head_bias = torch.cat([bias, self.s["crit.cluster_bias"]], 0)
        head = torch.log_softmax(self._logit(flat, head_weight, head_bias, proj), dim=-1)  # (N, c0 + n)
        parts = [head[:, :self.cutoff_ends[1]]]
        for i in range(1, n_clusters + 1):
            tail = torch.log_softmax(self._logit(flat, *self._out_params(i)), dim=-1)  # (N, V_i)
            parts.append(head[:, -i, None] + tail)  # tail cluster i reads head column -i
        return torch.cat(parts, dim=-1).view(*hidden.shape[:-1], -1)

    def run(self, segments: Sequence[Tensor]) -> List[Tensor]:
        """Consecutive segments (T_k, B) of original ids -> their log-probs (T_k, B, V), memory carried."""
        mems = None
        outs = []
        with torch.no_grad():
            for seg in segments:
                hidden, mems = self.forward(seg, mems)
                outs.append(self.log_probs(hidden))
        return outs
