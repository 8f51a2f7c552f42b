"""Train a sentencepiece model on one file and encode files with it, one output line per input line.

Encoded lines are the pieces (``▁the``, ``cat``, ...) separated by spaces; empty input lines stay empty,
so fairseq's one ``</s>`` per line is preserved. Characters the model does not cover are written as
themselves (fairseq then maps unseen ones to ``<unk>``).
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, List, Sequence

import sentencepiece as spm

MODEL_TYPES = ("unigram", "bpe", "char", "word")
_BATCH = 10_000


def train_model(train: str, model_prefix: str, vocab_size: int, model_type: str = "unigram",
                character_coverage: float = 1.0, user_defined_symbols: Sequence[str] = (),
                input_sentence_size: int = 10_000_000, num_threads: int = 1, seed: int = 1) -> str:
    """Train on ``train`` and write ``<model_prefix>.model`` / ``.vocab``; return the model path.

    ``vocab_size`` is a soft limit (``hard_vocab_limit=False``) so small corpora work. A literal
    ``<unk>`` in ``user_defined_symbols`` (WikiText's unknown-word token) is kept as one piece, which
    fairseq maps to its own ``<unk>``; sentencepiece's internal unknown piece is then renamed.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    spm.set_random_generator_seed(seed)
    options = dict(input=train, model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
                   character_coverage=character_coverage, hard_vocab_limit=False, num_threads=num_threads,
                   input_sentence_size=input_sentence_size, shuffle_input_sentence=True, minloglevel=2)
    if user_defined_symbols:
        options["user_defined_symbols"] = list(user_defined_symbols)
        if "<unk>" in user_defined_symbols:
            options["unk_piece"] = "<spm-unk>"
    spm.SentencePieceTrainer.train(**options)
    return model_prefix + ".model"


def _batches(lines: Iterable[str], size: int) -> Iterator[List[str]]:
    batch: List[str] = []
    for line in lines:
        batch.append(line.rstrip("\n"))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_lines(processor: spm.SentencePieceProcessor, lines: Sequence[str]) -> List[str]:
    """Encode each line to its space-separated pieces."""
    return [" ".join(pieces) for pieces in processor.encode(list(lines), out_type=str)]


def encode_file(model: str, src: str, dest: str) -> int:
    """Encode ``src`` line by line into ``dest``; return the number of lines."""
    processor = spm.SentencePieceProcessor(model_file=model)
    n = 0
    with open(src, encoding="utf-8") as fin, open(dest + ".part", "w", encoding="utf-8") as fout:
        for batch in _batches(fin, _BATCH):
            for line in encode_lines(processor, batch):
                fout.write(line + "\n")
            n += len(batch)
    os.replace(dest + ".part", dest)
    return n
