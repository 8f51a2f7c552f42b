"""``lm_loss``: summed LM negative log-likelihood over the full or adaptive softmax, plus modules' auxiliary terms.

* NLL: ``-sum log p(target)`` over every non-pad target, in nats. With the decoder's ``adaptive_softmax`` it is
  the head cross-entropy (pad ignored) plus each tail cluster's cross-entropy. Unlike fairseq's ``adaptive_loss``,
  tail clusters ignore nothing: their targets are shifted by the cluster's cutoff, so ``ignore_index=pad`` there
  would silently drop the loss of token ``cutoff_i + pad`` (pad targets never leave the head).
* Auxiliary terms: every module of the model that defines ``aux_loss() -> Optional[Tensor]`` contributes a scalar
  on the scale of the mean per-token loss (e.g. the adaptive-span penalty). The criterion adds
  ``aux * sample_size`` to the summed NLL, so after fairseq divides by the sample size the objective is
  ``mean NLL + sum of aux terms``, on every worker alike.
* Statistics: every module that defines ``log_stats() -> Dict[str, float | Tensor]`` is logged; values under the
  same key from several modules (e.g. one per layer) are averaged.

Logged: ``loss`` (optimised objective, base 2), ``nll_loss`` (bits per token), ``ppl`` (2 ** nll_loss),
``bits_per_token`` (= nll_loss at 4 decimals; on character- or byte-level corpora the papers' bpc), ``aux_loss``
(when any module has one) and the module statistics. All logging outputs are sums, so they can be summed across workers.
"""

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II
from torch import Tensor, nn

from fairseq_ext.ops.cross_entropy import cross_entropy_sum

STAT_PREFIX = "stat:"
STAT_COUNT = "stat_count"


@dataclass
class LMLossConfig(FairseqDataclass):
    sentence_avg: bool = II("optimization.sentence_avg")


def nll_sum(model: nn.Module, net_output: Tuple[Tensor, Dict[str, Any]], target: Tensor, pad: int) -> Tensor:
    """Summed NLL in nats of target (B, T) under the model's output; pad targets are ignored.

    ``ops.cross_entropy`` in float32 even under fp16/bf16 training, as the Transformer-XL code does for its
    clusters; from 8M logits on it forms no log-softmax tensor (blockwise log-sum-exp, the gradient written over the
    logits, which are this criterion's to consume). Full softmax: the logits are ``net_output[0]``, so a model's
    log-probabilities must be fairseq's default ``log_softmax(net_output[0])``."""
    adaptive = getattr(model.decoder, "adaptive_softmax", None)
    if adaptive is None:
        logits = net_output[0]  # (B, T, V)
        return cross_entropy_sum(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=pad,
                                 consume_logits=True)
    logits, targets = adaptive(net_output[0], target.reshape(-1))  # per cluster: (N_i, V_i), (N_i,)
    loss = cross_entropy_sum(logits[0], targets[0], ignore_index=pad, consume_logits=True)  # head: pad stays
    for cluster_logits, cluster_target in zip(logits[1:], targets[1:]):
        if cluster_target is not None:
            loss = loss + cross_entropy_sum(cluster_logits, cluster_target, consume_logits=True)
    return loss


def aux_loss(model: nn.Module) -> Optional[Tensor]:
    """Sum of ``aux_loss()`` over the model's modules that define it; None when none does (or all return None)."""
    terms = [term for module in model.modules() if callable(getattr(module, "aux_loss", None))
             for term in (module.aux_loss(),) if term is not None]
    return torch.stack([t.reshape(()) for t in terms]).sum() if terms else None


def module_stats(model: nn.Module) -> Dict[str, float]:
    """``log_stats()`` of every module that defines it; values under the same key are averaged."""
    values: Dict[str, List[float]] = defaultdict(list)
    for module in model.modules():
        if callable(getattr(module, "log_stats", None)):
            for key, value in module.log_stats().items():
                values[key].append(utils.item(value.detach()) if torch.is_tensor(value) else float(value))
    return {key: sum(v) / len(v) for key, v in values.items()}


@register_criterion("lm_loss", dataclass=LMLossConfig)
class LMLossCriterion(FairseqCriterion):
    def __init__(self, task, sentence_avg: bool) -> None:
        super().__init__(task)
        self.sentence_avg = sentence_avg

    def forward(self, model: nn.Module, sample: Dict[str, Any], reduce: bool = True
                ) -> Tuple[Tensor, int, Dict[str, Any]]:
        """Returns (loss to optimise, sample size it is divided by, logging output)."""
        if not reduce:
            raise ValueError("lm_loss only computes summed losses (reduce=True)")
        net_output = model(**sample["net_input"])
        target = model.get_targets(sample, net_output)  # (B, T)
        nll = nll_sum(model, net_output, target, self.padding_idx)
        ntokens = int(target.ne(self.padding_idx).sum())
        sample_size = target.size(0) if self.sentence_avg else ntokens
        logging_output: Dict[str, Any] = {"ntokens": ntokens, "nsentences": target.size(0),
                                          "sample_size": sample_size, "nll_loss": nll.data}
        loss = nll
        aux = aux_loss(model)
        if aux is not None:
            loss = loss + aux * sample_size
            logging_output["aux_loss"] = aux.data * sample_size
        logging_output["loss"] = loss.data
        stats = module_stats(model)
        if stats:
            logging_output[STAT_COUNT] = 1
            logging_output.update({STAT_PREFIX + key: value for key, value in stats.items()})
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs: List[Dict[str, Any]]) -> None:
        def total(key: str) -> float:
            return utils.item(sum(log.get(key, 0) for log in logging_outputs))

        sample_size, ntokens = total("sample_size"), total("ntokens")
        if sample_size > 0:
            metrics.log_scalar("loss", total("loss") / sample_size / math.log(2), sample_size, round=3)
            if any("aux_loss" in log for log in logging_outputs):
                metrics.log_scalar("aux_loss", total("aux_loss") / sample_size, sample_size, round=4)
        if ntokens > 0:
            metrics.log_scalar("nll_loss", total("nll_loss") / ntokens / math.log(2), ntokens, round=3)
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
            metrics.log_derived("bits_per_token", lambda meters: round(meters["nll_loss"].avg, 4))
        count = total(STAT_COUNT)
        if count > 0:
            keys = {key for log in logging_outputs for key in log if key.startswith(STAT_PREFIX)}
            for key in sorted(keys):
                metrics.log_scalar(key[len(STAT_PREFIX):], total(key) / count, count, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
