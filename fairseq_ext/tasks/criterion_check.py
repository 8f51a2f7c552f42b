"""Models whose modules add an auxiliary loss or log their own statistics (``aux_loss()`` / ``log_stats()``: the
adaptive-span penalty and spans) are read only by ``--criterion lm_loss``; any other criterion would train them
silently without the penalty and the span logs, so the run is refused before it starts."""
from typing import List

from torch import nn

from fairseq_ext.errors import ConfigError

CRITERION = "lm_loss"


def lm_loss_terms(model: nn.Module) -> List[str]:
    """The module classes of ``model`` that only ``lm_loss`` reads (sorted, unique): every module with an
    ``aux_loss`` (e.g. an adaptive span mask, even with coefficient 0: its spans are logged), and every module whose
    ``log_stats()`` reports something (a softmax mixer without a span reports nothing)."""
    return sorted({type(m).__name__ for m in model.modules()
                   if callable(getattr(m, "aux_loss", None))
                   or (callable(getattr(m, "log_stats", None)) and m.log_stats())})


def check_criterion(model_name: str, terms: List[str], criterion: nn.Module) -> None:
    """Refuse a criterion other than lm_loss for a model with such terms."""
    if terms and type(criterion).__name__ != "LMLossCriterion":
        raise ConfigError(f"{model_name} has auxiliary losses or statistics ({', '.join(terms)}: e.g. the adaptive "
                          f"span penalty and the span logs) that only --criterion {CRITERION} adds; "
                          f"{type(criterion).__name__} would train without them. Pass --criterion {CRITERION}")
