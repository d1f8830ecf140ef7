"""Start CPU engine processes on this machine and wait until they answer /health.

    procs = launch_engines("ckpt/hf", n=2, version=0)    # -> list[EngineProcess]
    urls = [p.url for p in procs]
    ...
    for p in procs: p.stop()
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_a3po.platform.procs import die_with_parent, listening_socket, stop_process


@dataclass
class EngineProcess:
    proc: subprocess.Popen
    url: str
    port: int
    log_path: str | None = None
    version_log: str | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self):
        """SIGKILL (a crash, for fault tests)."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 10.0):
        """SIGTERM this process (by pid), SIGKILL if it has not exited after ``timeout``."""
        stop_process(self.proc, timeout)


def wait_healthy(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None, log_path=None):
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = Path(log_path).read_text()[-3000:] if log_path and Path(log_path).exists() else ""
            raise RuntimeError(f"engine at {url} exited with code {proc.returncode} during startup\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"engine at {url} not healthy after {timeout:.0f}s")


def launch_engine(model_path, *, port: int | None = None, host: str = "127.0.0.1", version="0",
                  log_dir=None, version_log=None, test_hooks: bool = False, threads: int = 1,
                  extra_args=(), wait: bool = True, timeout: float = 300.0, api_key: str | None = None,
                  weights_root=None) -> EngineProcess:
    """Start one engine. ``api_key`` reaches it in its environment ($A3PO_API_KEY), not its command
    line; ``weights_root``: the directory below which it may load weights (default: the model's
    parent directory). ``timeout``: a loaded 2-core machine needs about a minute to start one.
    The listening socket is bound here (a free port unless ``port``) and handed to the engine
    (``--listen-fd``), so no other process can take the port before the engine serves it."""
    sock = listening_socket(host, port or 0)
    port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "megatron_a3po.engine", "--model-path", str(model_path), "--host", host,
           "--port", str(port), "--listen-fd", str(sock.fileno()), "--weight-version", str(version),
           "--threads", str(threads)]
    if version_log:  # "{port}" in the path is replaced by the port (one file per engine)
        version_log = str(version_log).replace("{port}", str(port))
        cmd += ["--version-log", version_log]
    if test_hooks:
        cmd += ["--enable-test-hooks"]
    if weights_root is not None:
        cmd += ["--weights-root", str(weights_root)]
    cmd += list(extra_args)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if api_key:
        from megatron_a3po.platform.keys import API_KEY_ENV

        env[API_KEY_ENV] = api_key
    repo_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_path = None
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        log_path = str(Path(log_dir) / f"engine-{port}.log")
        out = open(log_path, "w")
    else:
        out = subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent,
                                pass_fds=(sock.fileno(),))
    finally:
        sock.close()  # the engine holds its own copy
    ep = EngineProcess(proc=proc, url=f"http://{host}:{port}", port=port, log_path=log_path,
                       version_log=str(version_log) if version_log else None)
    if wait:
        try:
            wait_healthy(ep.url, timeout, proc, log_path)
        except BaseException:
            ep.stop()
            raise
    return ep


def launch_engines(model_path, n: int = 1, **kw) -> list[EngineProcess]:
    """Start ``n`` engines (in parallel) and wait for all; on failure the started ones are stopped."""
    procs = [launch_engine(model_path, wait=False, **kw) for _ in range(n)]
    try:
        for p in procs:
            wait_healthy(p.url, kw.get("timeout", 300.0), p.proc, p.log_path)
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs
