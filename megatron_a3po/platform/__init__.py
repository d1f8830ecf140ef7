"""Running megatron-core here: distributed init, CPU support (gloo), seeding.

    synchronize()                    wait for queued device work (timers); no-op on CPU
    init_distributed(tp, pp, seed)   torch.distributed from the environment (torchrun / run_distributed;
                                     the store listens on MASTER_ADDR only, see platform/stores.py),
                                     megatron's model-parallel groups, the CPU patches when no CUDA,
                                     and seeds.
"""

from __future__ import annotations

import os
import random

import torch
import torch.distributed as dist

from megatron_a3po.platform import gpu as _device
from megatron_a3po.platform.cpu import apply_cpu_patches, apply_optimizer_fixes
from megatron_a3po.platform.gpu import comm_device, device, set_device, synchronize, to_host
from megatron_a3po.platform.stores import init_default_group


def is_cpu() -> bool:
    return not _device.has_gpu()


def seed_everything(seed: int) -> None:
    """Seed python, torch's CPU generator, and on GPU megatron's model-parallel CUDA RNG tracker."""
    random.seed(seed)
    torch.manual_seed(seed)
    if not is_cpu():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 0, *, timeout_s: float = 1800) -> None:
    """Initialise torch.distributed (if needed) and megatron's parallel state for TP x PP (x DP).
    ``timeout_s``: every group's collective timeout (the default group, when made here, and megatron's
    groups); the trainer passes config.timeouts' ``pg_timeout_s``."""
    import datetime
    import math

    from megatron.core import parallel_state as ps

    if is_cpu():
        apply_cpu_patches()
    apply_optimizer_fixes()
    if not dist.is_initialized():
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
            if k not in os.environ:
                raise RuntimeError(f"init_distributed: environment variable {k} is not set "
                                   "(start with torchrun or megatron_a3po.platform.procs.run_distributed)")
        backend = "gloo" if is_cpu() else "nccl"
        if not is_cpu():
            set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if _device._sim is not None:  # a simulated rank (platform.sim): an NCCL-strict group, no peers
            from megatron_a3po.platform import sim

            sim.init_process_group(timeout=datetime.timedelta(seconds=timeout_s))
        else:
            init_default_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of parallel.tp x parallel.pp = {tp} x {pp}")
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() != tp or ps.get_pipeline_model_parallel_world_size() != pp:
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     distributed_timeout_minutes=math.ceil(timeout_s / 60))
    seed_everything(seed + 100 * ps.get_pipeline_model_parallel_rank())


__all__ = ["init_distributed", "is_cpu", "seed_everything", "apply_cpu_patches", "synchronize", "device",
           "comm_device", "set_device", "to_host"]
