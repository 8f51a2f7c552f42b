"""Dead vocabulary rows of a converted checkpoint: a fixed logit that training never sees.

A converter places an original vocabulary into a fairseq dictionary, whose specials (``<s>``, ``<pad>``, ``</s>``,
``<unk>``: ids 0..3) the original may lack. Those *dead* ids must keep a fixed, very low logit (the original could
never predict them), applied to the logits before the log-softmax:

    logits[..., v] = dead_logit        for every dead id v           (live columns untouched)

The trained output tensors hold **zeros** in the dead rows, and ``masked_fill`` gives those entries exactly zero
gradient, so no optimizer statistic sees them: ‖w‖ and ‖update‖ of LAMB's per-tensor trust ratio, Adagrad's
per-tensor gradient clip, Adam moments, weight decay and global gradient clipping are those of the original-layout
tensors (a zero row adds nothing to a norm or a sum). Statistics that divide by the element count (Adafactor's
parameter RMS) still count the zero rows.

Evaluation is bit-for-bit what a dead row stored inside the trained tensors gave before (zero output row, bias
``dead_logit``): ``0 · h + dead_logit`` is exactly ``dead_logit``, and the live columns are computed as before.
Checkpoints converted that way are upgraded on load (``upgrade_state_dict_named``). A model trained here has no dead
rows; the module then does nothing.
"""
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

SPECIAL_IDS = 4  # fairseq Dictionary ids 0..3 are the specials; only they can be dead
DEAD_LOGIT_MAX = -10.0  # a dead logit must give the dead ids no real probability


class DeadRows(nn.Module):
    """Buffers ``mask`` (V,) bool (the dead ids) and ``logit`` () (their fixed logit). ``bias`` and ``weight`` name
    the output bias (V,) and output matrix (V, d) relative to the parent module: where checkpoints converted before
    this module stored the dead rows (read by ``upgrade_state_dict_named``)."""

    def __init__(self, vocab_size: int, bias: str, weight: str) -> None:
        super().__init__()
        self.bias_name, self.weight_name = bias, weight
        self.register_buffer("mask", torch.zeros(vocab_size, dtype=torch.bool))  # (V,)
        self.register_buffer("logit", torch.zeros(()))  # ()
        self.active = False  # any dead row; derived from ``mask`` whenever it is set or loaded (no host sync per call)

    @torch.no_grad()
    def set_dead(self, ids: Sequence[int], logit: float) -> None:
        """Mark ``ids`` dead with the fixed ``logit`` (the converters' ``--dead-bias``)."""
        check_dead(ids, logit)
        self.mask.zero_()
        self.mask[list(ids)] = True
        self.logit.fill_(logit)
        self.active = bool(ids)

    def forward(self, logits: Tensor, columns: Optional[int] = None) -> Tensor:
        """logits (..., W) -> (..., W) with the dead columns set to the fixed logit. ``columns``: only the first
        ``columns`` logits are vocabulary ids 0..columns-1 (an adaptive softmax head: the shortlist, then one logit
        per tail cluster); default all W."""
        if not self.active:
            return logits
        mask = self.mask[:logits.size(-1) if columns is None else columns]  # (W',)
        if mask.numel() < logits.size(-1):
            mask = torch.cat([mask, mask.new_zeros(logits.size(-1) - mask.numel())])  # (W,)
        return logits.masked_fill(mask, self.logit)  # zero gradient into the dead columns

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.active = self.mask.is_meta or bool(self.mask.any())

    # ------------------------------------------------------------------------------------------------------
    def upgrade_state_dict_named(self, state_dict: Dict[str, Tensor], name: str) -> Dict[str, Tensor]:
        """Checkpoints without ``{name}.mask``: written before this module. A converted one stored each dead row in
        the trained tensors (an all-zero output row, bias = the dead logit <= ``DEAD_LOGIT_MAX``, among ids 0..3; a
        model trained here never has an exactly zero output row after a step): move the logit into the buffers
        and zero the bias rows. Any other checkpoint gets an empty mask."""
        prefix = name + "."
        if prefix + "mask" in state_dict:
            return state_dict
        parent = name.rpartition(".")[0]
        parent = parent + "." if parent else ""
        bias_key, weight_key = parent + self.bias_name, parent + self.weight_name
        mask = torch.zeros(self.mask.shape, dtype=torch.bool)  # load_state_dict copies it to the buffer's device
        logit = torch.zeros(())
        bias, weight = state_dict.get(bias_key), state_dict.get(weight_key)
        if bias is not None and weight is not None and bias.dim() == 1 and weight.dim() == 2:
            dead = stored_dead_rows(bias, weight)
            if dead:
                logit = bias[dead[0]].detach().clone().cpu()
                bias = bias.clone()
                bias[dead] = 0
                state_dict[bias_key] = bias
                mask[dead] = True
        state_dict[prefix + "mask"] = mask
        state_dict[prefix + "logit"] = logit.to(bias.dtype if bias is not None else logit.dtype)
        return state_dict


def stored_dead_rows(bias: Tensor, weight: Tensor) -> list:
    """Ids among 0..3 whose row a converter stored as dead inside the trained tensors: weight row all zeros, one
    common bias value <= ``DEAD_LOGIT_MAX``. bias (V,), weight (V, d)."""
    n = min(SPECIAL_IDS, bias.numel(), weight.size(0))
    dead = [i for i in range(n) if float(bias[i]) <= DEAD_LOGIT_MAX and not bool(weight[i].any())]
    if dead and not bool((bias[dead] == bias[dead[0]]).all()):
        return []  # a converter writes one value; anything else is not its dead rows
    return dead


def check_dead(ids: Sequence[int], logit: float) -> None:
    """Dead ids are fairseq specials (0..3) and their logit gives them no real probability."""
    if any(not 0 <= i < SPECIAL_IDS for i in ids):
        raise ValueError(f"dead ids {list(ids)}: only the fairseq specials 0..{SPECIAL_IDS - 1} can be dead")
    if ids and logit > DEAD_LOGIT_MAX:
        raise ValueError(f"dead logit {logit} would give the dead ids real probability (must be <= {DEAD_LOGIT_MAX})")


def dead_rows_state(prefix: str, vocab_size: int, ids: Sequence[int], logit: float) -> Dict[str, Tensor]:
    """The ``DeadRows`` buffers at ``prefix`` (e.g. ``decoder.dead_rows.``) as state-dict entries (converters)."""
    check_dead(ids, logit)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[list(ids)] = True
    return {prefix + "mask": mask, prefix + "logit": torch.tensor(float(logit) if ids else 0.0)}
