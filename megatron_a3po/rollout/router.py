"""Start, wait for and stop an ``sglang-router`` (0.3.2) process; used by the tests and ``launch.supervisor``.

    rp = start_router(["http://127.0.0.1:30000", "http://127.0.0.1:30001"], log_path="router.log")
    rp.wait_ready()                  # GET /readiness says ready and /workers lists every worker healthy
    ... POST {rp.url}/generate ...
    rp.stop()                        # SIGTERM (then SIGKILL) by pid

The router's safe flags (../shared/spec/sglang_api.md, "Router"): it binds ``host`` (127.0.0.1 by
default) and its prometheus exporter binds ``prometheus_host`` on its own port (without these flags it
binds 0.0.0.0:29000, which two routers on one machine cannot share). The router's own ``/health``
answers 200 even with no live worker: use ``/readiness`` and ``/workers``, never ``/health``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from megatron_a3po.platform.procs import die_with_parent, free_port, stop_process

log = logging.getLogger("megatron_a3po.rollout.router")


# What the router is left to decide, on purpose (sglang-router 0.3.2's defaults would be: /health every
# 60 s, a worker unhealthy after 3 failures, 5 retries per request, a circuit breaker after 10 failures):
# * --disable-health-check: the Fleet (rollout/fleet.py) watches every worker itself with GET /model_info
#   and takes a dead or hung one off the router (DELETE /workers/<id>) and back (POST /workers) once it is
#   synced. The router's checks would work against it: SGLang's /health is a generation, which waits out a
#   pause (a weight push: minutes for 70B) and answers 503 after SGLANG_HEALTH_CHECK_TIMEOUT (20 s), so
#   3 failed checks would mark healthy, paused workers unhealthy (no requests routed to them) in the middle
#   of an update. /model_info would not wait, but needs the api key, which the router would only get as a
#   flag (ps shows it). This disables the runtime checks too (checked: tests/test_sglang_rollout.py).
# * --disable-retries: the Fleet re-issues a failed request itself (up to 20 times, a new rid each time,
#   the old one aborted); router retries under it would multiply the attempts and resend the same rid.
# * --disable-circuit-breaker: a paused or slow worker must not be shut out by the router; the Fleet's
#   unavailable / hung / dead states do that, with the liveness checks above.
ROUTER_POLICY_FLAGS = ("--disable-health-check", "--disable-retries", "--disable-circuit-breaker")


def router_command(worker_urls: list[str], *, port: int, prometheus_port: int, host: str = "127.0.0.1",
                   prometheus_host: str = "127.0.0.1", policy: str = "round_robin",
                   python: str = sys.executable, extra: list[str] = ()) -> list[str]:
    """The ``python -m sglang_router.launch_router`` command line (always with explicit prometheus flags
    and ``ROUTER_POLICY_FLAGS``)."""
    return [python, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port),
            "--worker-urls", *worker_urls, "--policy", policy, "--prometheus-host", prometheus_host,
            "--prometheus-port", str(prometheus_port), *ROUTER_POLICY_FLAGS, *extra]


def _get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def parse_workers(data) -> list[dict]:
    """The workers in a router's ``GET /workers`` answer (sglang-router 0.3.2: ``{"workers": [...]}``; a bare
    list is read too), each a dict with ``url`` (without a trailing slash), ``id``, ``is_healthy``..."""
    if isinstance(data, dict):
        data = data.get("workers", [])
    return [{**w, "url": w["url"].rstrip("/")} if isinstance(w, dict) and isinstance(w.get("url"), str) else w
            for w in data or []]


def router_workers(url: str, timeout: float = 5.0) -> list[dict]:
    """``GET /workers`` of a router: the registered workers (``parse_workers``)."""
    return parse_workers(_get_json(f"{url.rstrip('/')}/workers", timeout))


def router_ready(url: str, expect: list[str], timeout: float = 5.0) -> bool:
    """True when the router's /readiness answers 200 and /workers lists every ``expect`` URL healthy."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/readiness", timeout=timeout) as r:
            if r.status != 200:
                return False
        workers = {w.get("url", ""): w for w in router_workers(url, timeout)}
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return all(u.rstrip("/") in workers and workers[u.rstrip("/")].get("is_healthy", True) for u in expect)


@dataclass
class RouterProcess:
    proc: subprocess.Popen
    url: str
    port: int
    prometheus_port: int
    worker_urls: list[str]
    log_path: str | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _log_tail(self) -> str:
        p = Path(self.log_path) if self.log_path else None
        return p.read_text(errors="replace")[-3000:] if p and p.exists() else ""

    def wait_ready(self, timeout: float = 60.0, expect: list[str] | None = None):
        """Block until the router is ready with every worker (``expect``, default all) healthy."""
        expect = self.worker_urls if expect is None else expect
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"sglang-router on port {self.port} exited with code {self.proc.returncode}"
                                   f" during startup (log {self.log_path})\n{self._log_tail()}")
            if router_ready(self.url, expect, timeout=2.0):
                return
            time.sleep(0.2)
        raise TimeoutError(f"sglang-router at {self.url} not ready with workers {expect} after {timeout:.0f}s "
                           f"(log {self.log_path})")

    def stop(self, timeout: float = 10.0):
        """SIGTERM this process (by pid), SIGKILL if it has not exited after ``timeout``."""
        stop_process(self.proc, timeout)


def start_router(worker_urls: list[str], *, port: int | None = None, prometheus_port: int | None = None,
                 host: str = "127.0.0.1", policy: str = "round_robin", log_path=None,
                 extra: list[str] = (), wait: bool = True, timeout: float = 60.0) -> RouterProcess:
    """Start an sglang-router in front of ``worker_urls`` on free ports (unless given); with ``wait``
    return once it is ready with every worker healthy. Raises ImportError if sglang-router is missing.

    The router binds its ports itself, so a free port chosen here can be taken by another process before
    it does: it then exits at once with "Address already in use"; with ports chosen here (and ``wait``)
    it is started again on new ones, up to ``PORT_ATTEMPTS`` times."""
    import importlib.util

    if importlib.util.find_spec("sglang_router") is None:
        raise ImportError("sglang-router is not installed: pip install 'sglang-router==0.3.2'")
    chosen = port is None or prometheus_port is None
    for attempt in range(1, PORT_ATTEMPTS + 1):
        rp, temp_log = _start_router_once(worker_urls, port or free_port(), prometheus_port or free_port(),
                                          host=host, policy=policy, log_path=log_path, extra=extra)
        if not wait:
            return rp
        try:
            rp.wait_ready(timeout)
            if temp_log:  # the router keeps its open file; nothing reads it any more
                os.unlink(rp.log_path)
                rp.log_path = None
            return rp
        except RuntimeError:  # it exited during startup (the error holds its log's tail)
            rp.stop()
            retry = (chosen and attempt < PORT_ATTEMPTS
                     and _PORT_TAKEN in Path(rp.log_path).read_text(errors="replace"))
            if temp_log:
                os.unlink(rp.log_path)
            if not retry:
                raise
            log.warning("sglang-router: a port was taken before it could bind it (%s:%d/%d); starting it on "
                        "other ports", host, rp.port, rp.prometheus_port)
        except BaseException:
            rp.stop()
            raise
    raise AssertionError("unreachable: the last attempt returns or raises")


PORT_ATTEMPTS = 3
_PORT_TAKEN = "Address already in use"


def _start_router_once(worker_urls, port: int, prometheus_port: int, *, host, policy, log_path, extra):
    """One router process; returns it and whether its log is a temporary file made here."""
    cmd = router_command(worker_urls, port=port, prometheus_port=prometheus_port, host=host, policy=policy,
                         extra=list(extra))
    temp = log_path is None
    if temp:  # its output is read if it exits during startup (a port taken, see start_router)
        import tempfile

        fd, log_path = tempfile.mkstemp(prefix="sglang-router-", suffix=".log")
        os.close(fd)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    return RouterProcess(proc=proc, url=f"http://{host}:{port}", port=port, prometheus_port=prometheus_port,
                         worker_urls=list(worker_urls), log_path=str(log_path)), temp
