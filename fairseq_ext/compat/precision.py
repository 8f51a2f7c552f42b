"""Precision flags do what they say, or are refused naming what works.

* ``--bf16`` / ``--memory-efficient-bf16``: ``options.parse_args_and_arch`` sets ``tpu = True`` whenever bf16 is
  on (fairseq's bf16 was TPU-only), so on CPU and CUDA every command crashes in ``utils.get_tpu_device``
  (``'NoneType' object has no attribute 'xla_device'``). Without torch_xla a TPU run is impossible, so the check
  turns the implied ``tpu`` back off and bf16 runs on CPU/CUDA through fairseq's own bf16 path (bf16 model, fp32
  master weights in ``FP16Optimizer`` / ``MemoryEfficientFP16Optimizer``).
"""
import importlib.util
import logging

from omegaconf import DictConfig

logger = logging.getLogger(__name__)


def has_torch_xla() -> bool:
    return importlib.util.find_spec("torch_xla") is not None


def bf16_without_tpu(cfg: DictConfig) -> None:
    """Undo fairseq's ``--bf16`` => ``--tpu`` when torch_xla is not installed (no TPU run is possible then)."""
    common = cfg.common
    if (common.bf16 or common.memory_efficient_bf16) and common.tpu and not has_torch_xla():
        logger.info("--bf16: running on %s (fairseq implies --tpu for bf16; torch_xla is not installed)",
                    "CPU" if common.cpu else "the available device")
        common.tpu = False


def apply() -> None:
    from fairseq_ext.compat import CONFIG_CHECKS

    if bf16_without_tpu not in CONFIG_CHECKS:
        CONFIG_CHECKS.append(bf16_without_tpu)
