"""``WeightSync``: the one owner of the weights the rollout servers serve.

It holds every state of a weight update and of a server's way back into the fleet:

* the gate (``open``): closed while an update runs (requests wait), and until the first update when the
  fleet was not started from the trainer's weights;
* the served version, the versions this trainer produced (``produced``: tokens of any other are never
  used) and ``broken`` (the last update failed: every server is left paused until one succeeds);
* the joiners: servers back with older weights that the transport cannot resend to (it ``needs_group``):
  held out of the fleet until the next update, which makes its group with them;
* what of the last push can be resent to a server that comes back (the transport's ``resend_payload``).

An update (``update``): close the gate, ``/pause_generation`` with the configured ``pause_mode`` on every
server, (re)make the transport's group when the fleet changed, push, check every server reports the new
version, ``/continue_generation``, open the gate. After a failed push of a ``needs_group`` transport given
a callable (a fresh export per call), the servers that died or hung leave the fleet (``Fleet.settle``) and
the others get the weights again over a new group; any other failure leaves every server paused and
raises ``WeightUpdateError`` (``broken``).

The fleet does not call back into this class: it reports a server that answers again after being out
(``Fleet.comebacks``, a queue); the task started by ``start`` takes each report and decides: resync it
(pause with abort, resend, verify, continue) and ``serve_again``, make it a joiner, or ``release`` it
(out again; the fleet reports it again at its next answer). Every task this class starts is held and is
cancelled and awaited by ``close``.

A transport is a ``weights.Transport``; ``check_transport`` rejects one that does not declare its
capabilities (``can_resend``, ``needs_group``), which are all that is asked of it here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from megatron_a3po.rollout.fleet import OUT, Comeback, Fleet, FleetError, NoServersError, Server
from megatron_a3po.rollout.weights import Transport, check_transport
from megatron_a3po.errors import RunFailure

log = logging.getLogger("megatron_a3po.rollout.sync")


class WeightUpdateError(RunFailure, RuntimeError):
    pass


class WeightSync:
    """See the module docstring. ``counters`` / ``timings``: the controller's, updated here
    (weight_updates, weight_update_failures, weight_push_retries; weight_sync_s, last_weight_sync_s)."""

    def __init__(self, fleet: Fleet | None, transport: Transport | None, *, pause_mode: str = "abort",
                 retries: int = 2, initial_version: int = 0, fleet_synced: bool = True,
                 counters: Counter | None = None, timings: Counter | None = None):
        self.fleet = fleet
        self.transport = None if transport is None else check_transport(transport)
        self.pause_mode, self.retries = pause_mode, retries
        self.initial_version = self.served_version = initial_version
        # a fleet the trainer started serves its initial weights; any other (a user's: "default", a reused
        # one: an earlier run's) serves nothing of this run until the first push has reached every server
        self.fleet_synced = fleet_synced
        self.produced: set[int] = {initial_version} if fleet_synced else set()
        self.counters = Counter() if counters is None else counters
        self.timings = Counter() if timings is None else timings
        self.broken: WeightUpdateError | None = None
        self.joiners: set[str] = set()  # urls of servers held out until the next update (module docstring)
        self._resend: dict | None = None  # what of the last successful push a comeback gets
        self._halted = False  # the rollout stopped or failed: no server is brought back any more
        self._tasks: set[asyncio.Task] = set()
        self._comebacks = fleet.comebacks() if fleet is not None else None
        self.open: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None

    # ---- lifecycle
    async def start(self):
        self.open = asyncio.Event()
        if self.fleet_synced:
            self.open.set()  # else the first successful update opens it
        self._lock = asyncio.Lock()
        if self._comebacks is not None:
            self._spawn(self._take_comebacks())

    def halt(self, *, close_gate: bool = False):
        """No server is brought back from now on (the rollout stopped or failed); ``close_gate``: requests
        wait at the gate until they are cancelled (stopping)."""
        self._halted = True
        if close_gate and self.open is not None:
            self.open.clear()

    async def close(self):
        """Cancel every task this started and wait for them (a cancelled HTTP call ends at once)."""
        self.halt()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10.0)

    def _spawn(self, coro):
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def init_transport(self):
        """Make what the transport's pushes need (a ``needs_group`` transport's group); after Fleet.start."""
        await self.transport.init(self.fleet)

    async def close_transport(self):
        await self.transport.close(self.fleet)

    # ---- what generation waits on
    async def gate(self):
        """Wait until requests may be sent (not during a weight update); a failed update stops them."""
        while not self.open.is_set():
            await self.open.wait()
        if self.broken:
            raise self.broken

    # ---- an update
    async def update(self, version: int, payload: dict):
        """Bring every server in the fleet to ``version`` (module docstring). Raises WeightUpdateError (every
        server left paused), or NoServersError when the last servers are gone (the rollout cannot go on)."""
        if self.transport is None:
            raise WeightUpdateError("no weight transport configured")
        await self._wait_live()
        async with self._lock:
            t0 = time.monotonic()
            self.open.clear()
            joining = [(s, prev) for s in self.fleet.servers if s.url in self.joiners
                       for prev in [await self.fleet.claim(s)] if prev is not None]
            # the servers of this update, fixed now: one that comes back meanwhile (syncing, waiting for
            # this lock to be resynced on its own) is neither paused, pushed to nor checked by it
            servers = self.fleet.live()
            try:
                await self.fleet.call_all("/pause_generation", {"mode": self.pause_mode}, servers=servers,
                                          retries=self.retries)
                servers = await self._regroup_if_changed(joining, servers)
                servers = await self._push(version, servers, payload)
                infos = await self.fleet.call_all("/model_info", None, method="GET", servers=servers,
                                                  retries=self.retries)
                wrong = {u: i.get("weight_version") for u, i in infos.items()
                         if str(i.get("weight_version")) != str(version)}
                if wrong:
                    raise FleetError(f"servers report other weight versions than {version}: {wrong}")
                self.produced.add(version)  # before continuing: tokens of it may arrive at once
                await self.fleet.call_all("/continue_generation", {}, servers=servers, retries=self.retries)
            except NoServersError:  # e.g. the last engines died during this update
                self._release(joining)
                raise
            except Exception as e:  # any failure after the pause leaves the fleet paused
                self._release(joining)
                self.counters["weight_update_failures"] += 1
                self.broken = WeightUpdateError(
                    f"weight update to version {version} failed: {e}. Every server is left paused, so none "
                    "serves mixed weights; call update_weights again to retry.")
                raise self.broken from e
            for srv, prev in joining:  # they have the new version now: back on the router, served
                self.joiners.discard(srv.url)
                await self.fleet.serve_again(srv, prev)
            self.broken = None
            self.served_version = version
            self._resend = self.transport.resend_payload(payload) if self.transport.can_resend else None
            self.counters["weight_updates"] += 1
            self.timings["last_weight_sync_s"] = time.monotonic() - t0
            self.timings["weight_sync_s"] += self.timings["last_weight_sync_s"]
            self.open.set()

    async def _push(self, version: int, servers, payload: dict):
        """Push ``version`` to ``servers`` with the transport; returns the servers that got it.

        A streaming push (``named_tensors``) of a ``needs_group`` transport given as a callable that returns
        a fresh iterator (the trainer exports its weights again) survives servers that die or hang during
        it: after a failure every server is probed (``Fleet.settle``); if some left the fleet and some
        remain, the update group is made again over those and the weights are pushed again from a new
        export (a consumed iterator is never replayed). Each try has one server fewer, so this ends. Any
        other failure raises."""
        source = payload.get("named_tensors")
        again = callable(source) and self.transport.needs_group
        while True:
            args = dict(payload, named_tensors=source()) if callable(source) else payload
            try:
                # requests paused in place still hold KV caches: SGLang fails a flush then
                await self.transport.push(self.fleet, version, retries=self.retries, servers=servers,
                                          flush_cache=self.pause_mode != "in_place", **args)
                return servers
            except Exception as e:
                if not again:
                    raise
                live = await self.fleet.settle(servers, f"weight push to version {version} failed")
                if not live or len(live) == len(servers):
                    raise
                self.counters["weight_push_retries"] += 1
                log.warning("weight push to version %d failed (%s); %s left the fleet: pushing again to %s",
                            version, e, [s.url for s in servers if s not in live], [s.url for s in live])
                await self.transport.regroup(self.fleet, live)
                servers = live

    async def _wait_live(self):
        """Wait (up to the fleet's hang timeout) until some server is in the fleet; else NoServersError."""
        deadline = time.monotonic() + self.fleet.hang_timeout_s
        while not self.fleet.live():
            if time.monotonic() > deadline:
                raise self.fleet.no_servers_error()
            await asyncio.sleep(0.2)

    def _release(self, joining):
        for srv, prev in joining:
            self.fleet.release(srv, prev)

    async def _regroup_if_changed(self, joining, servers):
        """A ``needs_group`` transport's update group is made over fixed members: after the fleet changed,
        a new one over this update's servers. If the servers coming back break it, they stay out (and are
        tried again at the next update) and the group is made without them. Returns the servers."""
        t = self.transport
        servers = [s for s in servers if s.state not in OUT]
        if not (t.needs_group and t.members_changed(servers)):
            return servers
        try:
            await t.regroup(self.fleet, servers)
        except Exception as e:
            if not joining:
                raise
            log.warning("a new weight-update group with %s failed (%s); making it without them",
                        [srv.url for srv, _ in joining], e)
            back = {srv.url for srv, _ in joining}
            self._release(joining)
            joining.clear()
            servers = [s for s in servers if s.url not in back and s.state not in OUT]
            await t.regroup(self.fleet, servers)
        return servers

    # ---- a server that comes back
    async def _take_comebacks(self):
        while True:
            c = await self._comebacks.get()
            self._spawn(self._comeback(c))

    async def _comeback(self, c: Comeback):
        """Decide on a server the fleet reported back: served again once it has the served weights, else
        out again (``release``; reported again at its next answer)."""
        ok = False
        try:
            ok = await self._resync(c.server) and await self.fleet.serve_again(c.server, c.prev)
        except Exception:  # it stays out; the fleet reports it again at its next answer
            log.exception("bringing %s back failed", c.server.url)
        finally:
            if not ok:
                self.fleet.release(c.server, c.prev)

    async def _resync(self, s: Server) -> bool:
        """Bring a server that was out of the fleet (hung, dead, restarted) to the served weights before it
        serves again: pause it with abort (its leftovers come back and are dropped), resend the last push
        (a ``can_resend`` transport), check its version, continue. A transport that cannot resend: a server
        that still has the served version rejoins at once; one with older weights joins the next update
        (``needs_group``) or stays out. False: it stays out (retried at its next liveness check)."""
        if self._halted or self.broken is not None or s.url in self.joiners:
            return False
        if not self.produced:  # nothing pushed yet: the first update brings every server to the weights
            return False
        async with self._lock:
            try:
                resend = self._resend is not None
                # a version number tells the weights only for versions this run pushed (a server the trainer
                # did not start may report the initial version with other weights): without weights to
                # resend, such a server joins the next update
                if not resend and (self.served_version != self.initial_version or not self.fleet_synced):
                    # nothing to resend: only a server that missed no update (a short hang) rejoins now
                    # (the next update regroups with it); it is not paused otherwise (it serves nothing
                    # while out, and /health, a generation, would wait out a pause)
                    info = await self.fleet.call_one(s, "/model_info", None, method="GET", retries=0)
                    if info is None:
                        return False
                    if str(info.get("weight_version")) != str(self.served_version) or (
                            not self.fleet_synced and self.served_version == self.initial_version):
                        if self.transport is not None and self.transport.needs_group:
                            self.joiners.add(s.url)
                            log.warning("server %s is back with older weights: it joins the next weight update",
                                        s.url)
                        else:
                            log.error("server %s cannot be brought to version %d: the %s transport has no "
                                      "weights to resend; it stays out of the fleet", s.url, self.served_version,
                                      type(self.transport).__name__)
                        return False
                if await self.fleet.call_one(s, "/pause_generation", {"mode": "abort"}, retries=0) is None:
                    return False
                if resend:
                    await self.transport.push(self.fleet, self.served_version, servers=[s], retries=self.retries,
                                              **self._resend)
                info = await self.fleet.call_one(s, "/model_info", None, method="GET", retries=0)
                if info is None or str(info.get("weight_version")) != str(self.served_version):
                    log.warning("server %s reports version %s after its resync, not %d", s.url,
                                None if info is None else info.get("weight_version"), self.served_version)
                    return False
                return await self.fleet.call_one(s, "/continue_generation", {}, retries=0) is not None
            except Exception as e:  # noqa: BLE001 - it stays out, retried later
                log.warning("resync of %s to version %d failed: %s", s.url, self.served_version, e)
                return False
