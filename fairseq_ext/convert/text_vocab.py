"""Vocabularies rebuilt from the training text as the originals' ``data.py`` builds them (facebookresearch/
adaptive-span and Smerity/sha-rnn, both the awd-lstm ``Corpus``): every line whitespace-split with ``<eos>``
appended, symbols in order of first appearance; the ``--train-txt`` / ``--valid-txt`` / ``--test-txt`` arguments
and the last step of such a conversion (``<eos>`` becomes fairseq's ``</s>``)."""
import argparse
import os
from typing import Dict, List, Optional, Sequence

from fairseq_ext.errors import MissingFileError

from .errors import ConversionError
from .output import Conversion, build_registered_model, finish_conversion, verify_conversion
from .vocab_mapping import check_dead_bias

ORIGINAL_EOS = "<eos>"
_READ_CHARS = 1 << 22  # train.txt is read in pieces: text8's is one 90M-character line


class _FirstAppearance:
    """Symbols in order of first appearance; ``add`` takes a batch of tokens (a set difference skips known ones)."""

    def __init__(self) -> None:
        self.ids: Dict[str, int] = {}

    def add(self, tokens: Sequence[str]) -> None:
        fresh = set(tokens).difference(self.ids)
        for tok in tokens:
            if not fresh:
                return
            if tok in fresh:
                self.ids[tok] = len(self.ids)
                fresh.discard(tok)


def scan_vocabulary(paths: Sequence[str], read_chars: int = _READ_CHARS) -> List[str]:
    """The original ``Corpus`` dictionary: over the files in order, every line ``line.split() + ['<eos>']``, symbols
    in order of first appearance. Files are read as text with universal newlines (the original's ``open(path, 'r')``)
    in pieces of ``read_chars`` characters, so a single-line split (text8) never becomes one list."""
    vocab = _FirstAppearance()
    for path in paths:
        if not os.path.isfile(path):
            raise MissingFileError(f"{path} does not exist: pass {TRAIN_TXT_HINT}")
        try:
            _scan_text_file(path, vocab, read_chars)
        except UnicodeDecodeError as err:
            raise ConversionError(f"{path} is not UTF-8 text ({err.reason}): pass {TRAIN_TXT_HINT}") from err
    return list(vocab.ids)


TRAIN_TXT_HINT = ("--train-txt <the preprocessed train.txt the model was trained on> (written by the original "
                  "get_data.sh: prep_enwik8.py / prep_text8.py; scripts/prepare-enwik8.sh / prepare-text8.sh here), or "
                  "--corpus-pt <its corpus.pt>")


def _scan_text_file(path: str, vocab: _FirstAppearance, read_chars: int) -> None:
    """Add the symbols of one text file to ``vocab`` (``scan_vocabulary``)."""
    with open(path, "r", encoding="utf-8") as f:
        pending, line_open = "", False  # pending: a token cut by the piece boundary
        while True:
            piece = f.readline(read_chars)
            if not piece:
                break
            text = pending + piece
            ends_line = text.endswith("\n")
            tokens = text.split()
            pending = tokens.pop() if tokens and not ends_line and not text[-1].isspace() else ""
            vocab.add(tokens + [ORIGINAL_EOS] if ends_line else tokens)
            line_open = not ends_line
        if line_open:  # the last line has no newline: the original still appends <eos>
            vocab.add(([pending] if pending else []) + [ORIGINAL_EOS])


def check_text_vocabulary(symbols: Sequence[str], rows: int, rows_name: str, hint: str, dead_bias: float) -> None:
    """The rebuilt vocabulary fits the checkpoint's ``rows`` (named ``rows_name``; ``hint`` says which text to pass)
    and the dead-special bias keeps them improbable."""
    if len(symbols) != rows:
        raise ConversionError(f"vocabulary size mismatch: the text gives {len(symbols)} types (incl. {ORIGINAL_EOS}), "
                              f"the checkpoint's {rows_name} has {rows} rows. {hint}")
    if ORIGINAL_EOS not in symbols:
        raise ConversionError(f"the vocabulary has no {ORIGINAL_EOS}; it was not built like the original data.py")
    check_dead_bias(dead_bias)


def add_text_vocab_arguments(parser: argparse.ArgumentParser, train_required: bool) -> None:
    """``--train-txt`` / ``--valid-txt`` / ``--test-txt``: the text files ``scan_vocabulary`` reads, in that order."""
    parser.add_argument("--train-txt", required=train_required,
                        help="the preprocessed train.txt the model was trained on; the vocabulary is rebuilt from it")
    parser.add_argument("--valid-txt", help="valid.txt, scanned after train.txt (the original dictionary continues "
                                            "over it; needed only if it has types train.txt lacks)")
    parser.add_argument("--test-txt", help="test.txt, scanned after valid.txt (as --valid-txt)")


def text_vocabulary(train_txt: str, valid_txt: Optional[str], test_txt: Optional[str]) -> List[str]:
    """``scan_vocabulary`` over the given files (train, then valid, then test)."""
    return scan_vocabulary([p for p in (train_txt, valid_txt, test_txt) if p])


def finish_text_conversion(conversion: Conversion, out_dir: str, arch: str, no_verify: bool) -> Conversion:
    """Unless ``no_verify``: build ``arch`` from the converted config and load the weights strictly; then save and
    report the conversion (noting that the original's <eos> became </s>)."""
    verify = None if no_verify else lambda c: verify_conversion(c, build_registered_model, arch)
    return finish_conversion(conversion, out_dir, arch, verify, note=f"{ORIGINAL_EOS} -> </s>; ")
