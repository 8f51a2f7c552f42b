"""A bench-only reproduction of the layer stack of kimiyoung/transformer-xl ``pytorch/mem_transformer.py``
(``MemTransformerLM`` with ``attn_type`` 0, ``RelPartialLearnableMultiHeadAttn``, ``PositionwiseFF``), written here
from reading that code so that this machine can time the original algorithm beside ``transformer_xl_lm`` (the
original code is not part of this project): time-first (T, B, C) tensors; one bias-free ``qkv_net`` applied to
cat(mem, h) (queries are its last T rows, so the memory rows' queries are computed and dropped, as there); einsum
products ``ibnd,jbnd->ijbn`` / ``ibnd,jnd->ijbn`` / ``ijbn,jbnd->ibnd``; the pad-and-view ``_rel_shift`` on the
(T, S, B, H) score tensor; ``(AC + BD).mul_(scale)``; ``attn_score.float().masked_fill(mask, -inf)
.type_as(attn_score)`` then ``F.softmax(dim=1)``; ``o_net``; post-LN (or ``pre_lnorm``); ``CoreNet`` with an in-place
ReLU; ``nn.Dropout`` where the original has it; shared ``r_w_bias`` / ``r_r_bias``; ``_update_mems`` under no_grad
keeping n_layer + 1 memories (the last one is never read, as in the original).

Only the layer stack differs from ours: the adaptive input embedding and projected adaptive softmax are **our**
``XLAdaptiveInput`` / ``ProjectedAdaptiveLogSoftmax`` modules taken from the fairseq-built model, so both sides pay
the same embedding and softmax logits; the bench trains it with fairseq's ``adaptive_loss`` (a log-softmax per
cluster and the target picked, the original's computation; ``original_criterion``). The parameters are the
fairseq-built model's (``qkv_net`` = cat(q, k, v) rows, ``r_net`` = r_proj, ``o_net`` = out_proj, ``CoreNet.0/3`` =
fc1/fc2), so the parameter count is identical and a test checks that both compute the same features. Changes that
alter nothing computed: boolean masks (a uint8 ``masked_fill`` mask is an error in current torch), memories start as
(0, B, C) tensors rather than 1-D empty ones, ``torch.outer`` for the removed ``torch.ger``, ``_update_mems`` called
with its arguments in the documented order (identical when ext_len = 0).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fairseq_ext.criterions.lm_loss import nll_sum


class OriginalRelPartialLearnableMultiHeadAttn(nn.Module):
    """The original relative attention, time-first: w (T, B, C), memory (M, B, C), r (S, 1, C)."""

    def __init__(self, n_head: int, d_model: int, d_head: int, dropout: float, dropatt: float,
                 pre_lnorm: bool) -> None:
        super().__init__()
        self.n_head, self.d_head, self.pre_lnorm = n_head, d_head, pre_lnorm
        self.qkv_net = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.layer_norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.dropatt = nn.Dropout(dropatt)
        self.scale = 1 / (d_head ** 0.5)

    @staticmethod
    def _rel_shift(x: Tensor) -> Tensor:
        """x (T, S, B, H) -> (T, S, B, H) realigned by distance: zero column in front, view as (S+1, T), drop the
        first row, view back (entries above the causal diagonal keep the next row's values; the mask hides them)."""
        zero_pad = torch.zeros((x.size(0), 1, *x.size()[2:]), device=x.device, dtype=x.dtype)  # (T, 1, B, H)
        x_padded = torch.cat([zero_pad, x], dim=1)  # (T, S+1, B, H)
        x_padded = x_padded.view(x.size(1) + 1, x.size(0), *x.size()[2:])  # (S+1, T, B, H)
        return x_padded[1:].view_as(x)  # (T, S, B, H)

    def forward(self, w: Tensor, r: Tensor, r_w_bias: Tensor, r_r_bias: Tensor, attn_mask: Optional[Tensor],
                mems: Optional[Tensor]) -> Tensor:
        qlen, rlen, bsz = w.size(0), r.size(0), w.size(1)
        cat = w if mems is None else torch.cat([mems, w], 0)  # (S, B, C)
        w_heads = self.qkv_net(self.layer_norm(cat) if self.pre_lnorm else cat)  # (S, B, 3*H*D)
        r_head_k = self.r_net(r)  # (S, 1, H*D)
        w_head_q, w_head_k, w_head_v = torch.chunk(w_heads, 3, dim=-1)  # (S, B, H*D) each
        w_head_q = w_head_q[-qlen:]  # (T, B, H*D): the memory rows' queries are dropped
        klen = w_head_k.size(0)
        w_head_q = w_head_q.view(qlen, bsz, self.n_head, self.d_head)  # (T, B, H, D)
        w_head_k = w_head_k.view(klen, bsz, self.n_head, self.d_head)  # (S, B, H, D)
        w_head_v = w_head_v.view(klen, bsz, self.n_head, self.d_head)  # (S, B, H, D)
        r_head_k = r_head_k.view(rlen, self.n_head, self.d_head)  # (S, H, D)

        ac = torch.einsum("ibnd,jbnd->ijbn", w_head_q + r_w_bias, w_head_k)  # (T, S, B, H)
        bd = self._rel_shift(torch.einsum("ibnd,jnd->ijbn", w_head_q + r_r_bias, r_head_k))  # (T, S, B, H)
        attn_score = ac + bd  # (T, S, B, H)
        attn_score.mul_(self.scale)
        if attn_mask is not None and attn_mask.any().item():
            attn_score = attn_score.float().masked_fill(attn_mask[:, :, :, None], -float("inf")).type_as(attn_score)
        attn_prob = self.dropatt(F.softmax(attn_score, dim=1))  # (T, S, B, H)
        attn_vec = torch.einsum("ijbn,jbnd->ibnd", attn_prob, w_head_v)  # (T, B, H, D)
        attn_vec = attn_vec.contiguous().view(attn_vec.size(0), attn_vec.size(1), self.n_head * self.d_head)
        attn_out = self.drop(self.o_net(attn_vec))  # (T, B, C)
        if self.pre_lnorm:
            return w + attn_out
        return self.layer_norm(w + attn_out)


class OriginalPositionwiseFF(nn.Module):
    def __init__(self, d_model: int, d_inner: int, dropout: float, pre_lnorm: bool) -> None:
        super().__init__()
        self.pre_lnorm = pre_lnorm
        self.CoreNet = nn.Sequential(nn.Linear(d_model, d_inner), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                     nn.Linear(d_inner, d_model), nn.Dropout(dropout))
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, inp: Tensor) -> Tensor:
        if self.pre_lnorm:
            return self.CoreNet(self.layer_norm(inp)) + inp
        return self.layer_norm(inp + self.CoreNet(inp))


class OriginalDecoderLayer(nn.Module):
    """``RelPartialLearnableDecoderLayer``: attention then feed-forward."""

    def __init__(self, n_head: int, d_model: int, d_head: int, d_inner: int, dropout: float, dropatt: float,
                 pre_lnorm: bool) -> None:
        super().__init__()
        self.dec_attn = OriginalRelPartialLearnableMultiHeadAttn(n_head, d_model, d_head, dropout, dropatt,
                                                                 pre_lnorm)
        self.pos_ff = OriginalPositionwiseFF(d_model, d_inner, dropout, pre_lnorm)

    def forward(self, dec_inp: Tensor, r: Tensor, r_w_bias: Tensor, r_r_bias: Tensor, dec_attn_mask: Tensor,
                mems: Optional[Tensor]) -> Tensor:
        return self.pos_ff(self.dec_attn(dec_inp, r, r_w_bias, r_r_bias, attn_mask=dec_attn_mask, mems=mems))


class OriginalMemTransformerLM(nn.Module):
    """``MemTransformerLM`` (attn_type 0) around our embedding (``word_emb``) and adaptive softmax (``crit``).

    ``forward(data (T, B), mems)`` -> (hidden (T, B, C), new_mems): ``mems`` is None when mem_len is 0, else a list
    of n_layer + 1 tensors (M, B, C) (``init_mems``)."""

    def __init__(self, word_emb: nn.Module, crit: nn.Module, n_layer: int, n_head: int, d_model: int, d_head: int,
                 d_inner: int, dropout: float, dropatt: float, pre_lnorm: bool, mem_len: int, same_length: bool,
                 clamp_len: int) -> None:
        super().__init__()
        self.word_emb, self.crit = word_emb, crit
        self.d_model, self.n_layer = d_model, n_layer
        self.mem_len, self.ext_len, self.same_length, self.clamp_len = mem_len, 0, same_length, clamp_len
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            OriginalDecoderLayer(n_head, d_model, d_head, d_inner, dropout, dropatt, pre_lnorm)
            for _ in range(n_layer))
        self.r_w_bias = nn.Parameter(torch.zeros(n_head, d_head))
        self.r_r_bias = nn.Parameter(torch.zeros(n_head, d_head))
        inv_freq = 1 / (10000 ** (torch.arange(0.0, d_model, 2.0) / d_model))  # (C/2,) PositionalEmbedding
        self.register_buffer("inv_freq", inv_freq)

    def init_mems(self, bsz: int) -> Optional[List[Tensor]]:
        if self.mem_len <= 0:
            return None
        param = next(self.parameters())
        return [torch.empty(0, bsz, self.d_model, dtype=param.dtype, device=param.device)
                for _ in range(self.n_layer + 1)]

    def _update_mems(self, hids: List[Tensor], mems: Optional[List[Tensor]], qlen: int,
                     mlen: int) -> Optional[List[Tensor]]:
        if mems is None:
            return None
        with torch.no_grad():
            end_idx = mlen + max(0, qlen - 0 - self.ext_len)
            beg_idx = max(0, end_idx - self.mem_len)
            return [torch.cat([m, h], dim=0)[beg_idx:end_idx].detach() for m, h in zip(mems, hids)]

    def _pos_emb(self, klen: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        pos_seq = torch.arange(klen - 1, -1, -1.0, device=device, dtype=dtype)  # (S,) descending distances
        if self.clamp_len > 0:
            pos_seq.clamp_(max=self.clamp_len)
        sinusoid_inp = torch.outer(pos_seq, self.inv_freq.to(pos_seq.dtype))  # (S, C/2)
        return torch.cat([sinusoid_inp.sin(), sinusoid_inp.cos()], dim=-1)[:, None, :]  # (S, 1, C)

    def forward(self, dec_inp: Tensor, mems: Optional[List[Tensor]] = None
                ) -> Tuple[Tensor, Optional[List[Tensor]]]:
        qlen, _ = dec_inp.size()
        word_emb = self.word_emb(dec_inp)  # (T, B, C)
        mlen = mems[0].size(0) if mems is not None else 0
        klen = mlen + qlen
        all_ones = torch.ones(qlen, klen, dtype=torch.bool, device=word_emb.device)
        if self.same_length:
            mask_len = klen - self.mem_len
            mask_shift_len = qlen - mask_len if mask_len > 0 else qlen
            dec_attn_mask = (torch.triu(all_ones, 1 + mlen) | torch.tril(all_ones, -mask_shift_len))[:, :, None]
        else:
            dec_attn_mask = torch.triu(all_ones, diagonal=1 + mlen)[:, :, None]  # (T, S, 1)

        pos_emb = self.drop(self._pos_emb(klen, word_emb.dtype, word_emb.device))  # (S, 1, C)
        core_out = self.drop(word_emb)  # (T, B, C)
        hids = [core_out]
        for i, layer in enumerate(self.layers):
            core_out = layer(core_out, pos_emb, self.r_w_bias, self.r_r_bias, dec_attn_mask,
                             None if mems is None else mems[i])
            hids.append(core_out)
        core_out = self.drop(core_out)
        return core_out, self._update_mems(hids, mems, qlen, mlen)


def copy_weights_(original: OriginalMemTransformerLM, decoder: nn.Module) -> None:
    """Load our ``TransformerXLDecoder``'s layer-stack parameters into the original layout (spec §7 key map)."""
    with torch.no_grad():
        for ours, theirs in zip(decoder.layers, original.layers):
            attn = ours.self_attn
            theirs.dec_attn.qkv_net.weight.copy_(attn.qkv_proj.weight)
            theirs.dec_attn.r_net.weight.copy_(attn.r_proj.weight)
            theirs.dec_attn.o_net.weight.copy_(attn.out_proj.weight)
            theirs.dec_attn.layer_norm.load_state_dict(ours.self_attn_layer_norm.state_dict())
            theirs.pos_ff.CoreNet[0].load_state_dict(ours.fc1.state_dict())
            theirs.pos_ff.CoreNet[3].load_state_dict(ours.fc2.state_dict())
            theirs.pos_ff.layer_norm.load_state_dict(ours.final_layer_norm.state_dict())
        original.r_w_bias.copy_(decoder.content_bias)
        original.r_r_bias.copy_(decoder.position_bias)
        # our buffer is computed in float64 (the original's in float32); take it with its dtype
        original.register_buffer("inv_freq", decoder.positions.inv_freq.detach().clone())


def build_original(model_cfg, decoder: nn.Module) -> OriginalMemTransformerLM:
    """The original layer stack with our decoder's embedding, softmax and weights (config from ``cfg.model``)."""
    if model_cfg.untie_r:
        raise ValueError("the original PyTorch code shares r_w_bias / r_r_bias across layers; --untie-r has no "
                         "original counterpart")
    if model_cfg.same_length and str(model_cfg.same_length_convention) != "original":
        raise ValueError("the original code implements only --same-length-convention original")
    dim, heads = model_cfg.decoder_embed_dim, model_cfg.decoder_attention_heads
    original = OriginalMemTransformerLM(
        decoder.embed_tokens, decoder.adaptive_softmax, n_layer=model_cfg.decoder_layers, n_head=heads,
        d_model=dim, d_head=model_cfg.decoder_attention_head_dim or dim // heads,
        d_inner=model_cfg.decoder_ffn_embed_dim, dropout=model_cfg.dropout, dropatt=model_cfg.attention_dropout,
        pre_lnorm=model_cfg.decoder_normalize_before, mem_len=model_cfg.mem_len, same_length=model_cfg.same_length,
        clamp_len=model_cfg.clamp_len)
    reference = next(decoder.parameters())
    original.to(device=reference.device, dtype=reference.dtype)  # the decoder's dtype before copying its weights
    copy_weights_(original, decoder)
    return original


def original_nll_sum(original: OriginalMemTransformerLM, hidden: Tensor, target: Tensor, pad: int) -> Tensor:
    """The ``lm_loss`` NLL (same code) over the original's hidden states (T, B, C) and targets (T, B)."""
    shim = SimpleNamespace(decoder=SimpleNamespace(adaptive_softmax=original.crit))
    return nll_sum(shim, (hidden, {}), target, pad)


class OriginalXLLoop(nn.Module):
    """The original ``train.py`` / ``eval.py`` loop around the stack: ``forward(src_tokens (B, T))`` reads the
    time-first copy, passes the memories returned by the previous call of the same mode (``mems = ret[1:]``) and
    returns the hidden states (T, B, C); ``reset()`` drops them (``init_mems``)."""

    def __init__(self, stack: OriginalMemTransformerLM) -> None:
        super().__init__()
        self.stack = stack
        self.mems: dict = {}  # training mode -> memories (bench-only: the original keeps them in its loop)

    def forward(self, src_tokens: Tensor) -> Tensor:
        mems = self.mems.get(self.training)
        if mems is None:
            mems = self.stack.init_mems(src_tokens.size(0))
        hidden, self.mems[self.training] = self.stack(src_tokens.t().contiguous(), mems)  # (T, B, C)
        return hidden

    def reset(self) -> None:
        self.mems = {}


def wrap_original(model_cfg, decoder: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """(loop, adaptive softmax) for ``originals.OriginalLM``: the original stack with ``decoder``'s weights."""
    stack = build_original(model_cfg, decoder)
    return OriginalXLLoop(stack), stack.crit
