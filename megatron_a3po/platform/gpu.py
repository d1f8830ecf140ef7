"""The device this rank computes and communicates on: one place that knows CPU (gloo), GPU (NCCL) and the
simulated GPU cluster (megatron_a3po.platform.sim).

    has_gpu()            a CUDA device is in use (real, or simulated)
    cuda()               torch.cuda's API as this process sees it (the simulated one under platform.sim)
    device()             the model's device: cuda:<current device> on a GPU, else the CPU
    comm_device()        where tensors handed to torch.distributed collectives must live: the NCCL groups
                         of a GPU job take CUDA tensors only ("No backend type associated with device type
                         cpu"), gloo takes CPU tensors; every collective of ours allocates through this
    set_device(i)        pin this process to GPU i (each rank its own GPU; NCCL refuses two ranks on one)
    synchronize()        wait for the device's queued work (wall-clock timers only); a no-op on CPU
    to_host(obj)         a nested structure with every tensor turned into Python numbers (``tolist``):
                         what may cross ranks in an object collective (a pickled CUDA tensor unpickles on
                         the sender's GPU number, on the receiver)
"""

from __future__ import annotations

import torch

_sim = None  # set by megatron_a3po.platform.sim.activate(): the simulated torch.cuda


def cuda():
    return _sim if _sim is not None else torch.cuda


def has_gpu() -> bool:
    return _sim is not None or torch.cuda.is_available()


def device() -> torch.device:
    if not has_gpu():
        return torch.device("cpu")
    return torch.device("cuda", cuda().current_device())


def comm_device() -> torch.device:
    return device()


def set_device(index: int) -> None:
    if has_gpu():
        cuda().set_device(int(index))


def synchronize() -> None:
    if has_gpu():
        cuda().synchronize()


def to_host(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


class IntervalTimer:
    """Adds up the time of intervals (``start()`` ... ``stop()``) of device work without waiting for the
    device in between: CUDA events on a GPU, read with one synchronisation (``seconds``); the wall clock
    on CPU."""

    def __init__(self):
        self._pairs: list = []
        self._t0 = None
        self._total = 0.0

    def start(self) -> None:
        if has_gpu():
            ev = cuda().Event(enable_timing=True)
            ev.record()
            self._t0 = ev
        else:
            import time

            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._t0 is None:
            raise RuntimeError("IntervalTimer.stop() without start()")
        if has_gpu():
            ev = cuda().Event(enable_timing=True)
            ev.record()
            self._pairs.append((self._t0, ev))
        else:
            import time

            self._total += time.perf_counter() - self._t0
        self._t0 = None

    def add(self, seconds: float) -> None:
        """Add an interval measured elsewhere (already synchronised), e.g. the audit's fallback pass."""
        self._total += seconds

    @property
    def seconds(self) -> float:
        if self._pairs:
            self._pairs[-1][1].synchronize()
            self._total += sum(a.elapsed_time(b) for a, b in self._pairs) / 1e3
            self._pairs = []
        return self._total
