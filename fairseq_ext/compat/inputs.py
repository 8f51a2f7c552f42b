"""Bad input files give one line naming the fix: binarised splits and checkpoints are checked when opened.

* ``fairseq.data.indexed_dataset.make_dataset`` -- every ``data_utils.load_indexed_dataset``, i.e. ``--task
  streaming_lm`` and fairseq's ``language_modeling`` in fairseq-train, -eval-lm and -validate. fairseq opens a split
  without checking it: a truncated ``.bin``, a corrupt ``.idx`` or out-of-range token ids end in ``buffer is smaller
  than requested size``, a bare ``AssertionError``, a broadcast error or an ``IndexError`` in the embedding. The
  wrapper checks the files first (``fairseq_ext.data.binarized``: header, element type, line lengths against byte
  offsets and the ``.bin`` length; O(lines) numpy) and, when the caller passes the dictionary, makes every item read
  check its ids against it. Failures are ``DataError`` naming the file and how to rebuild it.
* ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` -- fairseq-eval-lm, -validate, -generate and fairseq-train's
  ``--restore-file`` / ``--finetune-from-model``. An empty file gives ``EOFError``, a text file ``IndexError: pop
  from empty list`` (``KeyError`` with older torch), a truncated one a miniz error. Here the file is sniffed before
  torch reads it, torch's errors for damaged files are translated, and what was loaded must be a fairseq checkpoint
  (a dict with ``model`` and ``cfg`` or ``args``): ``DataError`` "<path> is not a PyTorch checkpoint (...); pass
  ...". ``check_torch_file`` and ``damaged_file_errors`` do the same for the converters' own loading
  (``fairseq_ext/convert``), which name the file their source project writes.
"""
import io
import os
import pickle
import zipfile
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

import torch
from fairseq import checkpoint_utils
from fairseq.data import indexed_dataset

from fairseq_ext.data.binarized import check_binarized_split, with_token_checks
from fairseq_ext.errors import DataError, UserError

FAIRSEQ_CHECKPOINT = ("the checkpoint file written by fairseq-train (e.g. checkpoints/checkpoint_best.pt) or by "
                      "scripts/convert_*_checkpoint.py")
CONVERT_FIRST = "a checkpoint of another code base is converted first with scripts/convert_<model>_checkpoint.py"
DAMAGED = "an interrupted save, download or copy? Copy it again or use another checkpoint"
ZIP_MAGIC = b"PK\x03\x04"
WEIGHTS_ONLY_REFUSAL = "Weights only load failed"
DAMAGED_MESSAGES = ("PytorchStreamReader", "unexpected EOF", "corrupt", "Invalid magic number", "invalid load key",
                    "pickle data was truncated", "unpickling stack underflow")


# ======================================================================================================================
# Torch files
# ======================================================================================================================
class _NoGlobals(pickle.Unpickler):
    """Reads a pickle's first object without importing anything (for sniffing the legacy header)."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name}")


def _not_a_checkpoint(path: str, reason: str, expected: str) -> DataError:
    return DataError(f"{path} is not a PyTorch checkpoint ({reason}); pass {expected}")


def _as_text(head: bytes) -> Optional[str]:
    """``head`` as UTF-8 text (a character cut at the end of the read is dropped), or None."""
    for cut in range(4):
        try:
            return head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


def _describe_bytes(head: bytes) -> str:
    text = _as_text(head)
    if text is not None and all(c.isprintable() or c.isspace() for c in text):
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"a text file starting with {first!r}"
    return f"it starts with bytes {head[:8].hex(' ')}: neither torch.save's zip archive nor its legacy pickle"


def check_torch_file(path: str, expected: str) -> None:
    """Raise ``DataError`` ("<path> is not a PyTorch checkpoint (why); pass ``expected``") unless ``path`` looks like
    a file written by ``torch.save``: a zip archive with a ``data.pkl`` record and an intact central directory, or a
    legacy pickle that starts with torch's magic number. Reads the header and the zip directory only."""
    if os.path.isdir(path):
        raise _not_a_checkpoint(path, "a directory", expected)
    size = os.path.getsize(path)
    if size == 0:
        raise _not_a_checkpoint(path, "an empty file, 0 bytes", expected)
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise _not_a_checkpoint(path, f"a truncated or damaged zip archive of {size:,} bytes: {DAMAGED}",
                                    expected) from err
        if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            raise _not_a_checkpoint(path, "a zip archive without torch.save's data.pkl record", expected)
        return
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        try:
            first = _NoGlobals(io.BytesIO(head)).load()
        except Exception:  # noqa: BLE001  (any failure: the file does not start with torch's magic number)
            first = None
        if first != torch.serialization.MAGIC_NUMBER:
            raise _not_a_checkpoint(path, "a plain Python pickle, not written by torch.save", expected)
        return
    raise _not_a_checkpoint(path, _describe_bytes(head), expected)


def is_weights_only_refusal(error: BaseException) -> bool:
    """Whether ``error`` is torch's weights-only unpickler refusing a class (the file itself is intact)."""
    return isinstance(error, pickle.UnpicklingError) and str(error).startswith(WEIGHTS_ONLY_REFUSAL)


def weights_only_reason(error: BaseException) -> str:
    """The line of torch's weights-only refusal that names what was refused."""
    for line in str(error).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". Please use", 1)[0].strip()[:200]
    return str(error).splitlines()[0][:200]


@contextmanager
def damaged_file_errors(path: str, expected: str) -> Iterator[None]:
    """Around ``torch.load(path)``: the errors torch raises for a truncated or damaged file become ``DataError``;
    a weights-only refusal and every other error pass unchanged."""
    try:
        yield
    except UserError:
        raise
    except (EOFError, pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile) as err:
        if is_weights_only_refusal(err):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, RuntimeError) and not any(m in str(err) for m in DAMAGED_MESSAGES):
            raise
        raise _not_a_checkpoint(path, f"truncated or damaged: {message[:160]}; {DAMAGED}", expected) from err


# ======================================================================================================================
# fairseq's checkpoint loading
# ======================================================================================================================
def _describe_object(state: Any) -> str:
    if isinstance(state, dict):
        keys = sorted(map(str, state))
        return f"a dict with keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"
    if isinstance(state, (list, tuple)):
        return f"a {type(state).__name__} of {len(state)} items"
    return f"a {type(state).__name__}"


def is_fairseq_state(state: Any) -> bool:
    """Whether a loaded object has what fairseq's loading reads: the weights, a config and the training history
    (``best_loss`` in checkpoints older than ``optimizer_history``)."""
    return (isinstance(state, dict) and "model" in state
            and (state.get("cfg") is not None or state.get("args") is not None)
            and ("optimizer_history" in state or "best_loss" in state))


def not_fairseq_error(path: str, state: Any) -> DataError:
    """The error for ``path`` holding ``state``, which is no fairseq checkpoint."""
    return DataError(f"{path} is not a fairseq checkpoint (it holds {_describe_object(state)}, not a dict with "
                     f"'model', 'cfg' and 'optimizer_history'); pass {FAIRSEQ_CHECKPOINT} ({CONVERT_FIRST})")


_fairseq_load_checkpoint_to_cpu = checkpoint_utils.load_checkpoint_to_cpu


def load_checkpoint_to_cpu(path: str, arg_overrides: Optional[Dict[str, Any]] = None,
                           load_on_all_ranks: bool = False) -> Dict[str, Any]:
    """fairseq's ``load_checkpoint_to_cpu`` for files that are fairseq checkpoints; ``DataError`` for others."""
    local = os.path.exists(path)  # remote paths (PathManager) are left to fairseq
    if local:
        check_torch_file(path, FAIRSEQ_CHECKPOINT)
    try:
        with damaged_file_errors(path, FAIRSEQ_CHECKPOINT):
            state = _fairseq_load_checkpoint_to_cpu(path, arg_overrides, load_on_all_ranks)
    except UserError:
        raise
    except pickle.UnpicklingError as err:
        if not is_weights_only_refusal(err):
            raise
        raise DataError(f"{path} is not a checkpoint fairseq can load: it pickles Python objects that torch's "
                        f"weights-only loader refuses ({weights_only_reason(err)}); pass {FAIRSEQ_CHECKPOINT} "
                        f"({CONVERT_FIRST})") from err
    except Exception as err:  # fairseq's post-processing failed: was the file a fairseq checkpoint at all?
        if local:
            _raise_if_not_fairseq(path, err)
        raise
    if not is_fairseq_state(state):
        raise not_fairseq_error(path, state)
    return state


def _raise_if_not_fairseq(path: str, error: Exception) -> None:
    """After fairseq failed on ``path`` with ``error``: ``DataError`` from ``error`` if the file holds something
    other than a fairseq checkpoint (read again, weights only; this runs on the error path only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (unreadable again: keep fairseq's own error)
        return
    if not is_fairseq_state(state):
        raise not_fairseq_error(path, state) from error


# ======================================================================================================================
# fairseq's indexed datasets
# ======================================================================================================================
_fairseq_make_dataset = indexed_dataset.make_dataset


def make_dataset(path: str, impl: Optional[str], fix_lua_indexing: bool = False, dictionary: Any = None) -> Any:
    """fairseq's ``make_dataset`` after ``check_binarized_split``; items checked against ``dictionary`` if given."""
    if impl in ("mmap", "lazy", "cached") and os.path.isfile(indexed_dataset.index_file_path(path)):
        if not os.path.isfile(indexed_dataset.data_file_path(path)):
            raise DataError(f"{indexed_dataset.index_file_path(path)} has no {os.path.basename(path)}.bin beside it: "
                            f"the split is incomplete; binarise it again with fairseq-preprocess "
                            f"(scripts/prepare-<corpus>.sh), or copy the data directory again")
        check_binarized_split(path, impl)
    dataset = _fairseq_make_dataset(path, impl, fix_lua_indexing=fix_lua_indexing, dictionary=dictionary)
    if dataset is not None and dictionary is not None:
        with_token_checks(dataset, len(dictionary))
    return dataset


def apply() -> None:
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    indexed_dataset.make_dataset = make_dataset
