"""Subword version of a corpus: train sentencepiece on train, encode train/valid/test, fairseq-preprocess.

Example (the embedded corpus with an 8k unigram vocabulary)::

    python -m preprocess.sentencepiece.prepare --input-dir data/embedded/word --outdir data/embedded-spm8k \\
        --destdir data-bin/embedded-spm8k --vocab-size 8000 --model-type unigram

For WikiText-103 pass ``--train/--valid/--test data/wikitext-103/wiki.{train,valid,test}.tokens`` and
``--user-defined-symbols '<unk>'`` so the corpus's ``<unk>`` stays one token.
Writes OUTDIR/spm.model, OUTDIR/spm.vocab, OUTDIR/{train,valid,test}.txt and the binarised DESTDIR.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Dict, List, Optional

from preprocess.binarise import binarise
from preprocess.sentencepiece.model import MODEL_TYPES, encode_file, train_model

SPLITS = ("train", "valid", "test")


def prepare(inputs: Dict[str, str], outdir: str, destdir: Optional[str], vocab_size: int,
            model_type: str = "unigram", character_coverage: float = 1.0, user_defined_symbols: List[str] = (),
            workers: int = 1, input_sentence_size: int = 10_000_000) -> Dict[str, str]:
    """Train, encode and (unless ``destdir`` is None) binarise; return split -> encoded file."""
    model = train_model(inputs["train"], os.path.join(outdir, "spm"), vocab_size, model_type, character_coverage,
                        user_defined_symbols, input_sentence_size, num_threads=workers)
    encoded: Dict[str, str] = {}
    for split in SPLITS:
        encoded[split] = os.path.join(outdir, f"{split}.txt")
        n = encode_file(model, inputs[split], encoded[split])
        print(f"{split}: {n:,} lines -> {encoded[split]}")
    if destdir is not None:
        binarise(encoded["train"], encoded["valid"], encoded["test"], destdir, workers)
        print(f"binarised -> {destdir}")
    return encoded


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--input-dir", help="directory holding train.txt, valid.txt, test.txt")
    for split in SPLITS:
        parser.add_argument(f"--{split}", help=f"{split} file (overrides --input-dir)")
    parser.add_argument("--outdir", required=True, help="model and encoded text")
    parser.add_argument("--destdir", help="fairseq-preprocess output directory (omit to skip binarising)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="unigram")
    parser.add_argument("--character-coverage", type=float, default=1.0)
    parser.add_argument("--user-defined-symbols", default="", help="comma-separated pieces kept whole, e.g. '<unk>'")
    parser.add_argument("--input-sentence-size", type=int, default=10_000_000,
                        help="train on at most this many sampled lines (0 = all)")
    parser.add_argument("--workers", type=int, default=1, help="sentencepiece threads and fairseq-preprocess workers")
    args = parser.parse_args(argv)
    inputs: Dict[str, str] = {}
    for split in SPLITS:
        path = getattr(args, split) or (os.path.join(args.input_dir, f"{split}.txt") if args.input_dir else None)
        if path is None or not os.path.isfile(path):
            parser.error(f"no {split} file: give --{split} or an --input-dir holding {split}.txt (got {path})")
        inputs[split] = path
    symbols = [s for s in args.user_defined_symbols.split(",") if s]
    try:
        prepare(inputs, args.outdir, args.destdir, args.vocab_size, args.model_type, args.character_coverage,
                symbols, args.workers, args.input_sentence_size)
    except (RuntimeError, ValueError, FileNotFoundError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
