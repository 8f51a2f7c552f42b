"""Every documented way to start fairseq works on CPU and GPU: a wrapper around ``distributed_utils.call_main``.

``call_main(cfg, main)`` is where every fairseq command (``fairseq-train``, ``-eval-lm``, ``-validate``,
``-generate``, ``-interactive``) decides how many processes to start. fairseq 0.12.3.1 sizes everything by
``torch.cuda.device_count()``, which breaks launches that its documentation promises:

* ``--distributed-world-size N --cpu``: ``_infer_single_node_init`` asserts "world size is N but have 0 available
  devices"; here N processes are spawned with a free localhost port;
* ``--distributed-init-method tcp://...`` without ``--distributed-no-spawn``: fairseq spawns
  ``min(device_count(), N)`` = 0 processes and exits 0 having trained nothing; on CPU this spawns
  ``--distributed-num-procs`` processes (default: all N - ``--distributed-rank`` remaining ranks), and a launch
  that would start no process is an error;
* ``torchrun``: fairseq only reads torchrun's environment when the world size it derived from the GPU count is
  above 1 (on CPU, or one GPU per node, every process trains alone and exits 0) and then computes the device as
  ``rank % device_count()`` (``ZeroDivisionError`` on CPU); here ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` are
  used whenever torchrun set them;
* the default ``--distributed-backend nccl`` cannot run on CPU processes: ``gloo`` is used there (logged);
* fairseq's workers return with their process group alive, and a CPU worker then sometimes aborted at interpreter exit
  ("terminate called without an active exception", SIGABRT: 2 of 9 runs of the two-worker launch test here) after
  training had finished; each CPU worker here destroys its group before it returns (``run_worker``), and a spawned
  worker then leaves with ``os._exit(0)`` after its exit handlers (``spawned_worker``): the abort still came, rarely,
  from the interpreter's own teardown.

Before any of that, the checks in ``fairseq_ext.compat.CONFIG_CHECKS`` run on the whole config (precision flags,
data-parallel backends). In a single process the wrapper returns ``main``'s result (fairseq's returns None), so
in-process callers such as the test harness go through the same checks as the command line.
"""
import atexit
import logging
import os
import socket
import sys
from typing import Any, Callable

import torch
from fairseq.distributed import utils as distributed_utils
from omegaconf import DictConfig, open_dict

from fairseq_ext.errors import ConfigError

logger = logging.getLogger(__name__)

TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")

_fairseq_call_main = distributed_utils.call_main


def runs_on_cpu(cfg: DictConfig) -> bool:
    """Whether this run's processes compute on the CPU (``--cpu``, or no CUDA device)."""
    return bool(cfg.common.cpu) or not torch.cuda.is_available()


def free_port() -> int:
    """A TCP port that is free on localhost right now (for a single-node CPU launch)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return int(sock.getsockname()[1])


def use_torchrun_environment(cfg: DictConfig) -> bool:
    """Take rank, world size and device from torchrun's (or torch.distributed.launch's) environment, if set."""
    dist = cfg.distributed_training
    if dist.distributed_init_method is not None or cfg.common.tpu or not all(k in os.environ for k in TORCHRUN_ENV):
        return False
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size <= 1:
        return False
    rank = int(os.environ["RANK"])
    with open_dict(dist):
        dist.distributed_init_method = "env://"
        dist.distributed_world_size = world_size
        dist.distributed_rank = rank
        if runs_on_cpu(cfg):
            dist.device_id = 0
        elif "LOCAL_RANK" in os.environ:
            dist.device_id = int(os.environ["LOCAL_RANK"])
        else:
            dist.device_id = rank % torch.cuda.device_count()
        dist.distributed_no_spawn = True  # torchrun started the processes
    logger.info("torchrun environment: rank %d of %d (device %d)", rank, world_size, dist.device_id)
    return True


def cpu_processes_to_spawn(cfg: DictConfig) -> int:
    """How many worker processes this CPU launch spawns (the rest of the ranks run elsewhere)."""
    dist = cfg.distributed_training
    requested = dist.get("distributed_num_procs", None)
    start_rank = dist.distributed_rank or 0
    count = requested if requested is not None and requested > 1 else dist.distributed_world_size - start_rank
    if count < 1:
        raise ConfigError(f"--distributed-rank {start_rank} leaves no rank of --distributed-world-size "
                          f"{dist.distributed_world_size} to start on this machine: the first rank of this node "
                          f"must be below the world size")
    return count


def call_main(cfg: DictConfig, main: Callable[..., Any], **kwargs: Any) -> Any:
    from fairseq_ext.compat import CONFIG_CHECKS

    for check in CONFIG_CHECKS:
        check(cfg, main)
    dist = cfg.distributed_training
    use_torchrun_environment(cfg)
    if not runs_on_cpu(cfg) or cfg.common.tpu:
        if dist.distributed_init_method is None and dist.distributed_world_size <= 1:
            return main(cfg, **kwargs)
        return _fairseq_call_main(cfg, main, **kwargs)
    if dist.distributed_backend == "nccl":
        logger.info("CPU processes communicate with --distributed-backend gloo (nccl needs GPUs)")
        dist.distributed_backend = "gloo"
    if dist.distributed_init_method is None:
        if dist.distributed_world_size <= 1:
            return main(cfg, **kwargs)
        if _slurm_launch():
            distributed_utils.infer_init_method(dist)
        else:
            _single_node_init(dist)
    if dist.distributed_no_spawn:
        run_worker(dist.device_id, main, cfg, kwargs)
        return None
    nprocs = cpu_processes_to_spawn(cfg)
    kwargs["start_rank"] = dist.distributed_rank or 0
    dist.distributed_rank = None  # assigned per spawned process: start_rank + index
    logger.info("spawning %d CPU worker processes (ranks %d..%d of %d) at %s", nprocs, kwargs["start_rank"],
                kwargs["start_rank"] + nprocs - 1, dist.distributed_world_size, dist.distributed_init_method)
    torch.multiprocessing.spawn(fn=spawned_worker, args=(main, cfg, kwargs), nprocs=nprocs, join=True)
    return None


def spawned_worker(index: int, main: Callable[..., Any], cfg: DictConfig, kwargs: Any) -> None:
    """``run_worker`` in a spawned process, which then ends with ``os._exit(0)`` once its exit handlers have run and
    its output is flushed: a spawned child otherwise finalizes the interpreter, whose C++ static destructors still
    aborted a finished worker now and then ("terminate called without an active exception", SIGABRT: 1 of about 20
    two-worker launches after its process group was destroyed). A failing worker raises as before, so that spawn
    reports its traceback."""
    run_worker(index, main, cfg, kwargs)
    logging.shutdown()
    atexit._run_exitfuncs()  # tensorboard writers, multiprocessing's finalizers: what a normal exit would run first
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_worker(index: int, main: Callable[..., Any], cfg: DictConfig, kwargs: Any) -> None:
    """One CPU worker: fairseq's ``distributed_main`` (init, ``main``, a final barrier), then its process group
    destroyed, so that gloo's threads are joined before the interpreter exits rather than during its teardown."""
    try:
        distributed_utils.distributed_main(index, main, cfg, kwargs)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _slurm_launch() -> bool:
    return os.environ.get("SLURM_STEP_NODELIST", os.environ.get("SLURM_JOB_NODELIST")) is not None


def _single_node_init(dist: DictConfig) -> None:
    """fairseq's ``_infer_single_node_init`` without its GPU-count assertion: localhost, a free port."""
    port = dist.distributed_port if dist.distributed_port > 0 else free_port()
    dist.distributed_port = port
    dist.distributed_init_method = f"tcp://localhost:{port}"


def apply() -> None:
    distributed_utils.call_main = call_main
