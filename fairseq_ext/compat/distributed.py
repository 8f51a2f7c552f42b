"""Data-parallel training on CPU and GPU through fairseq's own trainer: four fixes.

* ``--ddp-backend c10d`` / ``pytorch_ddp`` on CPU: ``models.distributed_fairseq_model.DistributedFairseqModel``
  passes ``device_ids=[device_id]`` to ``DistributedDataParallel`` whatever the device, and DDP refuses device ids
  for CPU modules. The ``DistributedDataParallel`` it builds drops them for CPU modules (as DDP's docs ask).
* ``--ddp-backend fully_sharded`` needs fairscale, whose FSDP computes on CUDA only (on CPU it fails in
  ``validate_process_group``: "Torch not compiled with CUDA enabled", measured with fairscale 0.4.13) and which is
  not part of this stack: the config check refuses it up front on CPU, and on GPUs when fairscale is not installed,
  naming the backends that work.
* Resuming with several workers: rank 0 loads the checkpoint and ``distributed_utils._broadcast_object_slow``
  sends its non-tensor part with ``torch.save`` / ``torch.load``; torch >= 2.6 loads weights-only by default and
  refuses the omegaconf ``DictConfig`` inside (``UnpicklingError`` on rank 1). The bytes come from rank 0 of the
  same job, so the receivers load them with ``weights_only=False``. Its tensors go through
  ``distributed_utils.broadcast_tensors``, which sends a non-contiguous tensor (a view, e.g. a slice of carried
  memory) as its raw storage: the receivers got other numbers (measured with gloo). They are sent contiguous.
* Dropout on several workers: ``Trainer._set_seed`` seeds every rank with ``seed + num_updates``, so every rank draws
  the same dropout masks (and the same Performer redraws) for different data. Rank r > 0 is seeded with a number
  derived from (seed + num_updates, r) instead; rank 0 keeps fairseq's seed, so single-worker runs are unchanged
  and every run stays reproducible (and exactly resumable) for a given world size.
"""
import io
import logging
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import torch
from fairseq import trainer as fairseq_trainer
from fairseq import utils
from fairseq.distributed import utils as distributed_utils
from fairseq.models import distributed_fairseq_model
from omegaconf import DictConfig
from torch import nn

from fairseq_ext.errors import ConfigError

logger = logging.getLogger(__name__)

WORKING_BACKENDS = "--ddp-backend legacy_ddp, c10d or pytorch_ddp"


class DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """torch's DDP, with ``device_ids`` / ``output_device`` dropped for a module whose parameters are on the CPU."""

    def __init__(self, module: nn.Module, device_ids: Optional[Sequence[int]] = None,
                 output_device: Optional[int] = None, **options: Any) -> None:
        if all(p.device.type == "cpu" for p in module.parameters()):
            device_ids, output_device = None, None
        super().__init__(module, device_ids=device_ids, output_device=output_device, **options)


def refuse_unusable_fsdp(cfg: DictConfig, main: Callable[..., Any]) -> None:
    """Refuse ``--ddp-backend fully_sharded`` where fairscale's FSDP cannot run."""
    if cfg.distributed_training.ddp_backend != "fully_sharded":
        return
    from fairseq_ext.compat.launch import runs_on_cpu

    if runs_on_cpu(cfg):
        raise ConfigError("--ddp-backend fully_sharded (fairscale's FSDP) runs on CUDA devices only; on CPU use "
                          f"{WORKING_BACKENDS}")
    try:
        import fairscale  # noqa: F401
    except ImportError:
        raise ConfigError("--ddp-backend fully_sharded needs fairscale, which is not part of this stack "
                          f"(scripts/install.sh); use {WORKING_BACKENDS}, or --memory-efficient-bf16 / "
                          "--batch-split K to save memory") from None
    logger.warning("--ddp-backend fully_sharded: fairscale's FSDP is untested with this stack (torch %s)",
                   torch.__version__)


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of data-parallel rank ``rank`` for fairseq's per-update seed ``seed``: ``seed`` itself for
    rank 0, otherwise a 31-bit number drawn from (seed, rank)."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0] >> 1)


def _set_seed(self: fairseq_trainer.Trainer) -> None:
    seed = self.cfg.common.seed + self.get_num_updates()
    utils.set_torch_seed(rank_seed(seed, self.data_parallel_rank))


_fairseq_broadcast_object_slow = distributed_utils._broadcast_object_slow


def _broadcast_object_slow(obj: Any, src_rank: int, group: object, dist_device: torch.device) -> Any:
    """fairseq's ``_broadcast_object_slow`` with the receivers loading rank 0's bytes with weights_only=False."""
    if distributed_utils.get_rank(group) == src_rank:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        data = torch.ByteTensor(buffer.getbuffer()).to(dist_device)  # (bytes,)
        length = torch.LongTensor([len(data)]).to(dist_device)  # (1,)
        distributed_utils.broadcast(length, src=src_rank, group=group)
        distributed_utils.broadcast(data, src=src_rank, group=group)
        return obj
    length = torch.LongTensor([0]).to(dist_device)  # (1,)
    distributed_utils.broadcast(length, src=src_rank, group=group)
    data = torch.ByteTensor(int(length.item())).to(dist_device)  # (bytes,)
    distributed_utils.broadcast(data, src=src_rank, group=group)
    return torch.load(io.BytesIO(data.cpu().numpy()), map_location="cpu", weights_only=False)


_fairseq_broadcast_tensors = distributed_utils.broadcast_tensors


def broadcast_tensors(tensors: Optional[List[torch.Tensor]], src_rank: int, group: object,
                      dist_device: Optional[torch.device] = None) -> List[torch.Tensor]:
    """fairseq's ``broadcast_tensors`` with the source's tensors made contiguous first."""
    if tensors is not None:
        tensors = [tensor.contiguous() for tensor in tensors]
    return _fairseq_broadcast_tensors(tensors, src_rank, group, dist_device)


def apply() -> None:
    from fairseq_ext.compat import CONFIG_CHECKS

    distributed_fairseq_model.DistributedDataParallel = DistributedDataParallel
    distributed_utils._broadcast_object_slow = _broadcast_object_slow
    distributed_utils.broadcast_tensors = broadcast_tensors
    fairseq_trainer.Trainer._set_seed = _set_seed
    if refuse_unusable_fsdp not in CONFIG_CHECKS:
        CONFIG_CHECKS.append(refuse_unusable_fsdp)

