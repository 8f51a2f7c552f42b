"""The time a sliding-window evaluation will take, logged before it starts (``fairseq-eval-lm --context-window C``
with ``--task language_modeling``). Every block of S targets is read in a window of up to L = S + C tokens, one
forward pass per block (fairseq-eval-lm sets ``tokens_per_sample`` to S = T - C). That is slow at small strides: the
fast-weight paper's protocol has S = 1, one pass per scored token. The estimate times one forward pass of a
(batch, L) window on the model's device and in its dtype, and multiplies by the number of batches of windows."""
import logging
import math
import os
import time
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def log_sliding_estimate(model: nn.Module, cfg: Any) -> None:
    """After fairseq-eval-lm has reduced ``tokens_per_sample`` to the stride S (its convention), and before it reads
    the split: windows of L = S + C tokens, one per block of S targets."""
    from fairseq.data import data_utils

    task, dataset = getattr(cfg, "task", None), getattr(cfg, "dataset", None)
    if task is None or dataset is None:  # not a fairseq-eval-lm config
        return
    window, stride = int(cfg.eval_lm.context_window), int(task.tokens_per_sample)
    if window <= 0 or stride < 1:
        return
    try:
        split = data_utils.load_indexed_dataset(os.path.join(str(task.data).split(":")[0], dataset.gen_subset), None)
    except Exception:  # noqa: BLE001  (fairseq reports a missing or damaged split itself)
        return
    if split is None:
        return
    tokens, length = int(split.sizes.sum()), stride + window
    batch = max(1, int(dataset.batch_size or 1))
    parameter = next(model.parameters())
    vocab = len(model.decoder.dictionary)
    sample = torch.randint(4, vocab, (batch, length), device=parameter.device)  # real symbols, no pad
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(sample)  # warm-up
        start = time.perf_counter()
        model(sample)
        seconds = time.perf_counter() - start
    model.train(was_training)
    if hasattr(model, "reset_state"):  # a StatefulLanguageModel: the timing windows leave nothing behind
        model.reset_state()
    batches = math.ceil(math.ceil(tokens / stride) / batch)
    logger.warning("sliding(L=%d, S=%d) over %s tokens: %s batches of %d windows (%.3gx the work of nonoverlap(L=%d)), "
                   "%.3f s each here: about %s", length, stride, f"{tokens:,}", f"{batches:,}", batch,
                   length / stride, length, seconds, _duration(batches * seconds))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
