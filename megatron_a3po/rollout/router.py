"""Start, wait for and stop an ``sglang-router`` (0.3.2) process; used by the tests and ``launch.fleet``.

    rp = start_router(["http://127.0.0.1:30000", "http://127.0.0.1:30001"], log_path="router.log")
    rp.wait_ready()                  # GET /readiness says ready and /workers lists every worker healthy
    ... POST {rp.url}/generate ...
    rp.stop()                        # SIGTERM (then SIGKILL) by pid

The router's safe flags (the project's SGLang API notes, "Router"): it binds ``host`` (127.0.0.1 by
default) and its prometheus exporter binds ``prometheus_host`` on its own port (without these flags it
binds 0.0.0.0:29000, which two routers on one machine cannot share). The router's own ``/health``
answers 200 even with no live worker: use ``/readiness`` and ``/workers``, never ``/health``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from megatron_a3po.platform.procs import die_with_parent, free_port, stop_process


def router_command(worker_urls: list[str], *, port: int, prometheus_port: int, host: str = "127.0.0.1",
                   prometheus_host: str = "127.0.0.1", policy: str = "round_robin",
                   python: str = sys.executable, extra: list[str] = ()) -> list[str]:
    """The ``python -m sglang_router.launch_router`` command line (always with explicit prometheus flags)."""
    return [python, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port),
            "--worker-urls", *worker_urls, "--policy", policy, "--prometheus-host", prometheus_host,
            "--prometheus-port", str(prometheus_port), *extra]


def _get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def router_workers(url: str, timeout: float = 5.0) -> list[dict]:
    """``GET /workers`` of a router: the registered workers (each with ``url``, ``id``, ``is_healthy``...)."""
    data = _get_json(f"{url.rstrip('/')}/workers", timeout)
    if isinstance(data, dict):
        data = data.get("workers", [])
    return list(data or [])


def router_ready(url: str, expect: list[str], timeout: float = 5.0) -> bool:
    """True when the router's /readiness answers 200 and /workers lists every ``expect`` URL healthy."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/readiness", timeout=timeout) as r:
            if r.status != 200:
                return False
        workers = {w.get("url", "").rstrip("/"): w for w in router_workers(url, timeout)}
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
    return once it is ready with every worker healthy. Raises ImportError if sglang-router is missing."""
    import importlib.util

    if importlib.util.find_spec("sglang_router") is None:
        raise ImportError("sglang-router is not installed: pip install 'sglang-router==0.3.2'")
    port = port or free_port()
    prometheus_port = prometheus_port or free_port()
    cmd = router_command(worker_urls, port=port, prometheus_port=prometheus_port, host=host, policy=policy,
                         extra=list(extra))
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "w")
    else:
        out = subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    finally:
        if out is not subprocess.DEVNULL:
            out.close()
    rp = RouterProcess(proc=proc, url=f"http://{host}:{port}", port=port, prometheus_port=prometheus_port,
                       worker_urls=list(worker_urls), log_path=str(log_path) if log_path else None)
    if wait:
        try:
            rp.wait_ready(timeout)
        except BaseException:
            rp.stop()
            raise
    return rp
