"""The data dictionary a model was trained with travels in its checkpoints; a different one is refused.

A language model's output row i means symbol i of the dictionary it was trained with. Evaluating (or resuming
training) on data binarised with another dictionary of the same size silently scores the wrong symbols (ALiBi on
WikiText-103: 14.06 instead of 13.00 bits with a reordered dictionary). fairseq records no dictionary in its
checkpoints, so tasks mixing in ``DictionaryCheckedTask`` record a fingerprint (size + SHA-1 of the symbol list) in
two places and compare it with the data directory's dictionary whenever a checkpoint is read:

* the task state (``task_state``; read by ``checkpoint_utils.load_model_ensemble_and_task``, i.e. fairseq-eval-lm,
  -validate, -generate, -interactive);
* the extra state under the task's class name (``get_checkpoint_dict`` / ``set_checkpoint_dict``; read when
  fairseq-train resumes, which ignores the task state). ``--finetune-from-model`` resets the data loader, and
  fairseq then reads no task state: fine-tuning is not checked.

Checkpoints without a fingerprint (converted from other code bases, or older) load unchecked.
"""
import hashlib
from typing import Any, Dict, Optional

from fairseq.data import Dictionary

from fairseq_ext.errors import DataError

STATE_KEY = "dictionary_fingerprint"


def dictionary_fingerprint(dictionary: Dictionary) -> Dict[str, Any]:
    """Size and SHA-1 of the symbol list: enough to tell two dictionaries apart."""
    digest = hashlib.sha1("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()
    return {"size": len(dictionary), "sha1": digest}


def check_dictionary(saved: Optional[Dict[str, Any]], dictionary: Dictionary, data: str) -> None:
    """Raise DataError when a checkpoint's fingerprint ``saved`` (None: unknown, accepted) differs from
    ``dictionary``, the dictionary of data directory ``data``."""
    current = dictionary_fingerprint(dictionary)
    if saved is None or saved == current:
        return
    raise DataError(
        f"dictionary mismatch: the checkpoint was trained with a dictionary of {saved['size']} types "
        f"(sha1 {saved['sha1'][:12]}), but {data}/dict.txt has {current['size']} types (sha1 "
        f"{current['sha1'][:12]}); binarise the data with the training dictionary (fairseq-preprocess --srcdict "
        f"<training data dir>/dict.txt)")


class DictionaryCheckedTask:
    """Mixin for a FairseqTask with ``self.dictionary`` and ``self.data_path``: call ``remember_dictionary()`` in
    ``__init__``; ``load_state_dict`` and ``set_checkpoint_dict`` then refuse another dictionary."""

    dictionary: Dictionary

    @property
    def data_path(self) -> str:
        raise NotImplementedError

    def remember_dictionary(self) -> None:
        self.state.merge_state_dict({STATE_KEY: dictionary_fingerprint(self.dictionary)})

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """A checkpoint's task state (evaluation, generation): refuse another dictionary, then merge."""
        check_dictionary(state_dict.get(STATE_KEY), self.dictionary, self.data_path)
        super().load_state_dict(state_dict)

    def get_checkpoint_dict(self) -> Dict[str, Dict[str, Any]]:
        """fairseq-train's per-task extra state (``extra_state[<task class name>]``)."""
        return {type(self).__name__: {STATE_KEY: dictionary_fingerprint(self.dictionary)}}

    def set_checkpoint_dict(self, state: Dict[str, Any]) -> None:
        """fairseq-train resuming: refuse another dictionary."""
        check_dictionary(state.get(STATE_KEY), self.dictionary, self.data_path)
