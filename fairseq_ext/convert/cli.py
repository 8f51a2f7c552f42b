"""The command line the converters share: source and output arguments, ``--dead-bias`` / ``--no-verify``,
``--vocab`` / ``--trust-pickle`` / ``--map-symbol``, and on/off flags."""
import argparse
import logging
from typing import Callable, Dict, Optional, Sequence

from .errors import ConversionFlagError
from .output import PREPROCESS_HINT
from .vocab_mapping import DEAD_BIAS, DEFAULT_SYMBOL_MAP


def converter_parser(description: str, src_help: str, evaluate: str) -> argparse.ArgumentParser:
    """A converter's parser with its ``src`` and ``out_dir`` arguments; the epilog says what is written, how to
    binarise text with the written dictionary and then ``evaluate`` (the text after that)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Writes OUT_DIR/model.pt and OUT_DIR/dict.txt. Binarise text with that dictionary (never build a new "
               "one: ids must match the converted rows):\n  " + PREPROCESS_HINT.format(dict="OUT_DIR/dict.txt") +
               "\n" + evaluate)
    parser.add_argument("src", help=src_help)
    parser.add_argument("out_dir", help="output directory for model.pt and dict.txt")
    return parser


def parse_command_line(build_parser: Callable[[], argparse.ArgumentParser],
                       argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """A converter's arguments (``argv``, default sys.argv) with its progress logged to the console."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args


def add_training_segment_argument(parser: argparse.ArgumentParser) -> None:
    """``--tokens-per-sample``, defaulting to the original's training ``tgt_len`` (Transformer-XL-style sources)."""
    parser.add_argument("--tokens-per-sample", type=int,
                        help="segment length stored in the config (default: the training tgt_len)")


def add_output_arguments(parser: argparse.ArgumentParser, dead_bias_help: str) -> None:
    """``--dead-bias`` (``dead_bias_help``) and ``--no-verify``, the last options of both converters."""
    parser.add_argument("--dead-bias", type=float, default=DEAD_BIAS, help=dead_bias_help)
    parser.add_argument("--no-verify", action="store_true", help="skip building the model to check the weights fit")


def symbol_map_from_pairs(pairs: Sequence[str]) -> Dict[str, str]:
    """``--map-symbol ORIG=SPECIAL`` pairs on top of ``DEFAULT_SYMBOL_MAP`` (``ORIG=`` removes a mapping)."""
    mapping = dict(DEFAULT_SYMBOL_MAP)
    for pair in pairs:
        if "=" not in pair:
            raise ConversionFlagError(f"--map-symbol {pair!r}: expected ORIGINAL=FAIRSEQ_SPECIAL (or ORIGINAL= to "
                                      f"unmap)")
        orig, special = pair.split("=", 1)
        mapping[orig] = special
    return mapping


def add_vocab_arguments(parser: argparse.ArgumentParser, vocab_help: str, trust_help: str) -> None:
    """``--vocab``, ``--trust-pickle`` and ``--map-symbol`` (converters of pickled originals with an external
    vocabulary)."""
    parser.add_argument("--vocab", help=vocab_help)
    parser.add_argument("--trust-pickle", action="store_true", help=trust_help)
    parser.add_argument("--map-symbol", action="append", default=[], metavar="ORIG=SPECIAL",
                        help="map an original symbol onto a fairseq special (<s>, <pad>, </s>, <unk>); defaults: "
                             "<eos>=</s>, <unk>=<unk> (<UNK>=<unk> for lm1b); ORIG= removes a default")


def parse_on_off(value: str) -> bool:
    """argparse type for on/off flags (on/true/1/yes, off/false/0/no)."""
    if value.lower() in ("on", "true", "1", "yes"):
        return True
    if value.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {value!r}")
