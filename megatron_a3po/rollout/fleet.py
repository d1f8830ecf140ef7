"""Async HTTP client over a fleet of SGLang-compatible servers (SGLang or our CPU engine).

* ``generate(payload, rid_base)`` sends one /generate request to the least-loaded healthy server; on a
  timeout, a dropped connection or a 5xx/429 it re-issues the same request on another server (a new
  ``rid``: ``{rid_base}.{attempt}``; the timed-out one is aborted best-effort on its server). HTTP 400
  (or 422, the router's validation error) is a caller bug and raises ``BadRequestError`` at once.
* Server states: ``up`` (gets requests), ``unavailable`` (timed out / 5xx: no requests until a liveness
  check passes; re-checked every ``health_interval_s``; still gets control calls), ``hung`` (no answer to
  ``GET /model_info`` within ``hang_timeout_s``) and ``dead`` (connection refused). Hung and dead servers
  are OUT of the fleet: no requests, no control calls, removed from the router (``DELETE /workers/<id>``);
  their in-flight requests are aborted where possible (a healthy worker returns the partial output) and
  re-issued. Each server is watched on its own (a hung one never delays the others' checks). A server
  that answers again goes ``syncing`` and is reported (a ``Comeback`` on the queue ``comebacks()``
  returns) to the owner of the weights (rollout/sync.py), which decides: it brings the server to the
  current weights and calls ``serve_again`` (back on the router: ``POST /workers``, then served), or
  ``release`` (out again, reported again when it next answers). Without an owner it is served at once.
* No server in the fleet for ``hang_timeout_s``: ``NoServersError`` naming the engines (and their log
  files, ``log_hints``) and what to do.
* ``call_all(path, body)`` posts a control call (pause, weight update, ...) to every server in the fleet
  concurrently, with retries; a server that turns out dead or hung leaves the fleet (the call goes on
  without it), any other failure raises ``ServerCallError`` naming the server and the reply.
* With a router (``router_url``), generation goes through the router and control calls go to the worker
  URLs (the router forwards none of them). The router's own ``/health`` is not trusted (it answers 200
  with no live worker): the fleet watches the workers itself.

Counters (``counters``): requests, retries, timeouts, connection_errors, http_5xx, servers_dropped,
servers_unavailable, servers_recovered, control_retries.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass

import httpx

from megatron_a3po.rollout.router import parse_workers
from megatron_a3po.errors import RunFailure

log = logging.getLogger("megatron_a3po.rollout.fleet")

UP, UNAVAILABLE, HUNG, DEAD, SYNCING = "up", "unavailable", "hung", "dead", "syncing"
OUT = (HUNG, DEAD)  # out of the fleet: no generation, no control calls, off the router; back after a resync


class FleetError(RunFailure, RuntimeError):
    pass


class BadRequestError(FleetError):
    pass


class NoServersError(FleetError):
    pass


class ServerCallError(FleetError):
    def __init__(self, url: str, path: str, message: str):
        super().__init__(f"{url}{path} failed: {message}")
        self.url, self.path, self.message = url, path, message


@dataclass
class Server:
    url: str
    state: str = UP
    inflight: int = 0
    next_check: float = 0.0
    connect_failures: int = 0
    completed: int = 0
    lost: int = 0  # bumped each time the server goes out (its in-flight requests are re-issued)


_CONN_ERRORS = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
                httpx.CloseError)


def sample_rids(body: dict) -> list[str]:
    """The rids SGLang gives the sequences of a /generate request: ``rid``, or for a batch of prompts with
    one string rid ``<rid>_<i>`` per prompt. (With ``n > 1`` SGLang gives each sample a fresh uuid, which no
    abort can name: the rollout sends a group as a batch instead.)"""
    rid, ids = body.get("rid"), body.get("input_ids", body.get("text"))
    if isinstance(rid, list):
        return [r for r in rid if r]
    if not rid:
        return []
    if isinstance(ids, list) and ids and isinstance(ids[0], (list, str)):
        return [f"{rid}_{i}" for i in range(len(ids))]
    return [rid]


@dataclass
class Comeback:
    """A server that was out of the fleet answers again: it is ``syncing`` (control calls reach it,
    generation does not) until the owner calls ``serve_again(server, prev)`` or ``release(server, prev)``."""
    server: Server
    prev: str  # the state it was out in (hung or dead)


class _Lost(Exception):
    """The server of a pending call went out of the fleet."""


class Fleet:
    def __init__(self, urls: list[str], *, router_url: str | None = None, request_timeout: float = 600.0,
                 connect_timeout: float = 5.0, health_timeout: float = 5.0, health_interval_s: float = 0.5,
                 dead_after_connect_failures: int = 2, max_attempts: int = 20, api_key: str | None = None,
                 hang_timeout_s: float = 30.0, log_hints: dict[str, str] | None = None, lost_grace_s: float = 3.0):
        urls = [u.rstrip("/") for u in urls]
        if not urls and not router_url:
            raise ValueError("Fleet needs at least one engine URL (engine_urls) or a router_url")
        if len(set(urls)) != len(urls):
            raise ValueError(f"duplicate engine URLs: {urls}")
        self.servers = [Server(u) for u in urls]
        self.router = Server(router_url.rstrip("/")) if router_url else None
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.health_timeout = health_timeout
        self.health_interval_s = health_interval_s
        self.hang_timeout_s = hang_timeout_s
        self.lost_grace_s = lost_grace_s
        self.log_hints = dict(log_hints or {})
        self.dead_after = dead_after_connect_failures
        self.max_attempts = max_attempts
        self.api_key = api_key  # sent as Authorization: Bearer (None: $A3PO_API_KEY, if set)
        self._comebacks: asyncio.Queue[Comeback] | None = None  # see comebacks()
        self._reported: set[str] = set()  # servers reported back and not yet decided on: not watched
        self._tasks: set[asyncio.Task] = set()  # background work (router removals, aborts): see _spawn
        self.counters: Counter = Counter()
        self.events: list[tuple[float, str, str]] = []  # (time, url, event): the state changes, for logs/tests
        self._rr = itertools.count()
        self._changed: asyncio.Event | None = None
        self._client: httpx.AsyncClient | None = None
        self._watch_tasks: list[asyncio.Task] = []
        self._none_up_since: float | None = None

    # ---- lifecycle
    async def start(self, wait_s: float = 60.0):
        self._changed = asyncio.Event()
        from megatron_a3po.platform.keys import auth_headers

        self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
                                         timeout=httpx.Timeout(self.request_timeout, connect=self.connect_timeout),
                                         headers=auth_headers(self.api_key))
        deadline = time.monotonic() + wait_s
        if self.router and not self.servers:  # the workers are the router's
            while True:
                try:
                    r = await self._client.get(f"{self.router.url}/workers", timeout=self.health_timeout)
                    self.servers = [Server(w["url"]) for w in parse_workers(r.json())]
                    if self.servers:
                        break
                except (httpx.HTTPError, ValueError, KeyError, TypeError):
                    pass
                if time.monotonic() > deadline:
                    raise FleetError(f"router {self.router.url} lists no workers after {wait_s:.0f}s")
                await asyncio.sleep(0.3)
        pending = list(self.servers) + ([self.router] if self.router else [])
        while pending:
            oks = await asyncio.gather(*(self._healthy(s) for s in pending))
            pending = [s for s, ok in zip(pending, oks) if not ok]
            if pending and time.monotonic() > deadline:
                raise FleetError(f"servers not healthy after {wait_s:.0f}s: {[s.url for s in pending]}")
            if pending:
                await asyncio.sleep(0.3)
        self._watch_tasks = [asyncio.create_task(self._watch(s)) for s in self.servers]

    async def close(self):
        """Stop watching and every background task (cancelled, then awaited), then close the client."""
        tasks = [*self._watch_tasks, *self._tasks]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10.0)  # a cancelled HTTP call ends at once
        if self._client:
            await self._client.aclose()

    def comebacks(self) -> asyncio.Queue[Comeback]:
        """The queue on which servers that answer again after being out are reported (``Comeback``). The
        owner of the weights (rollout/sync.py) takes it before ``start`` and decides on each one; a fleet
        nobody took it from serves such a server again at once."""
        if self._comebacks is None:
            self._comebacks = asyncio.Queue()
        return self._comebacks

    def _spawn(self, coro):
        """Run ``coro`` in the background, held until it ends (``close`` cancels what is left)."""
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---- state
    def live(self) -> list[Server]:
        """The servers in the fleet: they get every control call (weight updates) and may serve."""
        return [s for s in self.servers if s.state not in OUT]

    def _gen_servers(self) -> list[Server]:
        return [self.router] if self.router else self.servers

    def _notify(self):
        if self._changed is not None:
            self._changed.set()

    def _event(self, s: Server, what: str):
        self.events.append((time.time(), s.url, what))
        log.warning("server %s %s", s.url, what)

    def _mark_unavailable(self, s: Server, why: str):
        if s.state == UP:
            s.state = UNAVAILABLE
            self.counters["servers_unavailable"] += 1
            self._event(s, f"unavailable: {why}")
        s.next_check = time.monotonic() + self.health_interval_s
        self._notify()

    def _take_out(self, s: Server, state: str, why: str):
        """``s`` leaves the fleet (hung or dead): off the router, its in-flight requests re-issued."""
        if s.state in OUT:
            return
        s.state = state
        s.lost += 1
        if self.router is not None:
            self.router.lost += 1  # which requests the router sent to it is unknown: re-check them all
            self._spawn(self._router_remove(s))
        self.counters["servers_dropped" if state == DEAD else "servers_hung"] += 1
        self._event(s, f"{'dropped' if state == DEAD else 'hung'}: {why}")
        self._notify()

    def _drop(self, s: Server, why: str):
        self._take_out(s, DEAD, why)

    def _hint(self, s: Server) -> str:
        return f"{s.url} (log {self.log_hints[s.url]})" if s.url in self.log_hints else s.url

    def no_servers_error(self) -> NoServersError:
        logs = ", ".join(self._hint(s) for s in self.servers)
        return NoServersError(
            f"every rollout engine has been unreachable for {self.hang_timeout_s:g}s (rollout.hang_timeout_s): "
            f"{logs}. See the engines' logs; once they are back, run the same command with trainer.resume=true "
            "to continue from the last checkpoint (trainer.save_every sets how often one is written).")

    async def _probe(self, s: Server) -> str:
        """GET /model_info with the hang timeout: "ok", "refused", "timeout" or "error"."""
        try:
            r = await self._client.get(f"{s.url}/model_info", timeout=self.hang_timeout_s)
        except httpx.ConnectError:
            s.connect_failures += 1
            return "refused"
        except httpx.TimeoutException:
            return "timeout"
        except httpx.HTTPError:
            return "error"
        s.connect_failures = 0
        return "ok" if r.status_code == 200 else "error"

    async def _healthy(self, s: Server) -> bool:
        """Liveness: GET /model_info answers (SGLang's /health is a generation that waits out a pause, and
        a router's /health answers 200 with no live worker: neither tells whether the process is up)."""
        try:
            r = await self._client.get(f"{s.url}/model_info" if s is not self.router else f"{s.url}/workers",
                                       timeout=self.health_timeout)
        except httpx.ConnectError:
            s.connect_failures += 1
            return False
        except httpx.HTTPError:
            return False
        s.connect_failures = 0
        return r.status_code == 200

    async def settle(self, servers, why: str) -> list[Server]:
        """After a failed collective call (a weight push) over ``servers``: probe each now (bounded by
        ``hang_timeout_s``); one that refuses connections is dead, one that does not answer is hung (both
        leave the fleet at once, without waiting for the watcher). Returns those still in the fleet."""
        res = await asyncio.gather(*(self._probe(s) for s in servers))
        for s, r in zip(servers, res):
            if r == "refused":
                self._drop(s, f"{why}: connection refused")
            elif r == "timeout":
                self._take_out(s, HUNG, f"{why}: no answer to /model_info within {self.hang_timeout_s:g}s")
        return [s for s in servers if s.state not in OUT]

    async def _check_after_error(self, s: Server, why: str):
        """After a dropped connection: healthy -> keep; refused twice -> dead; else unavailable."""
        if await self._healthy(s):
            return
        if s.connect_failures >= 1:
            await asyncio.sleep(0.1)
            if not await self._healthy(s) and s.connect_failures >= self.dead_after:
                self._drop(s, why)
                return
        self._mark_unavailable(s, why)

    async def _watch(self, s: Server):
        """Per server, every ``health_interval_s``: a server that does not answer within the hang timeout
        is hung, one that refuses connections is dead (both leave the fleet); one that answers again is
        reported (``comebacks``), and not watched until the owner has decided on it."""
        while True:
            await asyncio.sleep(self.health_interval_s)
            if s.url in self._reported:
                continue
            try:
                res = await self._probe(s)
                if s.state in OUT:
                    if res == "ok":
                        await self._back(s)
                    continue
                if res == "timeout":
                    self._take_out(s, HUNG, f"no answer to /model_info within {self.hang_timeout_s:g}s")
                elif res == "refused" and s.connect_failures >= self.dead_after:
                    self._drop(s, "connection refused")
                elif res == "ok" and s.state == UNAVAILABLE and time.monotonic() >= s.next_check:
                    s.state = UP
                    self.counters["servers_recovered"] += 1
                    self._event(s, "recovered")
                    self._notify()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must keep watching
                log.exception("watching %s failed", s.url)

    async def _back(self, s: Server):
        """``s`` (out) answers again: ``syncing``, reported to the owner (or, without one, served again)."""
        prev, s.state = s.state, SYNCING
        if self._comebacks is None:
            await self.serve_again(s, prev)
            return
        self._reported.add(s.url)
        self._comebacks.put_nowait(Comeback(s, prev))

    async def claim(self, s: Server) -> str | None:
        """An out server that answers again goes ``syncing`` (control calls, such as a weight update that
        brings it to the new version, reach it; generation does not): its previous state, or None if it
        does not answer or is not out."""
        if s.state not in OUT or await self._probe(s) != "ok" or s.state not in OUT:
            return None
        prev, s.state = s.state, SYNCING
        return prev

    def release(self, s: Server, prev: str):
        """Undo ``claim`` (or a ``Comeback``): back out of the fleet."""
        self._reported.discard(s.url)
        if s.state == SYNCING:
            s.state = prev

    async def serve_again(self, s: Server, prev: str) -> bool:
        """``s`` (syncing) has the current weights: back on the router, then served. False: back to
        ``prev`` (out), retried at its next liveness check."""
        ok = self.router is None or await self._router_add(s)
        self._reported.discard(s.url)
        if s.state == SYNCING:
            s.state = UP if ok else prev
        if ok:
            s.connect_failures = 0
            self.counters["servers_rejoined"] += 1
            self._event(s, "rejoined (synced to the current weights)")
            self._notify()
        return ok

    # ---- the router's worker list (sglang-router 0.3.2: GET/POST /workers, DELETE /workers/<id>)
    async def _router_ids(self, url: str) -> list[tuple[str, bool]]:
        r = await self._client.get(f"{self.router.url}/workers", timeout=self.health_timeout)
        return [(w.get("id"), bool(w.get("is_healthy", True))) for w in parse_workers(r.json()) if w.get("url") == url]

    async def _router_remove(self, s: Server):
        try:
            for wid, _ in await self._router_ids(s.url):
                await self._client.delete(f"{self.router.url}/workers/{wid}", timeout=self.health_timeout)
            self._event(s, "removed from the router")
        except (httpx.HTTPError, ValueError) as e:
            log.warning("could not remove %s from the router %s: %s", s.url, self.router.url, e)

    async def _router_add(self, s: Server) -> bool:
        try:
            if not await self._router_ids(s.url):
                await self._client.post(f"{self.router.url}/workers", json={"url": s.url},
                                        timeout=self.health_timeout)
            deadline = time.monotonic() + self.hang_timeout_s
            while time.monotonic() < deadline:
                ids = await self._router_ids(s.url)
                if ids and all(ok for _, ok in ids):
                    self._event(s, "added to the router")
                    return True
                await asyncio.sleep(0.2)
        except (httpx.HTTPError, ValueError) as e:
            log.warning("could not add %s to the router %s: %s", s.url, self.router.url, e)
        return False

    async def _pick(self) -> Server:
        while True:
            if any(s.state == UP for s in self.servers):
                self._none_up_since = None
                cands = [s for s in self._gen_servers() if s.state == UP]
                if cands:
                    k = next(self._rr)
                    return min(cands, key=lambda s: (s.inflight, (hash(s.url) + k) % 7))
            elif all(s.state in OUT for s in self.servers):
                now = time.monotonic()
                self._none_up_since = self._none_up_since or now
                if now - self._none_up_since > self.hang_timeout_s:
                    raise self.no_servers_error()
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=self.health_interval_s)
            except asyncio.TimeoutError:
                pass

    async def _post_watched(self, s: Server, path: str, body, timeout=None, method: str = "POST"):
        """The HTTP call, abandoned (``_Lost``) if ``s`` (or, via a router, a worker) goes out meanwhile."""
        epoch = s.lost
        task = asyncio.ensure_future(self._client.request(method, f"{s.url}{path}", json=body,
                                                          **({} if timeout is None else {"timeout": timeout})))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if s.lost != epoch:
                    return await self._on_lost(s, task, body)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)  # a cancelled HTTP call ends at once

    async def _on_lost(self, s: Server, task, body):
        rid = body.get("rid") if isinstance(body, dict) else None
        if rid:  # a healthy worker answers an abort at once with the partial output: keep that
            targets = self.live() if s is self.router else [s]
            await asyncio.gather(*(self.abort(t, body) for t in targets))
            done, _ = await asyncio.wait({task}, timeout=self.lost_grace_s)
            if done:
                return task.result()
        raise _Lost()

    # ---- generation
    async def generate(self, payload: dict, rid_base: str) -> tuple[dict, str, str]:
        """POST /generate with retries on other servers; returns (response, rid used, server url)."""
        for attempt in range(self.max_attempts):
            s = await self._pick()
            rid = f"{rid_base}.{attempt}"
            body = dict(payload, rid=rid)
            s.inflight += 1
            self.counters["requests"] += 1
            try:
                r = await self._post_watched(s, "/generate", body)
            except _Lost:
                self.counters["requests_lost"] += 1
            except httpx.TimeoutException as e:
                self.counters["timeouts"] += 1
                if s is not self.router:  # behind a router the slow worker is unknown: just re-issue
                    self._mark_unavailable(s, f"/generate timed out ({type(e).__name__})")
                self._spawn(self.abort(s, body))
            except _CONN_ERRORS as e:
                self.counters["connection_errors"] += 1
                if s is self.router:
                    await asyncio.sleep(min(0.2 * (attempt + 1), 2.0))
                else:
                    await self._check_after_error(s, f"{type(e).__name__}: {e}")
            else:
                if r.status_code == 200:
                    s.completed += 1
                    return r.json(), rid, s.url
                if r.status_code in (400, 422):  # 422: the router's (or FastAPI's) validation error
                    raise BadRequestError(f"{s.url}/generate rejected the request (HTTP {r.status_code}): "
                                          f"{r.text[:500]}")
                if r.status_code >= 500 or r.status_code == 429:
                    self.counters["http_5xx"] += 1
                    if s is self.router:  # e.g. 503 no_available_workers while the workers change
                        await asyncio.sleep(min(0.2 * (attempt + 1), 2.0))
                    else:
                        self._mark_unavailable(s, f"HTTP {r.status_code}")
                else:
                    raise FleetError(f"{s.url}/generate: unexpected HTTP {r.status_code}: {r.text[:500]}")
            finally:
                s.inflight -= 1
            self.counters["retries"] += 1
        raise FleetError(f"request {rid_base} failed on {self.max_attempts} attempts")

    async def abort(self, s: Server, body: dict):
        """Abort (best effort) every sequence of the /generate request ``body`` on ``s`` (behind a router:
        on the workers): each sample of a batch by its own rid (``sample_rids``); the request comes back
        with the partial output."""
        async def one(rid):
            try:
                await self._client.post(f"{s.url}/abort_request", json={"rid": rid}, timeout=2.0)
            except httpx.HTTPError:
                pass

        await asyncio.gather(*(one(r) for r in sample_rids(body)))

    # ---- control calls (every server)
    async def call_one(self, s: Server, path: str, body: dict | None, *, retries: int = 2,
                       timeout: float = 120.0, method: str = "POST") -> dict | str | None:
        """Returns the parsed reply, or None if the server is (or turns out) dead or hung: it has left the
        fleet then and is brought back to the current weights before it serves again."""
        last = ""
        for attempt in range(retries + 1):
            if s.state in OUT:
                return None
            if attempt:
                self.counters["control_retries"] += 1
                await asyncio.sleep(0.2 * attempt)
            try:
                r = await self._post_watched(s, path, body, timeout, method)
            except _Lost:
                return None
            except httpx.ConnectError as e:
                s.connect_failures += 1
                last = f"{type(e).__name__}: {e}"
                if s.connect_failures >= self.dead_after:
                    self._drop(s, f"{path}: {last}")
                    return None
                continue
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            s.connect_failures = 0
            try:
                data = r.json()
            except ValueError:
                data = r.text
            if r.status_code == 200 and not (isinstance(data, dict) and data.get("success") is False):
                return data
            last = f"HTTP {r.status_code}: {str(data)[:500]}"
        raise ServerCallError(s.url, path, f"{last} (after {retries + 1} attempts)")

    async def call_all(self, path: str, body: dict | None = None, servers=None, **kw) -> dict[str, object]:
        """Post to every non-dead server (or to ``servers``) concurrently; {url: reply}; raises the first
        ServerCallError after all calls have finished."""
        servers = self.live() if servers is None else list(servers)
        res = await asyncio.gather(*(self.call_one(s, path, body, **kw) for s in servers), return_exceptions=True)
        out, errors = {}, []
        for s, r in zip(servers, res):
            if isinstance(r, BaseException):
                errors.append(r)
            elif r is not None:
                out[s.url] = r
        if errors:
            raise errors[0]
        if not self.live():
            raise self.no_servers_error()
        return out

    def snapshot(self) -> dict:
        return {"servers": {s.url: {"state": s.state, "inflight": s.inflight, "completed": s.completed}
                            for s in self.servers},
                **{f"fleet/{k}": v for k, v in self.counters.items()}}
