"""Source weights read by their original names: shape checks, a dtype cast that keeps ties, and every key used or
explicitly dropped."""
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .errors import ConversionError


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
