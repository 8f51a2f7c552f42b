"""``fairseq_ext.compat.distributed``: what rank 0 broadcasts when several workers resume arrives intact.

fairseq's ``broadcast_object`` (rank 0 loads a checkpoint and sends it) failed on the receivers under torch 2.13
(weights-only ``torch.load`` refuses omegaconf's ``DictConfig``: ``UnpicklingError``) and sent a non-contiguous
tensor's raw storage (the receivers got the wrong numbers). Checked once by hand with ``broadcast(tmp_path,
without=...)``: without ``_broadcast_object_slow`` rank 1 raises UnpicklingError (DictConfig not an allowed
global); without ``broadcast_tensors`` the view arrives as other numbers.
"""

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from fairseq_ext.compat.launch import free_port


def payload():
    return {"cfg": OmegaConf.create({"model": {"mem_len": 8}}),
            "view": torch.arange(24.0).view(4, 6)[:, 1:4],  # (4, 3), not contiguous
            "nested": [torch.ones(2), {"step": 3}]}


def _worker(rank: int, port: int, out: str, without: tuple) -> None:
    import fairseq_ext  # noqa: F401  (applies the shims)
    from fairseq.distributed import utils as distributed_utils
    from fairseq_ext.compat import distributed as compat_distributed

    for name in without:  # undo these parts of the shim
        setattr(distributed_utils, name, getattr(compat_distributed, "_fairseq_" + name.lstrip("_")))
    dist.init_process_group("gloo", init_method=f"tcp://localhost:{port}", world_size=2, rank=rank)
    try:
        received = distributed_utils.broadcast_object(payload() if rank == 0 else None, src_rank=0,
                                                      group=dist.group.WORLD, dist_device=torch.device("cpu"))
        if rank == 1:
            torch.save({"view": received["view"], "mem_len": received["cfg"].model.mem_len,
                        "nested": received["nested"]}, out)
    except Exception as error:  # reported to the test through the file
        if rank == 1:
            torch.save({"error": f"{type(error).__name__}: {error}"}, out)
    finally:
        dist.destroy_process_group()


def broadcast(tmp_path, without: tuple = ()) -> dict:
    """What rank 1 of 2 gloo processes receives from rank 0's ``payload()`` (fairseq's code for ``without``)."""
    out = str(tmp_path / "received.pt")
    torch.multiprocessing.spawn(_worker, args=(free_port(), out, without), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_rank_0s_checkpoint_state_arrives_intact_on_the_other_workers(tmp_path):
    received = broadcast(tmp_path)
    assert "error" not in received, received.get("error")
    assert torch.equal(received["view"], payload()["view"]) and received["mem_len"] == 8
    assert torch.equal(received["nested"][0], torch.ones(2)) and received["nested"][1] == {"step": 3}
