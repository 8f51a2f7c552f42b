"""Pieces shared by the released-checkpoint converters (transformer_xl.py, adaptive_span.py).

* safe reading: torch's weights-only loader first; a pickled file is unpickled only when trusted, through a shim that
  turns every class outside a small allowlist into an inert stub (the original code need not be importable);
* the vocabulary mapping onto a fairseq dictionary (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3 first; original
  symbols in original order; fairseq specials the original lacks are *dead* rows: zero embedding, zero output row,
  zero output bias, and the fixed logit ``DEAD_BIAS`` in the model's ``dead_rows`` buffers (modules/dead_rows.py:
  invisible to training);
* reading the source weights by name (``StateReader``: shape checks, every key used or explicitly dropped);
* the fairseq side of the output: dictionary, ``dict.txt``, a complete config for ``--task streaming_lm``, the
  weights-only-loadable checkpoint dict (``Conversion``), a strict load check and the files written;
* the command line both converters share (``converter_parser``, ``add_output_arguments``).
"""
import argparse
import logging
import os
import pickle
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fairseq_ext.compat.inputs import check_torch_file, damaged_file_errors
from fairseq_ext.errors import ConfigError, DataError, MissingFileError
from fairseq_ext.modules.dead_rows import dead_rows_state

logger = logging.getLogger(__name__)

FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq Dictionary ids 0..3
DEFAULT_SYMBOL_MAP = {"<eos>": "</s>", "<unk>": "<unk>", "<s>": "<s>", "<pad>": "<pad>", "</s>": "</s>"}
DEAD_BIAS = -40.0
PREFIX = "decoder."
TIE_PROJ_MODES = {"none": lambda n: [False] * n, "tails": lambda n: [False] + [True] * (n - 1),
                  "all": lambda n: [True] * n}  # tie_projs modes -> one flag per cluster
PREPROCESS_HINT = ("fairseq-preprocess --only-source --srcdict {dict} --trainpref <train.txt> --validpref "
                   "<valid.txt> --testpref <test.txt> --destdir <data-bin dir>")


class ConversionError(DataError):
    """The source files cannot be converted as given; the message names the fix (a user error: one line, no
    traceback)."""


class ConversionFlagError(ConversionError, ConfigError):
    """A converter option that cannot work with this source (or at all)."""


# ======================================================================================================================
# Unpickling shim: the original classes become stubs, nothing outside a small allowlist is imported or called
# ======================================================================================================================
_SAFE_GLOBALS = {
    "collections": {"OrderedDict", "Counter", "defaultdict", "deque"},
    "builtins": {"set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "str", "bytes",
                 "bytearray", "bool", "slice", "range", "object"},
    "__builtin__": {"set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "str", "bytes",
                    "bytearray", "bool", "slice", "object"},
    "copyreg": {"_reconstructor"},
    "copy_reg": {"_reconstructor"},
    "_codecs": {"encode"},
    "argparse": {"Namespace"},
    "torch._tensor": {"_rebuild_from_type_v2"},
    "torch.nn.parameter": {"Parameter", "Buffer"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy": {"ndarray", "dtype"},
}


class PickledStub(nn.Module):
    """Stand-in for a class that is not importable (or not trusted): keeps the pickled attributes; nn.Module
    machinery works when the state is a module's (``_parameters``, ``_modules``, ...)."""

    _stub_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # called when the pickle calls the class
        super().__init__()
        self.__dict__["_stub_args"] = args
        self.__dict__["_stub_kwargs"] = kwargs

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict) and "_parameters" in state:
            super().__setstate__(state)
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_stub_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:  # dict subclasses
        self.__dict__.setdefault("_stub_items", {})[key] = value

    def append(self, value: Any) -> None:  # list subclasses
        self.__dict__.setdefault("_stub_list", []).append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.__dict__.setdefault("_stub_list", []).extend(values)

    def __repr__(self) -> str:
        return f"<stub {self._stub_name}>"


_STUBS: Dict[Tuple[str, str], type] = {}


def stub_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STUBS:
        _STUBS[key] = type(name, (PickledStub,), {"_stub_name": f"{module}.{name}", "__module__": "stub." + module})
    return _STUBS[key]


def _is_safe_global(module: str, name: str) -> bool:
    if name in _SAFE_GLOBALS.get(module, ()):
        return True
    if module == "torch._utils" and name.startswith("_rebuild"):
        return True
    if module.startswith("torch.nn.modules."):
        return True
    if module == "torch":
        value = getattr(torch, name, None)
        return isinstance(value, (torch.dtype, type))
    return False


class ShimUnpickler(pickle.Unpickler):
    """Resolves torch's tensor/module classes and plain containers; every other global (the original code's
    classes, argparse-free helpers, anything unexpected) becomes a ``PickledStub`` subclass, never imported."""

    stubbed: set = set()

    def find_class(self, module: str, name: str) -> Any:
        if _is_safe_global(module, name):
            return super().find_class(module, name)
        ShimUnpickler.stubbed.add(f"{module}.{name}")
        return stub_class(module, name)


def _shim_pickle_module() -> types.ModuleType:
    module = types.ModuleType("convert_shim_pickle")
    module.Unpickler = ShimUnpickler
    module.load = lambda f, **kwargs: ShimUnpickler(f, **kwargs).load()
    module.__dict__["UnpicklingError"] = pickle.UnpicklingError
    return module


def load_pickled(path: str, trust_pickle: bool = False, what: str = "checkpoint",
                 contents: str = "the original code's classes, argparse args, a Vocab",
                 expected: str = "the file the original code saved") -> Any:
    """torch's weights-only loader first; the shim (full unpickling with stub classes) only when trusted.
    ``contents`` names what the file is expected to pickle, ``expected`` the file to pass instead of one that is no
    torch file at all (empty, truncated, text: ``DataError`` from ``fairseq_ext.compat.inputs``)."""
    if not os.path.exists(path):
        raise MissingFileError(f"{what} {path} does not exist; pass {expected}")
    check_torch_file(path, expected)
    try:
        with damaged_file_errors(path, expected):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise ConversionError(
                f"{path} holds pickled Python objects ({contents}), which "
                f"torch's weights-only loader refuses. If you trust the file, re-run with --trust-pickle: it is then "
                f"unpickled with the original classes replaced by stubs, so the original code need not be "
                f"importable. ({err.__class__.__name__}: {str(err).splitlines()[0][:200]})") from err
    logger.warning("loading %s with full unpickling through the class shim (--trust-pickle)", path)
    ShimUnpickler.stubbed = set()
    with damaged_file_errors(path, expected):
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_shim_pickle_module())
    if ShimUnpickler.stubbed:
        logger.info("stubbed classes: %s", ", ".join(sorted(ShimUnpickler.stubbed)))
    return obj



# ======================================================================================================================
# Pickled model objects (stubs): weights, attributes, vocabularies
# ======================================================================================================================
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



# ======================================================================================================================
# Vocabulary mapping
# ======================================================================================================================
@dataclass
class VocabMapping:
    """Original ids <-> fairseq ids. ``fs_to_orig[f]`` is -1 for a dead row (a fairseq special the original lacks)."""

    symbols: List[str]  # fairseq dictionary symbols in id order (4 specials first)
    orig_to_fs: List[int]
    fs_to_orig: List[int]
    cutoffs: List[int]  # fairseq cutoffs
    mapped: Dict[str, str]  # original symbol -> fairseq special

    @property
    def dead(self) -> List[int]:
        return [f for f, o in enumerate(self.fs_to_orig) if o < 0]


def build_vocab_mapping(symbols: Sequence[str], cutoffs: Sequence[int],
                        symbol_map: Optional[Mapping[str, str]] = None) -> VocabMapping:
    """Place the original vocabulary into a fairseq dictionary (see the module docstring)."""
    symbol_map = dict(DEFAULT_SYMBOL_MAP if symbol_map is None else symbol_map)
    if symbol_map.get("<unk>") == "<unk>" and "<unk>" not in symbols and "<UNK>" not in symbol_map:
        symbol_map["<UNK>"] = "<unk>"  # lm1b's vocabulary spells it <UNK>: the <unk> mapping applies to it
    for orig, special in symbol_map.items():
        if special and special not in FAIRSEQ_SPECIALS:
            raise ConversionFlagError(f"--map-symbol {orig}={special}: the target must be a fairseq special "
                                      f"{FAIRSEQ_SPECIALS}")
    seen: Dict[str, int] = {}
    for i, sym in enumerate(symbols):
        if not sym or any(c.isspace() for c in sym):
            raise ConversionError(f"original symbol {i} ({sym!r}) is empty or contains whitespace; fairseq "
                                  f"dictionaries hold whitespace-free tokens")
        if sym in seen:
            raise ConversionError(f"original symbol {sym!r} appears twice (ids {seen[sym]} and {i})")
        seen[sym] = i
    head = cutoffs[0] if cutoffs else len(symbols)
    special_of: Dict[int, str] = {}
    for orig, special in symbol_map.items():
        if not special or orig not in seen:
            continue
        idx = seen[orig]
        if special in special_of.values():
            other = symbols[next(i for i, s in special_of.items() if s == special)]
            raise ConversionError(f"both {other!r} and {orig!r} map onto the fairseq special {special}; drop one "
                                  f"mapping (--map-symbol {orig}=)")
        if idx >= head:
            raise ConversionError(
                f"original symbol {orig!r} (id {idx}) maps onto the fairseq special {special} (id "
                f"{FAIRSEQ_SPECIALS.index(special)}), but it lies outside the head cluster [0, {head}) of the adaptive "
                f"softmax, and fairseq's specials are always ids 0-3 (head). This layout cannot be converted exactly")
        special_of[idx] = special
    for sym in FAIRSEQ_SPECIALS:
        if sym in seen and seen[sym] not in special_of:
            raise ConversionError(f"the original vocabulary has the symbol {sym!r} but it is not mapped onto fairseq's "
                                  f"{sym}; fairseq reserves that name (map it with --map-symbol '{sym}={sym}')")
    fs_symbols = list(FAIRSEQ_SPECIALS)
    orig_to_fs = [-1] * len(symbols)
    fs_to_orig = [-1] * len(FAIRSEQ_SPECIALS)
    for idx, special in special_of.items():
        orig_to_fs[idx] = FAIRSEQ_SPECIALS.index(special)
        fs_to_orig[orig_to_fs[idx]] = idx
    for idx, sym in enumerate(symbols):
        if idx not in special_of:
            orig_to_fs[idx] = len(fs_symbols)
            fs_to_orig.append(idx)
            fs_symbols.append(sym)
    n_dead = len(FAIRSEQ_SPECIALS) - len(special_of)
    fs_cutoffs = [c + n_dead for c in cutoffs]
    mapping = VocabMapping(fs_symbols, orig_to_fs, fs_to_orig, fs_cutoffs,
                           {symbols[i]: s for i, s in sorted(special_of.items())})
    _check_clusters(mapping, cutoffs, len(symbols))
    return mapping


def _check_clusters(mapping: VocabMapping, cutoffs: Sequence[int], vocab: int) -> None:
    """Every symbol stays in its cluster; tails keep their order (a head permutation is harmless)."""
    orig_ends = [0] + list(cutoffs) + [vocab]
    fs_ends = [0] + mapping.cutoffs + [len(mapping.symbols)]
    for i in range(len(orig_ends) - 1):
        members = [f for f in range(fs_ends[i], fs_ends[i + 1]) if mapping.fs_to_orig[f] >= 0]
        origs = [mapping.fs_to_orig[f] for f in members]
        if any(not orig_ends[i] <= o < orig_ends[i + 1] for o in origs) or (i > 0 and origs != sorted(origs)):
            raise ConversionError(f"cluster {i} changes members or order under the vocabulary mapping; this is a bug "
                                  f"or an unsupported --map-symbol")


def gather_rows(table: Tensor, mapping: VocabMapping, fs_lo: int, fs_hi: int, orig_lo: int,
                 fill: float) -> Tensor:
    """Rows [fs_lo, fs_hi) in fairseq order from ``table`` whose row r is original id orig_lo + r; dead rows
    get ``fill``. table (V_i, ...) -> (fs_hi - fs_lo, ...)."""
    index = torch.tensor(mapping.fs_to_orig[fs_lo:fs_hi], dtype=torch.long)
    live = index >= 0
    out = table.new_full((fs_hi - fs_lo,) + tuple(table.shape[1:]), fill)
    out[live] = table[index[live] - orig_lo]
    return out



# ======================================================================================================================
# The fairseq side: dictionary, config, checkpoint, files
# ======================================================================================================================
# ======================================================================================================================
# Source weights and the converted result
# ======================================================================================================================
class StateReader:
    """Source weights by original name with consumption tracking and shape checks (every key must be used or be one
    of ``dropped``); floating-point tensors are cast to ``dtype`` once per tensor object, so ties stay ties."""

    def __init__(self, state: Mapping[str, Tensor], dtype: Optional[torch.dtype], dropped: Sequence[str] = ()) -> None:
        self.state = state
        self.used: set = set()
        self.dtype = dtype
        self.dropped = tuple(dropped)
        self._cast: Dict[int, Tensor] = {}

    def has(self, key: str) -> bool:
        return key in self.state

    def check(self, key: str, shape: Optional[Sequence[int]]) -> None:
        """Raise ``ConversionError`` unless ``key`` is present (with ``shape``, when given)."""
        if key not in self.state:
            raise ConversionError(f"the source state dict lacks {key!r} (expected for this configuration); is the "
                                  f"configuration right for these weights?")
        value = self.state[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ConversionError(f"{key} has shape {tuple(value.shape)}, the configuration implies {tuple(shape)}")

    def get(self, key: str, shape: Optional[Sequence[int]] = None) -> Tensor:
        self.check(key, shape)
        value = self.state[key]
        self.used.add(key)
        if self.dtype is not None and value.is_floating_point() and value.dtype != self.dtype:
            if id(value) not in self._cast:  # cast once per tensor object, so ties stay ties
                self._cast[id(value)] = value.detach().to(self.dtype)
            return self._cast[id(value)]
        return value.detach()

    def unused(self) -> List[str]:
        return sorted(k for k in self.state if k not in self.used and k not in self.dropped)


def convert_adaptive_weights(r: StateReader, mapping: VocabMapping, *, n_token: int, cutoffs: Sequence[int],
                             d_model: int, d_embed: int, div_val: int, tie_weight: bool, source_tie_projs: Sequence[bool],
                             tie_projs_mode: str, dead_bias: float, layout: str = "original",
                             bias_per_cluster: bool = False) -> Dict[str, Tensor]:
    """Transformer-XL's ``AdaptiveEmbedding`` (``word_emb.*``) and ``ProjectedAdaptiveLogSoftmax`` (``crit.*``; NVIDIA
    names with ``layout="nvidia"``) -> ``decoder.embed_tokens.*`` / ``decoder.adaptive_softmax.*`` in fairseq order.
    ``crit.cluster_{weight,bias}`` keep their rows (the model reads them in reverse, as the original does); the output
    biases are concatenated in vocabulary order; tied output matrices / projections (``tie_weight``,
    ``tie_projs_mode``) are the very tensors of ``embed_tokens`` (one tensor, two keys); a projection tied in the
    source (``source_tie_projs``) but not in the target mode is copied. ``bias_per_cluster``: the target keeps one
    bias tensor per cluster (``adaptive_softmax.biases.{i}``) instead of one (``adaptive_softmax.bias``)."""
    out: Dict[str, Tensor] = {}
    n_clusters = len(list(cutoffs))
    orig_ends = [0] + list(cutoffs) + [n_token]
    fs_ends = [0] + mapping.cutoffs + [len(mapping.symbols)]
    tables = [(0, 0, len(mapping.symbols), 0, n_token, d_embed)] if div_val == 1 else [
        (i, fs_ends[i], fs_ends[i + 1], orig_ends[i], orig_ends[i + 1], d_embed // div_val ** i)
        for i in range(n_clusters + 1)]
    has_projs = div_val > 1 or d_embed != d_model
    # input embeddings and projections
    emb_keys: Dict[int, str] = {}
    proj_keys: Dict[int, str] = {}
    for i, fs_lo, fs_hi, orig_lo, orig_hi, dim in tables:
        table = r.get(f"word_emb.emb_layers.{i}.weight", (orig_hi - orig_lo, dim))
        emb_keys[i] = f"{PREFIX}embed_tokens.emb_layers.{i}.weight"
        out[emb_keys[i]] = gather_rows(table, mapping, fs_lo, fs_hi, orig_lo, 0.0)
        if has_projs:
            proj_keys[i] = f"{PREFIX}embed_tokens.emb_projs.{i}"
            out[proj_keys[i]] = r.get(f"word_emb.emb_projs.{i}", (d_model, dim))
    # softmax: clusters, biases, word matrices
    if n_clusters:
        out[PREFIX + "adaptive_softmax.cluster_weight"] = r.get("crit.cluster_weight", (n_clusters, d_embed))
        out[PREFIX + "adaptive_softmax.cluster_bias"] = r.get("crit.cluster_bias", (n_clusters,))
    biases = []
    for i, fs_lo, fs_hi, orig_lo, orig_hi, dim in tables:
        key = f"crit.out_layers.{i}.bias" if layout == "original" else f"crit.out_layers_biases.{i}"
        biases.append(r.get(key, (orig_hi - orig_lo,)))
    full_bias = torch.cat(biases)  # (V_orig,) in original vocabulary order
    bias = gather_rows(full_bias, mapping, 0, len(mapping.symbols), 0, 0.0)  # (V,) in fairseq order
    if bias_per_cluster:
        out.update({f"{PREFIX}adaptive_softmax.biases.{i}": part.clone()
                    for i, part in enumerate(bias.split([hi - lo for lo, hi in zip(fs_ends, fs_ends[1:])]))})
    else:
        out[PREFIX + "adaptive_softmax.bias"] = bias
    out.update(dead_rows_state(PREFIX + "adaptive_softmax.dead_rows.", len(mapping.symbols), mapping.dead, dead_bias))
    for i, fs_lo, fs_hi, orig_lo, orig_hi, dim in tables:
        dst = f"{PREFIX}adaptive_softmax.weights.{i}"
        if layout == "original":
            key = f"crit.out_layers.{i}.weight"
        else:
            key = f"word_emb.emb_layers.{i}.weight" if tie_weight else f"crit.out_layers_weights.{i}"
        weight = r.get(key, (orig_hi - orig_lo, dim))
        out[dst] = out[emb_keys[i]] if tie_weight else gather_rows(weight, mapping, fs_lo, fs_hi, orig_lo, 0.0)
    # softmax projections (one per cluster when present)
    if has_projs:
        source_flags = list(source_tie_projs)
        target_flags = TIE_PROJ_MODES[tie_projs_mode](n_clusters + 1)
        for i in range(n_clusters + 1):
            j = 0 if div_val == 1 else i  # the embedding projection a tied softmax projection is
            dim = tables[j][5]
            dst = f"{PREFIX}adaptive_softmax.out_projs.{i}"
            if target_flags[i]:
                out[dst] = out[proj_keys[j]]
                if layout == "original":
                    r.get(f"crit.out_projs.{i}", (d_model, dim))  # the same tensor, stored a second time
                continue
            if source_flags[i]:  # tied in the source, copied here
                out[dst] = out[proj_keys[j]].clone()
                if layout == "original":
                    r.get(f"crit.out_projs.{i}", (d_model, dim))
            else:
                out[dst] = r.get(f"crit.out_projs.{i}", (d_model, dim))
    return out


def convert_layer_norms_and_ffn(r: StateReader, src_p: str, dst_p: str, d_model: int, d_inner: int) -> Dict[str, Tensor]:
    """One Transformer-XL-style layer's ``dec_attn.layer_norm`` and ``pos_ff.{CoreNet.0, CoreNet.3, layer_norm}``
    (prefix ``src_p``) -> ``self_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm`` (prefix ``dst_p``)."""
    out: Dict[str, Tensor] = {}
    d = d_model
    for src_name, dst_name, shapes in (
            ("dec_attn.layer_norm", "self_attn_layer_norm", ((d,), (d,))),
            ("pos_ff.CoreNet.0", "fc1", ((d_inner, d), (d_inner,))),
            ("pos_ff.CoreNet.3", "fc2", ((d, d_inner), (d,))),
            ("pos_ff.layer_norm", "final_layer_norm", ((d,), (d,)))):
        out[dst_p + dst_name + ".weight"] = r.get(src_p + src_name + ".weight", shapes[0])
        out[dst_p + dst_name + ".bias"] = r.get(src_p + src_name + ".bias", shapes[1])
    return out


@dataclass
class Conversion:
    """The converted checkpoint (weights-only safe), the fairseq dictionary and the id mapping."""

    checkpoint: Dict[str, Any]
    mapping: VocabMapping
    model_cfg: Dict[str, Any]


def fairseq_dictionary(symbols: Sequence[str]) -> Any:
    """A fairseq Dictionary holding exactly ``symbols`` (the 4 specials first) in this order."""
    from fairseq.data import Dictionary

    dictionary = Dictionary()
    for sym in symbols[len(FAIRSEQ_SPECIALS):]:
        dictionary.add_symbol(sym)
    if dictionary.symbols != list(symbols):
        raise RuntimeError("fairseq's Dictionary reorders the converted symbols; this is a converter bug")
    return dictionary


def fairseq_cfg(fields: Mapping[str, Any], data: str, arch: str, tokens_per_sample: int) -> Dict[str, Any]:
    """A complete fairseq config (plain containers) for --task streaming_lm --arch ARCH --criterion lm_loss, with
    the model fields replaced by ``fields`` (each must be a field of the model's config)."""
    import fairseq_ext  # noqa: F401  (registers the model, task and criterion)
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data, "--task", "streaming_lm", "--arch", arch, "--criterion",
                                                "lm_loss", "--tokens-per-sample", str(tokens_per_sample)])
    cfg = OmegaConf.to_container(convert_namespace_to_omegaconf(args), resolve=True)
    unknown = set(fields) - set(cfg["model"])
    if unknown:
        raise RuntimeError(f"{arch} has no config fields {sorted(unknown)}; converter and model disagree (a bug)")
    cfg["model"].update(fields)
    return cfg


def fairseq_checkpoint(cfg: Dict[str, Any], weights: Dict[str, Tensor], symbols: Sequence[str],
                       provenance_key: str, provenance: Dict[str, Any]) -> Dict[str, Any]:
    """A fairseq checkpoint of plain containers and tensors (weights-only loadable) without optimizer state; the task
    state holds the dictionary fingerprint that ``--task streaming_lm`` checks against the data."""
    from fairseq_ext.tasks.streaming_lm import StreamingLMTask, dictionary_fingerprint

    return {
        "args": None,
        "cfg": cfg,
        "model": weights,
        "optimizer_history": [{"criterion_name": "LMLossCriterion", "optimizer_name": "converted",
                               "lr_scheduler_state": {"best": None}, "num_updates": 0}],
        "task_state": {StreamingLMTask.STATE_KEY: dictionary_fingerprint(fairseq_dictionary(symbols))},
        "extra_state": {provenance_key: provenance},
        "last_optimizer_state": None,
    }


def plain_vocab_checkpoint(symbols: Sequence[str], convert: Callable[[VocabMapping], Dict[str, Tensor]],
                           fields: Dict[str, Any], *, data: str, arch: str, tokens_per_sample: int,
                           provenance_key: str, source: str, info: Mapping[str, Any], sizes: Dict[str, Any],
                           dead_bias: float) -> Tuple[Dict[str, Any], VocabMapping, Dict[str, Tensor]]:
    """Map a rebuilt vocabulary without clusters (default specials), convert the weights into it (``convert``) and
    wrap them in a fairseq checkpoint with the usual provenance. Returns (checkpoint, mapping, weights)."""
    mapping = build_vocab_mapping(symbols, [], DEFAULT_SYMBOL_MAP)
    weights = convert(mapping)
    provenance = {
        "source": source, **info, "sizes": sizes,
        "mapped_symbols": dict(mapping.mapped), "dead_ids": mapping.dead, "dead_bias": float(dead_bias),
    }
    checkpoint = fairseq_checkpoint(fairseq_cfg(fields, data, arch, tokens_per_sample), weights, mapping.symbols,
                                    provenance_key, provenance)
    return checkpoint, mapping, weights


def write_dictionary(path: str, symbols: Sequence[str]) -> None:
    """fairseq dict.txt: every symbol after the 4 specials, in id order; counts decrease so that even a
    count-sorting ``Dictionary.finalize`` would keep the order."""
    body = symbols[len(FAIRSEQ_SPECIALS):]
    with open(path, "w", encoding="utf-8") as f:
        for rank, sym in enumerate(body):
            f.write(f"{sym} {len(body) - rank}\n")


def verify_strict_load(build: Callable[[], nn.Module], weights: Mapping[str, Tensor], arch: str) -> None:
    """Build the model (on the meta device: no memory, no init cost) and load ``weights`` strictly; any name or shape
    disagreement between converter and model is reported before the user meets it."""
    with torch.device("meta"):
        model = build()
    try:  # nn.Module's own loader (fairseq's takes no ``assign``); assign: the meta model gets the real tensors
        missing, unexpected = nn.Module.load_state_dict(model, weights, strict=False, assign=True)
    except RuntimeError as err:
        raise RuntimeError(f"converted weights do not fit {arch} (a converter bug): {err}") from err
    if missing or unexpected:
        raise RuntimeError(f"converted weights do not fit {arch} (a converter bug): missing {missing[:8]}, "
                           f"unexpected {unexpected[:8]}")


def verify_conversion(conversion: Conversion, build: Callable[[Any, Any], nn.Module], arch: str) -> None:
    """Build the model with ``build(cfg.model as a DictConfig, fairseq dictionary)`` from the converted config and
    load the converted weights strictly (``verify_strict_load``)."""
    from omegaconf import OmegaConf

    dictionary = fairseq_dictionary(conversion.mapping.symbols)
    cfg = OmegaConf.create(conversion.checkpoint["cfg"]["model"])
    verify_strict_load(lambda: build(cfg, dictionary), conversion.checkpoint["model"], arch)


def build_registered_model(cfg: Any, dictionary: Any) -> nn.Module:
    """``build`` for ``verify_conversion``: fairseq's registry builds the model of ``cfg`` (a language model over
    ``dictionary``)."""
    from fairseq import models

    return models.build_model(cfg, argparse.Namespace(source_dictionary=dictionary, target_dictionary=dictionary,
                                                      dictionary=dictionary))


def save_conversion(out_dir: str, checkpoint: Dict[str, Any], symbols: Sequence[str]) -> Tuple[str, str]:
    """Write OUT_DIR/model.pt and OUT_DIR/dict.txt; re-read model.pt the way fairseq does (weights only)."""
    os.makedirs(out_dir, exist_ok=True)
    model_path, dict_path = os.path.join(out_dir, "model.pt"), os.path.join(out_dir, "dict.txt")
    torch.save(checkpoint, model_path)
    write_dictionary(dict_path, symbols)
    torch.load(model_path, map_location="cpu", weights_only=True)
    return model_path, dict_path


def finish_conversion(conversion: Conversion, out_dir: str, arch: str,
                      verify: Optional[Callable[[Conversion], None]], note: str = "") -> Conversion:
    """``verify(conversion)`` (unless None: ``--no-verify``), then save and report it (``report_conversion``)."""
    if verify is not None:
        verify(conversion)
    report_conversion(out_dir, conversion.checkpoint, conversion.mapping, arch, note=note)
    return conversion


def report_conversion(out_dir: str, checkpoint: Dict[str, Any], mapping: VocabMapping, arch: str,
                      note: str = "") -> Tuple[str, str]:
    """Save (``save_conversion``) and print what was written, the dead specials and how to binarise text."""
    model_path, dict_path = save_conversion(out_dir, checkpoint, mapping.symbols)
    dead = [mapping.symbols[i] for i in mapping.dead]
    print(f"wrote {model_path} ({len(checkpoint['model'])} tensors, {arch}) and {dict_path} "
          f"({len(mapping.symbols)} types; {note}dead specials {dead})\n"
          f"binarise with: {PREPROCESS_HINT.format(dict=dict_path)}")
    return model_path, dict_path


# ======================================================================================================================
# Command line
# ======================================================================================================================
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
