"""Checkpoints survive interruption, and nothing is written under ``--no-save``.

fairseq 0.12.3.1 behaviour this module replaces (measured: Ctrl-C 0.5 s into saving a 400 MB checkpoint left a 570 MB
``checkpoint_1_5.pt`` that does not load, logged "Saved checkpoint" and trained on):

* ``checkpoint_utils.torch_persistent_save`` writes ``<file>.tmp`` and renames it, but retries a failed ``torch.save``
  up to 3 times on the *same open handle*; a Ctrl-C inside ``torch.save`` surfaces as a RuntimeError, the retry
  appends a second copy, and the corrupt file is renamed into place. Here: one attempt into a fresh temporary file
  in the target directory, flushed and fsynced, then ``os.replace``; on any failure the temporary file is removed,
  the error propagates and the previous file is untouched.
* ``PathManager.copy`` (``checkpoint_last.pt`` and ``checkpoint_best.pt`` are copies of the first file written) is
  ``shutil.copyfile`` in place: an interrupted copy leaves a truncated ``checkpoint_last.pt``. Here: copy into a
  temporary file, then rename.
* Ctrl-C (SIGINT) while ``checkpoint_utils.save_checkpoint`` runs is deferred: the save completes, every file
  atomically, then ``KeyboardInterrupt`` is raised, so the run exits non-zero and its newest checkpoint loads. A
  second Ctrl-C aborts at once (the files being written are discarded; the previous ones stay).
* ``Trainer.save_checkpoint`` also writes ``crash.pt`` (after an exception or non-finite gradients) under
  ``--no-save``; here ``--no-save`` writes no file at all.
* fairseq gives a task no hook that runs on every data-parallel rank before a save (only the saving rank builds the
  state dict). State that lives on every rank (``streaming_lm``'s carried training streams) is collected by the
  task's ``gather_for_checkpoint(model, group)``, called here on every rank before the save when there are several
  workers.

* An optimizer state saved for another set of parameter tensors (a checkpoint of an older fairseq_ext whose
  Transformer-XL had separate q/k/v projections, or of another ``--arch``) made torch raise "loaded state dict
  contains a parameter group that doesn't match the size of optimizer's group" from deep inside the trainer. Here it
  is a one-line error naming the fix, ``--reset-optimizer`` (the model weights themselves load and are upgraded).

Remote paths (fairseq's ioPath ``PathManager``) keep fairseq's own code.
"""
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from types import FrameType
from typing import Any, Callable, Iterator, List, Optional

import torch
from fairseq import checkpoint_utils
from fairseq import trainer as fairseq_trainer
from fairseq.file_io import PathManager
from fairseq.optim import FairseqOptimizer

from fairseq_ext.errors import ConfigError

logger = logging.getLogger(__name__)

_fairseq_torch_persistent_save = checkpoint_utils.torch_persistent_save
_fairseq_save_checkpoint = checkpoint_utils.save_checkpoint
_fairseq_copy = PathManager.copy
_fairseq_trainer_save_checkpoint = fairseq_trainer.Trainer.save_checkpoint
_fairseq_optimizer_load_state_dict = FairseqOptimizer.load_state_dict


def _is_local(path: str) -> bool:
    return not PathManager.path_requires_pathmanager(path)


@contextlib.contextmanager
def _temporary_sibling(path: str) -> Iterator[str]:
    """A fresh temporary file name next to ``path``, renamed onto ``path`` on success, removed on failure."""
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # the mode open() would give, not mkstemp's 0600
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_torch_save(obj: Any, filename: str) -> None:
    """``torch.save(obj, filename)`` so that ``filename`` is either the old file or the complete new one."""
    with _temporary_sibling(filename) as temporary:
        with open(temporary, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def torch_persistent_save(obj: Any, filename: str, async_write: bool = False) -> None:
    if async_write or not isinstance(filename, str) or not _is_local(filename):
        return _fairseq_torch_persistent_save(obj, filename, async_write=async_write)
    atomic_torch_save(obj, filename)


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    """``PathManager.copy`` that never leaves a partial ``dst_path``."""
    if not (_is_local(src_path) and _is_local(dst_path)):
        return _fairseq_copy(src_path, dst_path, overwrite=overwrite)
    if os.path.exists(dst_path) and not overwrite:
        raise FileExistsError(f"{dst_path} exists (copy without overwrite)")
    with _temporary_sibling(dst_path) as temporary:
        shutil.copyfile(src_path, temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
    return True


@contextlib.contextmanager
def deferred_interrupt(what: str) -> Iterator[None]:
    """Hold back a first SIGINT until the block ends, then raise KeyboardInterrupt; a second one interrupts at once.
    Only in the main thread (signal handlers cannot be installed elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []

    def handler(signum: int, frame: Optional[FrameType]) -> None:
        received.append(signum)
        if len(received) > 1:
            raise KeyboardInterrupt(f"interrupted again while {what}: aborted; the previous files are intact")
        logger.warning("interrupt received while %s: finishing it, then stopping (interrupt again to abort now)",
                       what)

    previous: Any = signal.signal(signal.SIGINT, handler)
    try:
        yield
    except BaseException as error:  # torch.save turns an interrupt inside its writer into a RuntimeError
        if received:
            raise KeyboardInterrupt(f"interrupted again while {what}: aborted; the previous files are intact") \
                from error
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt(f"interrupted while {what}; the checkpoints were written completely")


def save_checkpoint(cfg: Any, trainer: Any, epoch_itr: Any, val_loss: Optional[float]) -> Optional[str]:
    """fairseq's ``checkpoint_utils.save_checkpoint``, run on every rank: gathers the task's per-rank state first,
    and defers Ctrl-C until every file is written."""
    gather: Optional[Callable[..., None]] = getattr(trainer.task, "gather_for_checkpoint", None)
    if not cfg.no_save and gather is not None and trainer.data_parallel_world_size > 1:
        gather(trainer.get_model(), trainer.data_parallel_process_group)
    with deferred_interrupt("writing checkpoints"):
        return _fairseq_save_checkpoint(cfg, trainer, epoch_itr, val_loss)


def trainer_save_checkpoint(self: fairseq_trainer.Trainer, filename: str, extra_state: Any) -> Optional[str]:
    """``Trainer.save_checkpoint`` (also used for ``crash.pt``) writing nothing under ``--no-save``."""
    if self.cfg.checkpoint.no_save:
        logger.info("--no-save: not writing %s", filename)
        return None
    return _fairseq_trainer_save_checkpoint(self, filename, extra_state)


def optimizer_load_state_dict(self: FairseqOptimizer, state_dict: Any,
                              optimizer_overrides: Optional[Any] = None) -> None:
    """``FairseqOptimizer.load_state_dict`` with a clear error when the saved state has other parameter tensors."""
    try:
        _fairseq_optimizer_load_state_dict(self, state_dict, optimizer_overrides)
    except ValueError as err:
        if "doesn't match the size" not in str(err):
            raise
        raise ConfigError(
            "the checkpoint's optimizer state was saved for another set of parameter tensors than this model has "
            "(a checkpoint of an older fairseq_ext, e.g. Transformer-XL before its q/k/v projections became one "
            "qkv_proj tensor, or of another --arch). The model weights load; resume with --reset-optimizer to start "
            "the optimizer state afresh") from err


def apply() -> None:
    checkpoint_utils.torch_persistent_save = torch_persistent_save
    checkpoint_utils.save_checkpoint = save_checkpoint
    PathManager.copy = staticmethod(atomic_copy)
    fairseq_trainer.Trainer.save_checkpoint = trainer_save_checkpoint
    FairseqOptimizer.load_state_dict = optimizer_load_state_dict
