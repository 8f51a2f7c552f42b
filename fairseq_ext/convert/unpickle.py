"""Safe reading of the originals' checkpoints: torch's weights-only loader first; a pickled file is unpickled only
when trusted (``--trust-pickle``), through a shim that turns every class outside a small allowlist into an inert
stub, so the original code need not be importable and nothing else is imported or called."""
import logging
import os
import pickle
import types
from typing import Any, Dict, Iterable, Tuple

import torch
from torch import nn

from fairseq_ext.compat.inputs import check_torch_file, damaged_file_errors
from fairseq_ext.errors import MissingFileError

from .errors import ConversionError

logger = logging.getLogger(__name__)

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
