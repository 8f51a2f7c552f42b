"""Every converter's main() refuses a source file that is no torch checkpoint (empty, text, truncated) with one
DataError naming the file its original code writes; a missing file is a MissingFileError (fairseq_ext.compat.inputs
via convert/unpickle.load_pickled and convert/alibi_fork.load_checkpoint)."""
from typing import Callable, Dict, List

import pytest
import torch

from fairseq_ext.convert import adaptive_span, alibi_fork, fast_weight, sha_rnn, transformer_xl
from fairseq_ext.errors import DataError, MissingFileError


def args(module, src: str, tmp_path) -> List[str]:
    """Command lines that get as far as reading ``src``."""
    command = [src, str(tmp_path / "out"), "--trust-pickle"]
    if module in (adaptive_span, sha_rnn):  # they need the training text before reading the checkpoint
        train = tmp_path / "train.txt"
        train.write_text("a b\n")
        command += ["--train-txt", str(train)]
    return command


CONVERTERS = {"alibi": alibi_fork, "adaptive_span": adaptive_span, "fast_weight": fast_weight, "sha_rnn": sha_rnn,
              "transformer_xl": transformer_xl}
CONTENTS: Dict[str, Callable] = {
    "empty": lambda tmp: b"",
    "text": lambda tmp: b"| epoch 003 | valid ppl 24.0\n",
    "truncated": lambda tmp: truncated_checkpoint(tmp),
}
REASONS = {"empty": "an empty file, 0 bytes", "text": "a text file starting with '| epoch 003",
           "truncated": "a truncated or damaged zip archive"}


def truncated_checkpoint(tmp_path) -> bytes:
    torch.save({"model_state": {"w": torch.zeros(500)}}, tmp_path / "whole.pt")
    return (tmp_path / "whole.pt").read_bytes()[:-300]


@pytest.mark.parametrize("content", sorted(CONTENTS))
@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_converter_refuses_a_file_that_is_no_checkpoint(tmp_path, name, content):
    module = CONVERTERS[name]
    src = tmp_path / "model.pt"
    src.write_bytes(CONTENTS[content](tmp_path))
    with pytest.raises(DataError) as error:
        module.main(args(module, str(src), tmp_path))
    message = str(error.value)
    assert message.startswith(f"{src} is not a PyTorch checkpoint ({REASONS[content]}"), message
    assert message.endswith(f"; pass {module.SOURCE_FILE}") and "\n" not in message


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_converter_names_a_missing_source(tmp_path, name):
    module = CONVERTERS[name]
    with pytest.raises(MissingFileError, match=r"missing\.pt does not exist; pass "):
        module.main(args(module, str(tmp_path / "missing.pt"), tmp_path))


def test_empty_vocabulary_file_is_refused(tmp_path):
    from fairseq_ext.convert.errors import ConversionError
    from fairseq_ext.convert.pickled import read_vocab_file

    (tmp_path / "vocab.txt").write_text("")
    with pytest.raises(ConversionError, match=r"vocab\.txt is empty; pass the vocabulary"):
        read_vocab_file(str(tmp_path / "vocab.txt"))
