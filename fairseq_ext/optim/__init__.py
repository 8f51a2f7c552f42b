"""Registered optimizers and LR schedulers: ``lamb_torch`` (LAMB, NVIDIA and min-trust variants) and
``lr_scheduler/cosine_warmup_xl`` (linear warmup + cosine, Transformer-XL original and NVIDIA conventions)."""
from . import lamb, lr_scheduler  # noqa: F401
from . import adagrad_clip  # noqa: F401
