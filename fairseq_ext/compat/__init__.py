"""Shims for fairseq 0.12.3.1 (``fairseq-fixed``) bugs that break a documented flow, applied once at import.

Each submodule patches one area and says which fairseq function it wraps and why; every shim has a test that
fails without it (``tests/compat/``). ``apply()`` is idempotent: importing ``fairseq_ext`` twice (``--user-dir``
after a plain import) patches nothing twice.

* ``errors``     -- a ``fairseq_ext.errors.UserError`` reaching the top of a command prints one line, no traceback.
* ``precision``  -- ``--bf16`` without the implied ``--tpu``, flat ``--fp16`` master weights on CPU, ``--bf16`` at
                    inference (eval-lm, generate, interactive), ``--amp`` and ``fairseq-validate --bf16`` refused
                    where they would silently run in fp32.
* ``distributed``-- data-parallel training on CPU (DDP without device ids), fully_sharded refused where it cannot
                    run, multi-worker resume (weights_only broadcast), per-rank dropout seeds.
* ``checkpoints``-- atomic checkpoint files (no retry into the same handle, atomic copies), Ctrl-C deferred until a
                    save completes then a non-zero exit, nothing written under ``--no-save`` (crash.pt), and a
                    pre-save hook on every rank for the task's per-rank state.
* ``tasks``      -- fairseq's ``language_modeling`` refuses data binarised with another dictionary than the
                    checkpoint's (evaluation and resume), as ``streaming_lm`` does.
* ``inputs``     -- ``indexed_dataset.make_dataset`` and ``checkpoint_utils.load_checkpoint_to_cpu``: a truncated or
                    corrupt binarised split, or a file that is no checkpoint, is a ``DataError`` naming the file and
                    the fix (helpers ``check_torch_file`` / ``damaged_file_errors`` serve the converters).
* ``launch``     -- ``distributed_utils.call_main``: the entry point of every fairseq command; runs the config
                    checks of the other shims and of ``tasks/launch_checks.py`` (``CONFIG_CHECKS``) before anything
                    is loaded.
"""
from typing import Any, Callable, List

from omegaconf import DictConfig

# Functions (cfg, main) -> None run by the patched ``call_main`` on the whole config of a command (``main``: the
# command's main function, e.g. ``fairseq_cli.train.main``) before any process is started or model built; they may
# fix fields that fairseq derives wrongly or raise a ConfigError naming what works.
CONFIG_CHECKS: List[Callable[[DictConfig, Callable[..., Any]], None]] = []

_APPLIED = False


def apply() -> None:
    """Install every shim (once per process)."""
    global _APPLIED
    if _APPLIED:
        return
    from . import checkpoints, distributed, errors, inputs, launch, precision, tasks

    for module in (errors, precision, distributed, checkpoints, tasks, inputs, launch):
        module.apply()
    _APPLIED = True
