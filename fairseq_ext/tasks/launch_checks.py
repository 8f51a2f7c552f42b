"""Checks of a whole command's config that concern the tasks, run by the patched ``call_main`` (``compat.launch``,
``compat.CONFIG_CHECKS``) before any data is loaded:

* ``fairseq-train`` of a model that carries state across segments under a task other than ``streaming_lm`` is
  refused at once. Otherwise it fails only at the second batch, once the data is loaded and a step has run.
  Whether the configuration carries state is the model's own answer (``decoder.carries_state``), from a build on
  the meta device.
* ``fairseq-eval-lm --task language_modeling`` logs its protocol (``nonoverlap(L)`` or ``sliding(L, S)``), as
  ``streaming_lm`` logs ``stream(…)`` (its estimated duration is the model's: ``models/base/sliding_estimate.py``).
"""
import logging
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from fairseq_ext.compat.precision import command_module
from fairseq_ext.errors import ConfigError

logger = logging.getLogger(__name__)
TRAIN_MODULE, EVAL_LM_MODULE = "fairseq_cli.train", "fairseq_cli.eval_lm"


def memory_models_train_on_streams(cfg: DictConfig, main: Callable[..., Any]) -> None:
    from fairseq import tasks
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY

    from fairseq_ext.models.base import StatefulLanguageModel

    if command_module(main) != TRAIN_MODULE or cfg.task._name == "streaming_lm":
        return
    name = getattr(cfg.model, "_name", None)  # an --arch preset or a model name
    model_class = ARCH_MODEL_REGISTRY.get(name) or MODEL_REGISTRY.get(name)
    if model_class is None or not issubclass(model_class, StatefulLanguageModel):
        return
    try:
        task = tasks.setup_task(cfg.task)  # the dictionary only
        with torch.device("meta"):
            decoder = model_class.build_model(cfg.model, task).decoder
    except Exception:  # noqa: BLE001  (a bad config or missing data: fairseq-train reports it as it always does)
        return
    if decoder.carries_state:
        raise ConfigError(
            f"{model_class.__name__} carries state across segments (memory: {decoder.memory_description}), so it "
            f"trains only on contiguous streams: --task streaming_lm --batch-size B --tokens-per-sample T; "
            f"--task {cfg.task._name} batches unrelated blocks")


def language_modeling_protocol_label(cfg: DictConfig, main: Callable[..., Any]) -> None:
    if command_module(main) != EVAL_LM_MODULE or cfg.task._name != "language_modeling":
        return
    length, window = int(cfg.task.tokens_per_sample), int(cfg.eval_lm.context_window)
    label = f"sliding(L={length}, S={length - window})" if window > 0 else f"nonoverlap(L={length})"
    logger.info("evaluation protocol: %s", label)


def register() -> None:
    from fairseq_ext.compat import CONFIG_CHECKS

    for check in (memory_models_train_on_streams, language_modeling_protocol_label):
        if check not in CONFIG_CHECKS:
            CONFIG_CHECKS.append(check)
