"""Async HTTP client over a fleet of SGLang-compatible servers (SGLang or our CPU engine).

* ``generate(payload, rid_base)`` sends one /generate request to the least-loaded healthy server; on a
  timeout, a dropped connection or a 5xx/429 it re-issues the same request on another server (a new
  ``rid``: ``{rid_base}.{attempt}``; the timed-out one is aborted best-effort on its server). HTTP 400
  (or 422, the router's validation error) is a caller bug and raises ``BadRequestError`` at once.
* Server states: ``up`` (gets requests), ``unavailable`` (timed out / 5xx: no requests until a health
  check passes; re-checked every ``health_interval_s``), ``dead`` (connection refused: dropped for good;
  its in-flight requests are re-issued elsewhere by their own ``generate`` calls).
* ``call_all(path, body)`` posts a control call (pause, weight update, ...) to EVERY non-dead server
  concurrently, with retries; a server that turns out dead is dropped, any other failure raises
  ``ServerCallError`` naming the server and the reply.
* With a router (``router_url``), generation goes through the router and control calls go to the worker
  URLs (the router forwards none of them).

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

log = logging.getLogger("megatron_a3po.rollout.fleet")

UP, UNAVAILABLE, DEAD = "up", "unavailable", "dead"


class FleetError(RuntimeError):
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


_CONN_ERRORS = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
                httpx.CloseError)


class Fleet:
    def __init__(self, urls: list[str], *, router_url: str | None = None, request_timeout: float = 600.0,
                 connect_timeout: float = 5.0, health_timeout: float = 5.0, health_interval_s: float = 0.5,
                 dead_after_connect_failures: int = 2, max_attempts: int = 20, api_key: str | None = None):
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
        self.dead_after = dead_after_connect_failures
        self.max_attempts = max_attempts
        self.api_key = api_key  # sent as Authorization: Bearer (None: $A3PO_API_KEY, if set)
        self.counters: Counter = Counter()
        self.events: list[tuple[float, str, str]] = []  # (time, url, event): the state changes, for logs/tests
        self._rr = itertools.count()
        self._changed: asyncio.Event | None = None
        self._client: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task | None = None

    # ---- lifecycle
    async def start(self, wait_s: float = 60.0):
        self._changed = asyncio.Event()
        from megatron_a3po.platform.keys import auth_headers

        self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
                                         timeout=httpx.Timeout(self.request_timeout, connect=self.connect_timeout),
                                         headers=auth_headers(self.api_key))
        deadline = time.monotonic() + wait_s
        pending = list(self.servers) + ([self.router] if self.router else [])
        while pending:
            oks = await asyncio.gather(*(self._healthy(s) for s in pending))
            pending = [s for s, ok in zip(pending, oks) if not ok]
            if pending and time.monotonic() > deadline:
                raise FleetError(f"servers not healthy after {wait_s:.0f}s: {[s.url for s in pending]}")
            if pending:
                await asyncio.sleep(0.3)
        self._health_task = asyncio.create_task(self._health_loop())

    async def close(self):
        if self._health_task:
            self._health_task.cancel()
        if self._client:
            await self._client.aclose()

    # ---- state
    def live(self) -> list[Server]:
        return [s for s in self.servers if s.state != DEAD]

    def _gen_servers(self) -> list[Server]:
        return [self.router] if self.router else self.servers

    def _notify(self):
        if self._changed is not None:
            self._changed.set()

    def _mark_unavailable(self, s: Server, why: str):
        if s.state == UP:
            s.state = UNAVAILABLE
            self.counters["servers_unavailable"] += 1
            self.events.append((time.time(), s.url, f"unavailable: {why}"))
            log.warning("server %s unavailable: %s", s.url, why)
        s.next_check = time.monotonic() + self.health_interval_s
        self._notify()

    def _drop(self, s: Server, why: str):
        if s.state != DEAD:
            s.state = DEAD
            self.counters["servers_dropped"] += 1
            self.events.append((time.time(), s.url, f"dropped: {why}"))
            log.warning("server %s dropped from the fleet: %s", s.url, why)
        self._notify()

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

    async def _health_loop(self):
        while True:
            await asyncio.sleep(self.health_interval_s)
            now = time.monotonic()
            for s in self._gen_servers():
                if s.state == UNAVAILABLE and now >= s.next_check:
                    if await self._healthy(s):
                        s.state = UP
                        self.counters["servers_recovered"] += 1
                        self.events.append((time.time(), s.url, "recovered"))
                        log.warning("server %s recovered", s.url)
                        self._notify()
                    elif s.connect_failures >= self.dead_after:
                        self._drop(s, "connection refused")
                    else:
                        s.next_check = time.monotonic() + self.health_interval_s

    async def _pick(self) -> Server:
        while True:
            cands = [s for s in self._gen_servers() if s.state == UP]
            if cands:
                k = next(self._rr)
                return min(cands, key=lambda s: (s.inflight, (hash(s.url) + k) % 7))
            if all(s.state == DEAD for s in self._gen_servers()):
                raise NoServersError("every rollout server is dead: " + ", ".join(s.url for s in self.servers))
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=self.health_interval_s)
            except asyncio.TimeoutError:
                pass

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
                r = await self._client.post(f"{s.url}/generate", json=body)
            except httpx.TimeoutException as e:
                self.counters["timeouts"] += 1
                self._mark_unavailable(s, f"/generate timed out ({type(e).__name__})")
                asyncio.create_task(self._abort_quietly(s, rid))
            except _CONN_ERRORS as e:
                self.counters["connection_errors"] += 1
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
                    self._mark_unavailable(s, f"HTTP {r.status_code}")
                else:
                    raise FleetError(f"{s.url}/generate: unexpected HTTP {r.status_code}: {r.text[:500]}")
            finally:
                s.inflight -= 1
            self.counters["retries"] += 1
        raise FleetError(f"request {rid_base} failed on {self.max_attempts} attempts")

    async def _abort_quietly(self, s: Server, rid: str):
        try:
            await self._client.post(f"{s.url}/abort_request", json={"rid": rid}, timeout=2.0)
        except httpx.HTTPError:
            pass

    # ---- control calls (every server)
    async def call_one(self, s: Server, path: str, body: dict | None, *, retries: int = 2,
                       timeout: float = 120.0, method: str = "POST") -> dict | str | None:
        """Returns the parsed reply, or None if the server turned out dead (and was dropped)."""
        last = ""
        for attempt in range(retries + 1):
            if attempt:
                self.counters["control_retries"] += 1
                await asyncio.sleep(0.2 * attempt)
            try:
                r = await self._client.request(method, f"{s.url}{path}", json=body, timeout=timeout)
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
            raise NoServersError(f"{path}: every rollout server is dead")
        return out

    def snapshot(self) -> dict:
        return {"servers": {s.url: {"state": s.state, "inflight": s.inflight, "completed": s.completed}
                            for s in self.servers},
                **{f"fleet/{k}": v for k, v in self.counters.items()}}
