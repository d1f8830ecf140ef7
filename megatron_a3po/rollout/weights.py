"""Weight transports: how new trainer weights reach every rollout server.

``WeightSync`` (sync.py) wraps every push in pause (``pause_mode``) -> push -> verify version ->
continue; a transport only moves the weights. Each transport is a ``Transport`` and declares what it can
do (``can_resend``, ``needs_group``), which is all ``WeightSync`` asks of it.

* ``DiskTransport``: the trainer writes an HF directory; every server gets
  ``POST /update_weights_from_disk {"model_path", "weight_version", "load_format", "flush_cache",
  "abort_all_requests"}`` (retried per server).
* ``NcclTransport``: the trainer is rank 0 of a process group with every server's TP ranks
  (server i's TP rank t is ``rank_offset_i + t``). ``init`` posts ``/init_weights_update_group`` to
  every server while joining the group itself; ``push`` opens a weight-update session on every server
  (``/begin_weight_update``; closed by ``/end_weight_update`` afterwards, also on failure) and consumes an iterator of ``(name, tensor)`` in
  buckets of ``bucket_bytes``: for each bucket it posts ``/update_weights_from_distributed {"names",
  "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests", "weight_version"}`` to every
  server and, concurrently, broadcasts each tensor from rank 0 in the order of ``names``. Only the last
  bucket carries ``weight_version`` (and ``flush_cache``), so a server reports the new version only
  once it has every tensor. Each bucket is bounded by ``timeout_s`` (its HTTP calls and the trainer's
  ``Work.wait``); the group's own timeout is ``2 x timeout_s``, so on NCCL a failed bucket is detected and
  the group aborted before torch's watchdog acts. A bucket is not retried (a half-done broadcast cannot be
  replayed): a failed push gives the group up (``stale``); the controller then either pushes again from a
  new export over the servers still alive (when the caller passed a callable, see controller.py) or
  fails the update with every server paused, and the next push makes a new group.
  The group's members are fixed when it is made: when the fleet changes (a server died, hung, or comes
  back), ``regroup`` makes a new one over the servers in the fleet (the old one is destroyed on the
  trainer and, best effort, on every server; a new master port), before the next push. A server that
  comes back with older weights than the fleet's joins at the next push, which brings it to the new
  version with the others (the controller holds it out until then).
  ``backend="gloo"`` runs the same code on CPU (tests); GPU deployments use ``"nccl"``.
* ``TensorTransport`` (colocated: trainer and servers on one machine): per update ``/begin_weight_update``,
  per bucket ``/update_weights_from_tensor {"serialized_named_tensors", "flush_cache", "weight_version"}``
  (only the last bucket carries the version and the flush), ``/end_weight_update`` (also after a
  failure). The tensors travel as shared-memory handles: a list of ``(name, tensor)`` pickled by
  ``multiprocessing``'s ForkingPickler with torch's reductions, base64 (what SGLang's
  ``MultiprocessingSerializer`` reads), one copy per TP rank of the server. torch's sharing strategy must be
  ``file_system`` in this process (with the default, SGLang's scheduler dies with ``AuthenticationError``):
  the transport sets it.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import ClassVar, Iterable, Iterator

import torch

from megatron_a3po.platform.stores import init_update_group, tcp_store
from megatron_a3po.rollout.fleet import Fleet, FleetError, ServerCallError

log = logging.getLogger("megatron_a3po.rollout.weights")


class Transport(ABC):
    """How new weights reach the servers. Every transport declares its capabilities as class attributes
    (``check_transport`` rejects one that does not):

    * ``can_resend``: the last push can be sent again, to a server that comes back with older weights
      (``resend_payload`` says what of the push to keep for that). A streaming push (tensors, NCCL)
      consumed its source: it cannot.
    * ``needs_group``: pushes run over an update group whose members are fixed when it is made (``init``);
      when the fleet changes the group is made again (``members_changed``, ``regroup``), and a push that
      loses servers can be made again over the survivors from a fresh export.
    """

    can_resend: ClassVar[bool]
    needs_group: ClassVar[bool]

    @abstractmethod
    async def push(self, fleet: Fleet, version: int, *, retries: int = 2, flush_cache: bool = True,
                   servers=None, **payload):
        """Move ``version``'s weights (``payload``: what the trainer handed over) to ``servers``."""

    def resend_payload(self, payload: dict) -> dict | None:
        """What of a successful push's ``payload`` a later push to one server needs (``can_resend``)."""
        return None

    async def init(self, fleet: Fleet, servers=None):
        """Make what pushes need (the update group of a ``needs_group`` transport); after ``Fleet.start``."""

    def members_changed(self, servers) -> bool:
        """``needs_group``: True when the group must be made again before a push to ``servers``."""
        return False

    async def regroup(self, fleet: Fleet, servers=None):
        """``needs_group``: make the update group again over ``servers``."""
        raise NotImplementedError(f"{type(self).__name__} declares needs_group but has no regroup")

    async def close(self, fleet: Fleet):
        """Give up what ``init`` made (on the trainer and, best effort, on every server)."""


CAPABILITIES = ("can_resend", "needs_group")


def check_transport(t) -> Transport:
    """``t`` if it is a ``Transport`` that declares every capability (a bool) and implements what its
    capabilities need; else TypeError naming what is missing."""
    name = type(t).__name__
    if not isinstance(t, Transport):
        raise TypeError(f"weight transport {name} is not a megatron_a3po.rollout.weights.Transport")
    missing = [c for c in CAPABILITIES if not isinstance(getattr(type(t), c, None), bool)]
    if missing:
        raise TypeError(f"weight transport {name} does not declare {', '.join(missing)} (class attributes, "
                        "True or False: see Transport)")
    need = ([("resend_payload", Transport.resend_payload)] if t.can_resend else []) + (
        [("regroup", Transport.regroup), ("init", Transport.init)] if t.needs_group else [])
    lacking = [n for n, base in need if getattr(type(t), n) is base]
    if lacking:
        raise TypeError(f"weight transport {name} declares {'can_resend' if t.can_resend else 'needs_group'} "
                        f"but does not implement {', '.join(lacking)}")
    return t


class DiskTransport(Transport):
    can_resend = True  # the HF directory stays on disk: a server that comes back loads it
    needs_group = False

    def __init__(self, load_format: str | None = None, flush_cache: bool = True):
        self.load_format = load_format
        self.flush_cache = flush_cache

    def body(self, version: int, hf_dir: str, flush_cache: bool = True) -> dict:
        b = {"model_path": str(hf_dir), "weight_version": str(version),
             "flush_cache": bool(self.flush_cache and flush_cache), "abort_all_requests": False}
        if self.load_format:
            b["load_format"] = self.load_format
        return b

    async def push(self, fleet: Fleet, version: int, *, hf_dir=None, retries: int = 2, flush_cache: bool = True,
                   servers=None, **_):
        """``flush_cache=False`` when requests still hold KV caches (pause mode in_place): SGLang fails a
        flush then. ``servers``: only these (default: every live server)."""
        if hf_dir is None:
            raise ValueError("DiskTransport.push needs hf_dir (the HF directory the trainer wrote)")
        await fleet.call_all("/update_weights_from_disk", self.body(version, hf_dir, flush_cache), retries=retries,
                             timeout=600.0, servers=servers)

    def resend_payload(self, payload: dict) -> dict | None:
        return {"hf_dir": payload["hf_dir"]} if payload.get("hf_dir") else None


async def _begin_session(fleet: Fleet, s):
    """``/begin_weight_update`` on one server; a session left open (by a trainer that died inside one)
    is closed and opened again."""
    try:
        await fleet.call_one(s, "/begin_weight_update", {}, retries=0)
    except ServerCallError as e:
        if "already open" not in e.message:
            raise
        await fleet.call_one(s, "/end_weight_update", {}, retries=0)
        await fleet.call_one(s, "/begin_weight_update", {}, retries=0)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list]:
    """Group (name, tensor) pairs into lists of about ``bucket_bytes`` (a big tensor is its own bucket)."""
    cur, size = [], 0
    for name, t in named_tensors:
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > bucket_bytes:
            yield cur
            cur, size = [], 0
        cur.append((name, t))
        size += nbytes
    if cur:
        yield cur


def _with_last(it):
    it = iter(it)
    try:
        prev = next(it)
    except StopIteration:
        return
    for x in it:
        yield prev, False
        prev = x
    yield prev, True


def _end_sessions(fleet: Fleet, servers, retries: int):
    return asyncio.gather(*(fleet.call_one(s, "/end_weight_update", {}, retries=retries) for s in servers),
                          return_exceptions=True)


class TensorTransport(Transport):
    can_resend = False  # the handles of a push are consumed by it
    needs_group = False

    def __init__(self, *, bucket_bytes: int = 512 << 20, server_tp: int = 1):
        import torch.multiprocessing as tmp

        self.bucket_bytes, self.server_tp = bucket_bytes, server_tp
        tmp.set_sharing_strategy("file_system")

    @staticmethod
    def serialize(bucket: list) -> str:
        """``[(name, tensor)]`` as SGLang's ``MultiprocessingSerializer.serialize(..., output_str=True)``
        writes it: shared-memory handles of copies (the trainer's own storage is never moved to shared
        memory)."""
        import base64
        import io
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing  # noqa: F401 - registers torch's reductions with ForkingPickler

        buf = io.BytesIO()
        ForkingPickler(buf).dump([(n, t.detach().to("cpu", copy=True).contiguous()) for n, t in bucket])
        return base64.b64encode(buf.getvalue()).decode()

    def update_body(self, bucket: list, version: int | None, last: bool, flush_cache: bool = True) -> dict:
        ser = self.serialize(bucket)
        b = {"serialized_named_tensors": [ser] * self.server_tp, "flush_cache": bool(last and flush_cache)}
        if last and version is not None:
            b["weight_version"] = str(version)
        return b

    async def push(self, fleet: Fleet, version: int, *, named_tensors=None, retries: int = 0, flush_cache: bool = True,
                   servers=None, **_):
        """Each server gets its own handles (a server that loads one releases it), so a call is not
        retried: a failure raises and the controller leaves every server paused."""
        if named_tensors is None:
            raise ValueError("TensorTransport.push needs named_tensors (an iterable of (name, tensor))")
        servers = fleet.live() if servers is None else list(servers)
        try:
            await asyncio.gather(*(_begin_session(fleet, s) for s in servers))
            for bucket, last in _with_last(buckets(named_tensors, self.bucket_bytes)):
                res = await asyncio.gather(*(fleet.call_one(s, "/update_weights_from_tensor", self.update_body(
                    bucket, version, last, flush_cache), retries=0, timeout=600.0) for s in servers),
                    return_exceptions=True)
                for r in res:
                    if isinstance(r, BaseException):
                        raise r if isinstance(r, ServerCallError) else FleetError(str(r))
        finally:
            await _end_sessions(fleet, servers, retries)


class NcclTransport(Transport):
    can_resend = False  # a broadcast consumes the trainer's export
    needs_group = True

    def __init__(self, master_address: str, master_port: int | None = None, *, group_name: str = "a3po_weights",
                 bucket_bytes: int = 512 << 20, backend: str = "nccl", server_tp: int | list[int] = 1,
                 device: str | torch.device | None = None, timeout_s: float = 300.0):
        self.master_address, self.master_port = master_address, master_port
        self.group_name, self.bucket_bytes, self.backend = group_name, bucket_bytes, backend
        self.server_tp = server_tp
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu"))
        self.timeout_s = timeout_s
        self.group = None
        self.stale = False  # a push failed on this group: it is made again before the next push
        self.urls: list[str] = []  # the members of the current group, in rank order
        self.regroups = 0
        self._tp_of: dict[str, int] = {}  # a list server_tp is per server of the first group
        self._strays: set[asyncio.Future] = set()  # joins of groups a server refused, until their timeout

    def init_bodies(self, urls: list[str]) -> dict[str, dict]:
        if isinstance(self.server_tp, list):
            if not self._tp_of:
                if len(self.server_tp) != len(urls):
                    raise ValueError(f"server_tp has {len(self.server_tp)} entries for {len(urls)} servers")
                self._tp_of = dict(zip(urls, self.server_tp))
            tps = [self._tp_of[u] for u in urls]
        else:
            tps = [self.server_tp] * len(urls)
        world = 1 + sum(tps)
        out, off = {}, 1
        for u, tp in zip(urls, tps):
            out[u] = {"master_address": self.master_address, "master_port": self.master_port, "rank_offset": off,
                      "world_size": world, "group_name": self.group_name, "backend": self.backend}
            off += tp
        return out

    def update_body(self, bucket: list, version: int | None, last: bool, flush_cache: bool = True) -> dict:
        b = {"names": [n for n, _ in bucket], "dtypes": [_dtype_name(t.dtype) for _, t in bucket],
             "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
             "flush_cache": bool(last and flush_cache), "abort_all_requests": False}
        if last and version is not None:
            b["weight_version"] = str(version)
        return b

    def members_changed(self, servers) -> bool:
        """True when the group must be made again before a push to ``servers``: its members differ, or a
        push on it failed (a half-done broadcast leaves the survivors' collectives out of step)."""
        return self.stale or (self.group is not None and [s.url for s in servers] != self.urls)

    @property
    def group_timeout_s(self) -> float:
        """The weight group's own process-group timeout (NCCL's watchdog; gloo's op timeout): twice the
        push's per-bucket bound, so a failed bucket is detected (``timeout_s``) and the group destroyed
        (NCCL: its communicator aborted) before the watchdog would act (docs/rollout.md, Bounds)."""
        return 2 * self.timeout_s

    def _abandon(self):
        """Drop this process's side of a group a push failed on: gloo closes its connections (a server
        still waiting in that broadcast gets an error at once); NCCL aborts the communicator (kernels
        that wait for a dead peer end; the watchdog has nothing left to time out)."""
        self.stale = True
        if self.group is not None:
            import torch.distributed as dist

            try:
                if self.backend == "nccl":
                    self.group.abort()  # at once, even with a kernel pending on it
                dist.destroy_process_group(self.group)
            except Exception as e:  # noqa: BLE001 - it is gone either way
                log.warning("destroying the failed weight-update group: %s", e)
            self.group = None

    async def regroup(self, fleet: Fleet, servers=None):
        """A new update group over ``servers`` (default: the servers now in the fleet; see the module
        docstring)."""
        servers = fleet.live() if servers is None else list(servers)
        log.warning("weight-update group: %s -> %s; making a new group", self.urls, [s.url for s in servers])
        # best effort on every server in the fleet: a server that comes back from a hang may still hold
        # the old group (and would refuse a new one of the same name)
        await asyncio.gather(*(fleet.call_one(s, "/destroy_weights_update_group", {"group_name": self.group_name},
                                              retries=0, timeout=30.0) for s in servers), return_exceptions=True)
        if self.group is not None:
            import torch.distributed as dist

            # gloo: local. NCCL: the communicator is torn down here; its peers that left hold no
            # pending collective (a push that failed mid-broadcast abandoned its group already)
            dist.destroy_process_group(self.group)
            self.group = None
        self.stale = True  # until the new group is made (a failed regroup is tried again before the next push)
        self.master_port = None  # a new store on a free port (a store of the old group may linger on its port)
        self.regroups += 1
        await self.init(fleet, servers)
        self.stale = False

    async def init(self, fleet: Fleet, servers=None):
        """Make the update group with ``servers`` (default: the fleet): this process's store listens first
        (on ``master_port``, or a free port when None), then the servers are told its port and join. A
        group of this name that a server still holds (a crashed or resumed run of the same name, on a fleet
        the trainer did not start) is destroyed first, best effort; if a server refuses to join, this fails
        at once (not after the group's timeout)."""
        from datetime import timedelta

        servers = fleet.live() if servers is None else list(servers)
        self.urls = [s.url for s in servers]
        store = await asyncio.to_thread(tcp_store, self.master_address, self.master_port or 0, world_size=None,
                                        is_master=True, timeout=timedelta(seconds=self.timeout_s),
                                        wait_for_workers=False)
        self.master_port = store.port
        bodies = self.init_bodies(self.urls)
        world = next(iter(bodies.values()))["world_size"]
        await asyncio.gather(*(fleet.call_one(s, "/destroy_weights_update_group", {"group_name": self.group_name},
                                              retries=0, timeout=30.0) for s in servers), return_exceptions=True)
        join = asyncio.ensure_future(asyncio.to_thread(init_update_group, self.master_address, self.master_port, 0,
                                                       world, self.group_name, self.backend, self.group_timeout_s,
                                                       store=store))
        res = await asyncio.gather(*(fleet.call_one(s, "/init_weights_update_group", bodies[s.url], retries=0,
                                                    timeout=self.timeout_s) for s in servers), return_exceptions=True)
        errs = [r for r in res if isinstance(r, BaseException)]
        if errs:  # the join waits for ranks that will never come: leave it to its timeout, fail now
            self._strays.add(join)  # held until it ends (its thread cannot be cancelled); close() cancels it
            join.add_done_callback(lambda f: (self._strays.discard(f), f.cancelled() or f.exception()))
            raise FleetError(f"init_weights_update_group failed: {errs[0]}")
        try:
            self.group = await join
        except Exception as e:
            raise FleetError(f"init_weights_update_group failed: {e}") from e

    def _broadcast(self, bucket: list):
        """Broadcast a bucket from rank 0 and wait for it, at most ``timeout_s`` (``Work.wait``'s timeout:
        on NCCL a broadcast only enqueues, and a peer that died leaves it pending; this wait is what
        bounds it, well before the group's own timeout)."""
        import time
        from datetime import timedelta

        import torch.distributed as dist

        deadline = time.monotonic() + self.timeout_s
        works = [dist.broadcast(t.detach().to(self.device).contiguous(), src=0, group=self.group, async_op=True)
                 for _, t in bucket]
        for w in works:
            left = deadline - time.monotonic()
            if left <= 0 or not w.wait(timeout=timedelta(seconds=left)):
                raise TimeoutError(f"a weight bucket's broadcast did not finish within {self.timeout_s:g}s")

    async def push(self, fleet: Fleet, version: int, *, named_tensors=None, retries: int = 0, flush_cache: bool = True,
                   servers=None, **_):
        """Open a weight-update session on every server (``/begin_weight_update``: SGLang refuses the
        distributed update outside one, and then never joins the broadcast), send every bucket, close the
        session (``/end_weight_update``, also after a failure)."""
        if self.group is None:
            raise FleetError("NcclTransport.init(fleet) must run before push"
                             + (" (the last push failed: regroup first)" if self.stale else ""))
        if named_tensors is None:
            raise ValueError("NcclTransport.push needs named_tensors (an iterable of (name, tensor))")
        servers = fleet.live() if servers is None else list(servers)
        if [s.url for s in servers] != self.urls:
            raise FleetError(f"the fleet changed since the update group was made ({self.urls} -> "
                             f"{[s.url for s in servers]}); re-create the group")
        try:
            await asyncio.gather(*(_begin_session(fleet, s) for s in servers))
            for bucket, last in _with_last(buckets(named_tensors, self.bucket_bytes)):
                body = self.update_body(bucket, version, last, flush_cache)
                await self._bucket(fleet, servers, bucket, body)
        except BaseException:
            self._abandon()
            raise
        finally:
            await _end_sessions(fleet, servers, retries)

    async def _bucket(self, fleet: Fleet, servers, bucket: list, body: dict):
        """One bucket: its HTTP call to every server and, concurrently, the broadcast. The first failure
        ends it at once: a server still waiting in the broadcast (its sender failed on another peer) would
        otherwise hold its HTTP call until the bucket's bound; the pending calls are cancelled, the group is
        given up (that ends the broadcast's wait on NCCL; on gloo it ends at its deadline), then this raises."""
        calls = {asyncio.ensure_future(fleet.call_one(s, "/update_weights_from_distributed", body, retries=0,
                                                      timeout=self.timeout_s)): s for s in servers}
        bc = asyncio.ensure_future(asyncio.to_thread(self._broadcast, bucket))
        pending, err = {bc, *calls}, None
        while pending and err is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                e = t.exception()
                if t is bc and e is not None:
                    err = FleetError(f"weight broadcast failed: {e}")
                elif t is not bc and e is not None:
                    err = e if isinstance(e, ServerCallError) else FleetError(f"{calls[t].url}: {e}")
                elif t is not bc and t.result() is None:  # it left the fleet (dead or hung): its part is missing
                    err = FleetError(f"{calls[t].url} left the fleet during the weight push")
        if err is None:
            return
        for t in pending:
            if t is not bc:
                t.cancel()
        if not bc.done():
            self._abandon()
        # the cancelled calls end at once; the broadcast is bounded by the bucket's deadline
        await asyncio.gather(*pending, return_exceptions=True)
        raise err

    async def close(self, fleet: Fleet):
        """Destroy the group (when there is one); stop waiting for the joins of groups that failed."""
        for f in list(self._strays):
            f.cancel()
        if self.group is not None:
            await self.destroy(fleet)

    async def destroy(self, fleet: Fleet):
        try:
            await fleet.call_all("/destroy_weights_update_group", {"group_name": self.group_name}, retries=0)
        finally:
            if self.group is not None:
                import torch.distributed as dist

                dist.destroy_process_group(self.group)
                self.group = None
