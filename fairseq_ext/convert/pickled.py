"""Reading (stubbed) pickled objects of the originals: a module's weights and attributes, its adaptive softmax, and
vocabularies (a pickled Vocab / Corpus, or ``--vocab`` as a text file)."""
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from fairseq_ext.errors import MissingFileError

from .errors import ConversionError
from .unpickle import ShimUnpickler, load_pickled


def module_state(module: nn.Module, prefix: str = "") -> Dict[str, Tensor]:
    """state_dict read straight from ``_parameters`` / ``_buffers`` / ``_modules`` (robust to stubs and to modules
    pickled by old torch versions); None entries (the original's empty ParameterList slots) are skipped."""
    out: Dict[str, Tensor] = {}
    state = module.__dict__
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None:
                continue
            if not torch.is_tensor(value):
                raise ConversionError(f"{prefix}{name} is a {type(value).__name__}, not a tensor: the pickle rebuilt "
                                      f"it with a function the shim does not allow ({sorted(ShimUnpickler.stubbed)})")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state(child, f"{prefix}{name}."))
    return out


def pickled_attr(obj: Any, name: str, default: Any = None) -> Any:
    """A plain attribute of a (stubbed) pickled object; ``default`` when absent or None."""
    value = obj.__dict__.get(name, default) if hasattr(obj, "__dict__") else default
    return default if value is None else value


def pickled_child(module: Any, name: str) -> Any:
    """A submodule of a (stubbed) pickled module, or None."""
    return (module.__dict__.get("_modules") or {}).get(name)


def pickled_class_name(obj: Any) -> str:
    """The original class name of a (stubbed) object."""
    return getattr(type(obj), "_stub_name", type(obj).__name__).rsplit(".", 1)[-1]


def same_tensor(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    """Same storage, same view (tied tensors survive torch.save/torch.load this way)."""
    return (a is not None and b is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape
            and a.stride() == b.stride() and a.dtype == b.dtype)


def unwrap_pickled_model(root: Any, expected: str, what: str) -> Any:
    """The pickled ``expected`` model (a ``DataParallel`` wrapper's ``module`` unwrapped); ``what`` names the file
    in the error."""
    if "DataParallel" in pickled_class_name(root) and pickled_child(root, "module") is not None:
        root = pickled_child(root, "module")
    if pickled_class_name(root) != expected:
        raise ConversionError(f"expected a pickled {expected} ({what}), got {pickled_class_name(root)}")
    return root


def pickled_adaptive_softmax(root: Any, arch: str) -> Tuple[int, List[int]]:
    """(n_token, crit.cutoffs ending with n_token) of a pickled Transformer-XL-style ``MemTransformerLM``; an error
    when it has no ``crit`` (sampled softmax) or inconsistent cutoffs. ``arch`` names the target in the error."""
    crit = pickled_child(root, "crit")
    if crit is None:
        raise ConversionError("the model has no adaptive softmax 'crit' (sampled softmax, sample_softmax > 0?): "
                              f"{arch} needs the full / adaptive softmax weights")
    n_token = int(pickled_attr(root, "n_token"))
    crit_cutoffs = [int(c) for c in pickled_attr(crit, "cutoffs", [n_token])]
    if not crit_cutoffs or crit_cutoffs[-1] != n_token:
        raise ConversionError(f"crit.cutoffs {crit_cutoffs} should end with n_token {n_token}")
    return n_token, crit_cutoffs


def vocab_symbols(vocab: Any, what: str) -> Optional[List[str]]:
    """Symbols in index order from a (stubbed) Vocab / Corpus object, a list, or None."""
    if vocab is None:
        return None
    if isinstance(vocab, (list, tuple)):
        return [str(s) for s in vocab]
    inner = pickled_attr(vocab, "vocab")  # a pickled Corpus (the original cache.pt)
    if inner is not None and pickled_attr(vocab, "idx2sym") is None:
        return vocab_symbols(inner, what)
    idx2sym = pickled_attr(vocab, "idx2sym")
    if idx2sym is None:
        raise ConversionError(f"{what} ({pickled_class_name(vocab)}) has no idx2sym list (a BPE OpenAIVocab?); pass the "
                              f"symbols in index order with --vocab <file with one symbol per line>")
    return [str(s) for s in idx2sym]


VOCAB_FILE = ("the vocabulary the model was trained with: the original cache.pt (a pickled Corpus) or a text file "
              "with one symbol per line in index order")


def read_vocab_file(path: str, trust_pickle: bool = False) -> List[str]:
    """``--vocab``: the original ``cache.pt`` (pickled Corpus) or a text file, one symbol per line in index order
    (the first whitespace-separated field of each line, as the original ``Vocab._build_from_file`` reads it)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"--vocab {path} does not exist; pass {VOCAB_FILE}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ConversionError(f"--vocab {path} is empty; pass {VOCAB_FILE}")
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch zip or legacy pickle
        return vocab_symbols(load_pickled(path, trust_pickle, "vocabulary", expected=VOCAB_FILE), path)
    symbols = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                raise ConversionError(f"{path}:{number} is empty; the vocabulary file needs one symbol per line")
            symbols.append(fields[0])
    return symbols
