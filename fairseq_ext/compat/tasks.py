"""fairseq's ``language_modeling`` task (ALiBi's, and stock ``transformer_lm``'s) refuses a data dictionary that
differs from the checkpoint's, like ``streaming_lm`` does.

``LanguageModelingTask`` records nothing about its dictionary, so evaluating or resuming on data binarised with
another dictionary of the same size silently scores the wrong symbols (ALiBi: 14.06 instead of 13.00 bits). Its
``__init__`` now records the fingerprint, and ``load_state_dict`` / ``set_checkpoint_dict`` check it
(``fairseq_ext.tasks.dictionary_check``).
"""
from typing import Any, Dict

from fairseq import utils
from fairseq.tasks import FairseqTask
from fairseq.tasks.language_modeling import LanguageModelingTask

from fairseq_ext.tasks.dictionary_check import STATE_KEY, DictionaryCheckedTask, check_dictionary

_fairseq_init = LanguageModelingTask.__init__


def _init(self: LanguageModelingTask, args: Any, dictionary: Any, output_dictionary: Any = None,
          targets: Any = None) -> None:
    _fairseq_init(self, args, dictionary, output_dictionary, targets)
    DictionaryCheckedTask.remember_dictionary(self)


def _data_path(self: LanguageModelingTask) -> str:
    return utils.split_paths(self.args.data)[0]


def _load_state_dict(self: LanguageModelingTask, state_dict: Dict[str, Any]) -> None:
    check_dictionary(state_dict.get(STATE_KEY), self.dictionary, self.data_path)
    FairseqTask.load_state_dict(self, state_dict)


def apply() -> None:
    task = LanguageModelingTask
    task.__init__ = _init
    task.data_path = property(_data_path)
    task.load_state_dict = _load_state_dict
    task.get_checkpoint_dict = DictionaryCheckedTask.get_checkpoint_dict
    task.set_checkpoint_dict = DictionaryCheckedTask.set_checkpoint_dict
