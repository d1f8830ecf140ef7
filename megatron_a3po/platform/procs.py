"""Start N local processes that form a torch.distributed group (gloo on CPU, NCCL on GPU).

Used by the tests (TP/PP on CPU), the checkpoint CLI (which starts its own ranks so users never call
torchrun) and the CPU demo. ``fn`` must be a module-level function: it is pickled into spawned
processes. Its return values come back in rank order; an exception in any rank is re-raised here with
that rank's traceback, and the other ranks are terminated.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable
from megatron_a3po.errors import RunFailure


def free_port() -> int:
    """A port that was free a moment ago. Another process can take it before the caller's server binds it:
    servers started here bind first instead (``listening_socket``, ``stores.tcp_store`` with port 0), and
    one that binds itself retries on EADDRINUSE (rollout/router.py)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A TCP socket listening on ``host:port`` (0: a free port), inheritable by a child server
    (``subprocess.Popen(pass_fds=...)``): the port is held from now on, so no other process can take it
    between choosing it and the server's start. Raises OSError (EADDRINUSE) if ``port`` is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def die_with_parent():
    """``preexec_fn`` for a child server (engine, router): on Linux it gets SIGTERM when the process that
    started it dies, even by SIGKILL, so no server outlives a killed trainer."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux / no libc: the parent's own cleanup still runs
        pass


def stop_process(proc, timeout: float = 10.0):
    """SIGTERM a ``subprocess.Popen`` (by its pid), SIGKILL it if it has not exited after ``timeout``."""
    stop_processes([proc], timeout)


def stop_processes(procs, timeout: float = 10.0) -> None:
    """SIGTERM every ``subprocess.Popen`` of ``procs`` still running, all at once; SIGKILL each one that has
    not exited ``timeout`` seconds later."""
    import subprocess
    import time

    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=30)


class WorkerError(RunFailure, RuntimeError):
    pass


def _entry(rank, world_size, port, backend, fn, args, kwargs, queue, env, pg_timeout_s):
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    import datetime

    import torch
    import torch.distributed as dist

    from megatron_a3po.platform.stores import init_default_group

    torch.set_num_threads(int(env.get("A3PO_THREADS_PER_RANK", "1")))
    try:
        if backend == "nccl":  # one GPU per rank: NCCL refuses two ranks of a node on one device
            from megatron_a3po.platform.gpu import set_device

            set_device(rank)
        init_default_group(backend, timeout=datetime.timedelta(seconds=pg_timeout_s))
        out = fn(rank, world_size, *args, **kwargs)
        queue.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - forwarded to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:  # noqa: BLE001 - teardown, best effort: the process group is destroyed below
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args, backend: str | None = None,
                    timeout: float = 600.0, env: dict | None = None, pg_timeout_s: float = 1800.0,
                    **kwargs) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` spawned processes; ``pg_timeout_s``
    is their default group's collective timeout (the trainer passes config.timeouts')."""
    import queue as _q

    import torch
    import torch.multiprocessing as mp

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    child_env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, backend, fn, args, kwargs, q, child_env,
                                              pg_timeout_s),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    import time

    try:
        deadline = time.monotonic() + timeout
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(f"distributed run timed out after {timeout:.0f}s ({len(results)}/{world_size} ranks done)")
            try:
                rank, ok, payload = q.get(timeout=min(remaining, 1.0))
            except _q.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results]
                if dead:
                    raise WorkerError(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} before reporting")
                continue
            if not ok:
                raise WorkerError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
    finally:
        # after a failure, the other ranks get a few seconds to stop on their own (a rank that waited in a
        # collective for the failed one may be reporting that failure, see platform/ranks.py on_rank0)
        until = time.monotonic() + 5
        for p in procs:
            p.join(timeout=max(0.1, until - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return [results[r] for r in range(world_size)]
