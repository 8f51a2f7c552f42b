"""Precision flags do what they say, or are refused naming what works.

* ``--bf16`` / ``--memory-efficient-bf16``: ``options.parse_args_and_arch`` sets ``tpu = True`` whenever bf16 is
  on (fairseq's bf16 was TPU-only), so on CPU and CUDA every command crashes in ``utils.get_tpu_device``
  (``'NoneType' object has no attribute 'xla_device'``). Without torch_xla a TPU run is impossible, so the check
  ``bf16_without_tpu`` turns the implied ``tpu`` back off and bf16 training runs on CPU/CUDA through fairseq's own
  bf16 path (``Trainer`` casts model and criterion with ``.to(torch.bfloat16)``, fp32 master weights in
  ``FP16Optimizer`` / ``MemoryEfficientFP16Optimizer``, no loss scaling).
* ``--fp16`` (flat master weights) on CPU: ``_FP16OptimizerMixin.build_fp32_params`` keys the flat fp32 copy by
  ``torch.cuda.current_device()`` ("Torch not compiled with CUDA enabled", or a CUDA context on a CPU run), while
  ``_sync_fp16_grads_to_fp32`` / ``_sync_fp32_params_to_fp16`` look the copy up by ``p.device.index`` (None on the
  CPU). For parameters that are all on the CPU the wrapper builds the same flat copy under the key None; CUDA
  parameters keep fairseq's code.
* ``--bf16`` at inference: ``fairseq-eval-lm``, ``-generate`` and ``-interactive`` call ``model.half()`` for
  ``--fp16`` only, so ``--bf16`` evaluated in fp32. ``BaseFairseqModel.prepare_for_inference_(cfg)`` (called by all
  three after the model is on its device) now casts the model to bfloat16 first when the command's config asks for
  bf16 (``common.bf16`` with ``common_eval.path`` set: the hub interface, which passes a checkpoint's training
  config, is left as fairseq has it, as it is for ``--fp16``). Modules that keep fp32 islands (``_apply``
  overrides) keep them, exactly as under the trainer's cast.
* ``fairseq-validate --bf16``: validate calls neither ``prepare_for_inference_`` nor any bf16 cast, so it would
  evaluate in fp32; the config check ``no_bf16_validate`` (given the command's ``main``) refuses the flag there and
  names ``fairseq-eval-lm --bf16``.
* ``--amp`` (``amp_only_where_it_works``): fairseq's AMP is ``torch.cuda.amp`` (``GradScaler`` and ``autocast`` in
  ``FairseqTask.train_step``); on CPU both disable themselves and training silently runs in fp32; no inference
  command reads the flag at all; with ``--fp16`` the trainer asserts and with ``--bf16`` it builds an AMP optimizer
  around a bf16 model. All of these are refused naming what works. ``--amp`` for CUDA training is unchanged.
"""
import importlib.util
import logging
import sys
from typing import Any, Callable, List

import torch
from fairseq.models import BaseFairseqModel
from fairseq.optim.fp16_optimizer import _FP16OptimizerMixin
from omegaconf import DictConfig

from fairseq_ext.errors import ConfigError

logger = logging.getLogger(__name__)

INFERENCE_COMMANDS = "fairseq-eval-lm, -generate, -interactive"


def has_torch_xla() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


# ----------------------------------------------------------------------------------------------------------------------
# config checks (run by compat.launch on the whole config before anything is built)
# ----------------------------------------------------------------------------------------------------------------------
def bf16_without_tpu(cfg: DictConfig, main: Callable[..., Any]) -> None:
    """Undo fairseq's ``--bf16`` => ``--tpu`` when torch_xla is not installed (no TPU run is possible then)."""
    common = cfg.common
    if (common.bf16 or common.memory_efficient_bf16) and common.tpu and not has_torch_xla():
        logger.info("--bf16: running on %s (fairseq implies --tpu for bf16; torch_xla is not installed)",
                    "CPU" if common.cpu else "the available device")
        common.tpu = False


def is_inference_command(cfg: DictConfig) -> bool:
    """Whether the command evaluates a checkpoint (``--path``: eval-lm, validate, generate, interactive) rather than
    training (fairseq-train has no ``--path``)."""
    common_eval = cfg.get("common_eval", None)
    return common_eval is not None and common_eval.get("path", None) is not None


def amp_only_where_it_works(cfg: DictConfig, main: Callable[..., Any]) -> None:
    """Refuse ``--amp`` wherever fairseq would silently ignore it or combine it with a half-precision model."""
    common = cfg.common
    if not common.amp:
        return
    from fairseq_ext.compat.launch import runs_on_cpu

    if common.fp16 or common.bf16:
        raise ConfigError("--amp is autocast mixed precision over an fp32 model; --fp16 / --bf16 cast the whole "
                          "model: pass only one of them")
    if is_inference_command(cfg):
        raise ConfigError(f"no fairseq inference command reads --amp ({INFERENCE_COMMANDS} and -validate would "
                          f"evaluate in fp32): use --bf16 (CPU or CUDA) or --fp16 (CUDA) to evaluate in half "
                          f"precision, or drop --amp")
    if runs_on_cpu(cfg):
        raise ConfigError("--amp is torch.cuda.amp and does nothing on the CPU (training would run in fp32): use "
                          "--bf16 for mixed precision on the CPU, or drop --amp")


# ----------------------------------------------------------------------------------------------------------------------
# --fp16 with flat master weights on the CPU
# ----------------------------------------------------------------------------------------------------------------------
_fairseq_build_fp32_params = _FP16OptimizerMixin.build_fp32_params.__func__


def build_fp32_params(cls: type, args: Any, params: List[torch.Tensor], flatten: bool = True) -> Any:
    """fairseq's ``build_fp32_params``; for flat master weights of CPU parameters, one fp32 copy keyed by None (the
    CPU's ``device.index``, which is how fairseq's grad/param syncs look it up) instead of by the CUDA device."""
    if not flatten or any(p.device.type != "cpu" for p in params):
        return _fairseq_build_fp32_params(cls, args, params, flatten)
    flat = torch.cat([p.data.reshape(-1).float() for p in params])  # (sum of numels,) fp32 copy, in order
    master = torch.nn.Parameter(flat)
    master.grad = torch.zeros_like(flat)
    return {None: master}


# ----------------------------------------------------------------------------------------------------------------------
# --bf16 at inference
# ----------------------------------------------------------------------------------------------------------------------
def wants_bf16_inference(cfg: Any) -> bool:
    """Whether ``cfg`` is an inference command's config asking for bf16 (``--bf16`` / ``--memory-efficient-bf16``)."""
    common = getattr(cfg, "common", None)
    if common is None or not isinstance(cfg, DictConfig) or not is_inference_command(cfg):
        return False
    return bool(common.get("bf16", False) or common.get("memory_efficient_bf16", False))


_fairseq_prepare_for_inference_ = BaseFairseqModel.prepare_for_inference_


def prepare_for_inference_(self: BaseFairseqModel, cfg: Any) -> None:
    """fairseq's ``prepare_for_inference_``, after casting the model to bfloat16 when the command asked for bf16."""
    if wants_bf16_inference(cfg):
        self.to(dtype=torch.bfloat16)  # fp32 islands (e.g. adaptive-span z) stay fp32 through their _apply
        kept = sorted({str(p.dtype) for p in self.parameters()} - {str(torch.bfloat16)})
        logger.info("--bf16: %s evaluates in bfloat16%s", type(self).__name__,
                    f" (parameters kept in {', '.join(kept)}: fp32 islands)" if kept else "")
    _fairseq_prepare_for_inference_(self, cfg)


# ----------------------------------------------------------------------------------------------------------------------
# fairseq-validate --bf16
# ----------------------------------------------------------------------------------------------------------------------
VALIDATE_MODULE = "fairseq_cli.validate"


def command_module(main: Callable[..., Any]) -> str:
    """The module a command's ``main`` comes from (``python -m fairseq_cli.validate`` runs it as ``__main__``)."""
    name = getattr(main, "__module__", "") or ""
    if name == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        name = spec.name if spec is not None else name
    return name


def no_bf16_validate(cfg: DictConfig, main: Callable[..., Any]) -> None:
    """Refuse ``fairseq-validate --bf16``: validate would evaluate in fp32."""
    if (cfg.common.bf16 or cfg.common.memory_efficient_bf16) and command_module(main) == VALIDATE_MODULE:
        raise ConfigError("fairseq-validate has no bf16 path (it casts the model only for --fp16, so --bf16 "
                          "would evaluate in fp32): use fairseq-eval-lm --bf16 (with --task streaming_lm the "
                          "same streaming protocol), or drop --bf16")


# ----------------------------------------------------------------------------------------------------------------------
def apply() -> None:
    from fairseq_ext.compat import CONFIG_CHECKS

    for check in (bf16_without_tpu, amp_only_where_it_works, no_bf16_validate):
        if check not in CONFIG_CHECKS:
            CONFIG_CHECKS.append(check)
    _FP16OptimizerMixin.build_fp32_params = classmethod(build_fp32_params)
    BaseFairseqModel.prepare_for_inference_ = prepare_for_inference_
