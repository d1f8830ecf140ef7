"""Global ranks: who am I, wait for everyone, send an object from one rank to all, run something on rank 0.

Every function works without torch.distributed initialised (one process: rank 0 of a world of 1).

    global_rank()                    this process's rank in the default group (0 when not distributed)
    world_size()                     ranks in the default group (1 when not distributed)
    barrier()                        every rank waits for the others (no-op alone)
    broadcast_object(obj, src=0)     ``src``'s obj on every rank (collective)
    on_rank0(fn, *args)              fn on rank 0 only; its exception is raised on every rank (collective)
    wait_for_rank0()                 the other ranks' half of on_rank0
"""

from __future__ import annotations

import logging
import pickle

import torch.distributed as dist

log = logging.getLogger("megatron_a3po.platform")


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (collective; pickled: only for the project's own objects)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_rank0(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on global rank 0, whose half of a collective this is: the other ranks call
    ``wait_for_rank0`` at the same point (or this function: there ``fn`` is not called). An exception in
    ``fn`` is raised on EVERY rank: the other ranks, which wait here for rank 0 (e.g. while the trainer's
    rollout side waits for a batch, an evaluation, a weight update), exit with rank 0's error instead of
    sitting in a collective until its timeout. Returns fn's result on rank 0, None elsewhere."""
    if global_rank() != 0:
        return wait_for_rank0()
    try:
        out = fn(*args, **kwargs)
    except Exception as e:
        broadcast_object(_portable(e))
        raise
    broadcast_object(None)
    return out


def wait_for_rank0() -> None:
    """The other ranks' half of ``on_rank0``: returns when rank 0's call returned, raises what it raised."""
    failure = broadcast_object(None)
    if failure is not None:
        log.error("rank %d: stopping, rank 0 failed: %s: %s", global_rank(), type(failure).__name__, failure)
        raise failure


def _portable(e: Exception) -> Exception:
    """``e`` if it pickles (to reach the other ranks as it is), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any exception object
        return RuntimeError(f"{type(e).__name__}: {e}")
