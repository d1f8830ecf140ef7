import pytest
import torch
import torch.distributed as dist

from megatron_a3po.platform.procs import WorkerError, run_distributed


def _allreduce(rank, world, base):
    t = torch.tensor([float(rank + base)])
    dist.all_reduce(t)
    return t.item()


def _boom(rank, world):
    if rank == 1:
        raise ValueError("rank one says no")
    return rank


def test_run_distributed_returns_in_rank_order():
    assert run_distributed(_allreduce, 2, 10) == [21.0, 21.0]


def test_run_distributed_forwards_errors_with_rank():
    with pytest.raises(WorkerError, match=r"(?s)rank 1 failed.*rank one says no"):
        run_distributed(_boom, 2, timeout=60)
