"""torch.distributed stores that listen only where their clients reach them.

A plain ``TCPStore(host, port, is_master=True)`` listens on every interface whatever ``host`` says, so a
single-machine run with ``MASTER_ADDR=127.0.0.1`` would still accept connections from the network.
``tcp_store`` binds the server's socket itself (``master_listen_fd``) to the address the clients are
given, and ``loopback_gloo`` keeps gloo's own sockets on the loopback interface as well.

    bind_address(host)               where a store for clients that dial ``host`` listens
    tcp_store(host, port, ...)       the server (rank 0) or a client of such a store
    init_default_group(backend, ...) torch.distributed's default group from MASTER_ADDR/MASTER_PORT
                                     through ``tcp_store`` (torchrun's agent store when torchrun owns it)
    init_update_group(...)           an extra group outside the default one (weight updates: trainer + engines)
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from datetime import timedelta

log = logging.getLogger(__name__)

ALL_INTERFACES = "0.0.0.0"


def _resolve(host: str) -> str:
    try:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve store address {host!r}: {e}") from None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind_address(host: str, bind: str | None = None) -> str:
    """The address a store's server listens on when its clients dial ``host``.

    ``bind`` (a recipe setting) wins. A loopback host binds loopback; a host that resolves to one of this
    machine's non-loopback addresses binds that address. A host NAME that resolves to loopback only here
    (the Debian ``127.0.1.1 hostname`` line) is reached by other machines at a different address, so
    that one case binds every interface.
    """
    if bind:
        return bind
    ip = _resolve(host)
    if is_loopback(host):
        return ip
    if ipaddress.ip_address(ip).is_loopback:
        log.warning("store address %s resolves to %s on this machine only; listening on all interfaces "
                    "(set the recipe's bind address to restrict it)", host, ip)
        return ALL_INTERFACES
    return ip


def loopback_interface() -> str | None:
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
            return name
    return None


def loopback_gloo(host: str) -> None:
    """When the group's address is loopback, make gloo's pair sockets listen on loopback too (gloo picks
    its interface from GLOO_SOCKET_IFNAME, else from this host's name, which may be a LAN address)."""
    if is_loopback(host) and "GLOO_SOCKET_IFNAME" not in os.environ:
        lo = loopback_interface()
        if lo:
            os.environ["GLOO_SOCKET_IFNAME"] = lo


def tcp_store(host: str, port: int, *, world_size: int | None, is_master: bool, timeout: timedelta,
              bind: str | None = None, wait_for_workers: bool = True):
    """A TCPStore whose server socket is bound to ``bind_address(host, bind)``; clients dial ``host``."""
    import torch.distributed as dist

    if not is_master:
        return dist.TCPStore(host, port, world_size, False, timeout, wait_for_workers=wait_for_workers)
    addr = bind_address(host, bind)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((addr, port))
        except OSError as e:
            raise RuntimeError(f"store: cannot listen on {addr}:{port}: {e}") from None
        sock.listen(1024)
        store = dist.TCPStore(host, sock.getsockname()[1], world_size, True, timeout,
                              wait_for_workers=wait_for_workers, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server owns the listening fd now (Python must not close it on GC)
    return store


def init_default_group(backend: str, *, timeout: timedelta, bind: str | None = None) -> None:
    """``dist.init_process_group`` from MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE with a store from
    ``tcp_store``. Under torchrun's elastic agent the agent already hosts the store (and binds it as
    torchrun's rendezvous options say): then its env:// store is used as is."""
    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    loopback_gloo(host)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        dist.init_process_group(backend=backend, timeout=timeout)
        return
    store = tcp_store(host, port, world_size=world, is_master=rank == 0, timeout=timeout, bind=bind)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)


def init_update_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
                      backend: str = "nccl", timeout_s: float = 300.0, *, store=None):
    """Create an extra torch.distributed process group outside the default one (a store at
    ``master_address:master_port`` hosted by rank 0 and listening on that address only, keys under
    ``group_name``), as an SGLang server does on ``/init_weights_update_group``; returns the group.
    Rank 0 may pass the ``store`` it made beforehand (``tcp_store(..., port=0)``: bound before any member
    is told the port, so no other process can take it in between).

    Here, below both the trainer's transport (rollout.weights) and the CPU engine, since both join such
    groups."""
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        loopback_gloo(master_address)
    if store is None:
        store = tcp_store(master_address, master_port, world_size=world_size, is_master=rank == 0,
                          timeout=timeout)
    store = c10d.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store,
                                           group_name=group_name, timeout=timeout)
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg
