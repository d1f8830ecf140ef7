"""Start rollout servers on this machine and wait until they answer: the CPU engine, or the real SGLang.

    procs = launch_engines("ckpt/hf", n=2, version=0)    # -> list[EngineProcess]
    urls = [p.url for p in procs]
    ...
    for p in procs: p.stop()

    launch_engines(d, n=2, backend="sglang")             # SGLang's own server (``sglang_command``)

``sglang_command`` is the one builder of SGLang's command line: ``launch.supervisor`` writes it for GPU
nodes, and with ``cpu=True`` it adds the flags SGLang 0.5.23 needs on a CPU (``SGLANG_CPU_FLAGS``, with
``SGLANG_USE_CPU_ENGINE=1`` in the environment: ``sglang_env``), which is how the trainer
(``rollout.backend=sglang`` without engine URLs) and the tests start it here. SGLang runs from its own
environment (``sglang_python``: ``scripts/sglang_env.sh`` builds it on a CPU machine).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_a3po.platform.procs import die_with_parent, free_port, listening_socket, stop_process


SGLANG_VERSION = "0.5.23"
# SGLang 0.5.23 on a CPU (../shared/spec/sglang_cpu.md): the CPU device with torch's attention (the x86
# default, intel_amx, needs kernels no wheel ships); no warm-up (a character vocabulary tokenises its
# warm-up text to 0 tokens, which crashes the scheduler); a KV pool and batch sized for a small machine;
# --sleep-on-idle: an idle scheduler otherwise polls its sockets without pause, taking cores from the
# trainer beside it (measured on this 2-core VM: 0.375 of a core while idle without it, 0.012 with it).
SGLANG_CPU_FLAGS = ("--device", "cpu", "--attention-backend", "torch_native", "--skip-server-warmup",
                    "--max-total-tokens", "8192", "--max-running-requests", "64", "--sleep-on-idle")
SGLANG_VENV_ENV = "A3PO_SGLANG_VENV"  # where scripts/sglang_env.sh builds SGLang's venv (default ./.venv-sglang)
SGLANG_PYTHON_ENV = "A3PO_SGLANG_PYTHON"  # or the python to run SGLang with


def sglang_command(model_path, *, port: int, host: str = "127.0.0.1", weight_version: str | None = "0",
                   tp: int = 1, base_gpu: int | None = None, mem_fraction_static: float | None = None,
                   cpu: bool = False, python: str | None = None, extra=()) -> list[str]:
    """``python -m sglang.launch_server ...``. ``weight_version`` None: SGLang's default ("default"), as a
    server a user started without the flag reports."""
    cmd = [python or sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
           "--tp-size", str(tp), "--host", host, "--port", str(port)]
    if base_gpu is not None:
        cmd += ["--base-gpu-id", str(base_gpu)]
    if weight_version is not None:
        cmd += ["--weight-version", str(weight_version)]
    if mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(mem_fraction_static)]
    if cpu:
        cmd += list(SGLANG_CPU_FLAGS)
    return cmd + list(extra)


def sglang_env(cpu: bool) -> dict[str, str]:
    """Environment additions for an SGLang server (on a CPU: its CPU engine)."""
    return {"SGLANG_USE_CPU_ENGINE": "1"} if cpu else {}


def sglang_python() -> str | None:
    """The python that runs SGLang here: $A3PO_SGLANG_PYTHON, else the venv of scripts/sglang_env.sh
    ($A3PO_SGLANG_VENV or ./.venv-sglang; used only once the script finished building it), else this
    python if it has sglang; None if there is none."""
    import importlib.util

    if os.environ.get(SGLANG_PYTHON_ENV):
        return os.environ[SGLANG_PYTHON_ENV]
    venv = Path(os.environ.get(SGLANG_VENV_ENV) or Path(__file__).resolve().parents[2] / ".venv-sglang")
    if (venv / "bin" / "python").exists() and list(venv.glob(".built-*")):
        return str(venv / "bin" / "python")
    return sys.executable if importlib.util.find_spec("sglang") is not None else None


@dataclass
class EngineProcess:
    proc: subprocess.Popen
    url: str
    port: int
    log_path: str | None = None
    version_log: str | None = None
    backend: str = "cpu"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self):
        """SIGKILL (a crash, for fault tests). SGLang's server is a process group (HTTP server, scheduler,
        detokenizer): all of it."""
        if self.alive():
            if self.backend == "sglang":
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
            self.proc.wait(timeout=30)

    def signal(self, sig: int):
        """Send ``sig`` (SIGSTOP / SIGCONT in fault tests) to the server: every process of an SGLang one."""
        if self.backend == "sglang":
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0):
        """SIGTERM this process (by pid; SGLang stops its own children), SIGKILL if it has not exited
        after ``timeout`` (an SGLang server: its whole process group then)."""
        if self.backend == "sglang" and self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of the group is left
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
            return
        stop_process(self.proc, timeout)


def wait_healthy(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None, log_path=None,
                 path: str = "/health"):
    """Until ``url`` answers ``path`` with 200 (SGLang started with --skip-server-warmup: /model_info,
    since its /health runs a generation)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = Path(log_path).read_text()[-3000:] if log_path and Path(log_path).exists() else ""
            raise RuntimeError(f"engine at {url} exited with code {proc.returncode} during startup\n{tail}")
        try:
            if httpx.get(f"{url}{path}", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"engine at {url} not healthy after {timeout:.0f}s")


def launch_engine(model_path, *, port: int | None = None, host: str = "127.0.0.1", version="0",
                  log_dir=None, version_log=None, test_hooks: bool = False, threads: int = 1,
                  extra_args=(), wait: bool = True, timeout: float = 300.0, api_key: str | None = None,
                  weights_root=None, backend: str = "cpu", env: dict | None = None) -> EngineProcess:
    """Start one engine: ``backend`` "cpu" (the project's CPU engine) or "sglang" (the real SGLang on this
    CPU, from ``sglang_python()``; ``version`` None starts it without --weight-version). ``api_key``
    reaches a CPU engine in its environment ($A3PO_API_KEY), not its command line (SGLang takes a key
    only as a flag: ``launch.keyed`` adds it on clusters; not supported here); ``weights_root``: the
    directory below which a CPU engine may load weights (default: the model's parent directory).
    ``timeout``: a loaded 2-core machine needs about a minute to start one. ``env``: more environment.
    A CPU engine's listening socket is bound here (a free port unless ``port``) and handed to it
    (``--listen-fd``), so no other process can take the port before the engine serves it; SGLang binds
    its port itself (a free port is probed for it)."""
    sock = None
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               **(env or {}))
    if backend == "sglang":
        if version_log or test_hooks or weights_root is not None or api_key:
            raise ValueError("launch_engine(backend='sglang'): version_log, test_hooks, weights_root and api_key "
                             "are CPU-engine options")
        python = sglang_python()
        if python is None:
            raise RuntimeError("no SGLang environment: run scripts/sglang_env.sh (or set $A3PO_SGLANG_PYTHON)")
        port = port or free_port()
        # the CPU engine's default precision (SGLang's "auto" serves a float32 checkpoint in float16)
        extra = list(extra_args) if "--dtype" in extra_args else ["--dtype", "float32", *extra_args]
        cmd = sglang_command(model_path, port=port, host=host, weight_version=None if version is None else str(version),
                             cpu=True, python=python, extra=extra)
        env.update(sglang_env(cpu=True))
    elif backend == "cpu":
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
        if api_key:
            from megatron_a3po.platform.keys import API_KEY_ENV

            env[API_KEY_ENV] = api_key
        repo_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = repo_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    else:
        raise ValueError(f"unknown engine backend {backend!r}: 'cpu' or 'sglang'")
    log_path = None
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        log_path = str(Path(log_dir) / f"engine-{port}.log")
        out = open(log_path, "w")
    else:
        out = subprocess.DEVNULL
    # SGLang: its own process group, so that a kill or a SIGSTOP reaches the scheduler and detokenizer too
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent,
                                start_new_session=backend == "sglang", pass_fds=(sock.fileno(),) if sock else ())
    finally:
        if sock is not None:
            sock.close()  # the engine holds its own copy
    ep = EngineProcess(proc=proc, url=f"http://{host}:{port}", port=port, log_path=log_path,
                       version_log=str(version_log) if version_log else None, backend=backend)
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
