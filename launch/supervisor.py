"""Start this node's share of the rollout fleet and supervise it.

    python -m launch.supervisor --backend sglang --model-path M --engine-tp 2 \
        --hosts node17,node18 --engine 0:0:0:30000 --engine 1:0:2:30001 ... \
        [--router-port 30080 --router-policy cache_aware] [--stop-file F] [-- extra server flags]

``--engine INDEX:NODE:BASE_GPU:PORT`` places one engine (one SGLang server of ``--engine-tp`` GPUs starting
at ``--base-gpu-id BASE_GPU``); every node of the rollout group gets the full list and starts the engines
whose NODE is its own index in ``--hosts`` (matched by host name, else $SLURM_NODEID, else 0). The
node of index 0 also starts the router once every engine of the fleet answers /health (sglang-router
0.3.2 with its prometheus exporter on 127.0.0.1 and its own port: by default it would bind 0.0.0.0:29000;
see ``megatron_a3po.rollout.router``).
With ``--backend cpu`` each engine is the project's CPU engine (``megatron_a3po.engine``).

Exits when any server exits (with its status, or 1), on SIGTERM, or with 0 when ``--stop-file`` appears.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launch.health import healthy, split_command
from megatron_a3po.platform.procs import free_port, stop_processes
from launch.keyed import keyed_command
from megatron_a3po.engine.launch import sglang_command
from megatron_a3po.rollout.router import router_command


@dataclass(frozen=True)
class Engine:
    index: int
    node: int
    base_gpu: int
    port: int

    @classmethod
    def parse(cls, spec: str) -> "Engine":
        try:
            i, n, g, p = (int(x) for x in spec.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--engine {spec!r}: expected INDEX:NODE:BASE_GPU:PORT") from None
        return cls(i, n, g, p)

    def spec(self) -> str:
        return f"{self.index}:{self.node}:{self.base_gpu}:{self.port}"


# the version engines report for the weights they load at start (the trainer's version 0; the rollout
# controller needs integer versions, and samples generated before the trainer's first push carry it)
INITIAL_VERSION = "0"


def server_command(backend: str, model_path: str, engine: Engine, *, engine_tp: int, bind_host: str,
                   python: str = sys.executable, mem_fraction_static: float | None = None,
                   extra: list[str] = (), log_dir: str | None = None) -> list[str]:
    if backend == "cpu":
        log = ["--version-log", os.path.join(log_dir, f"engine-{engine.index}.jsonl")] if log_dir else []
        return [python, "-m", "megatron_a3po.engine", "--model-path", model_path, "--port", str(engine.port),
                "--host", bind_host, "--weight-version", INITIAL_VERSION, *log, *extra]
    # the one builder of SGLang's command line (the trainer uses it too, with the CPU flags, on a CPU)
    return sglang_command(model_path, port=engine.port, host=bind_host, weight_version=INITIAL_VERSION, tp=engine_tp,
                          base_gpu=engine.base_gpu, mem_fraction_static=mem_fraction_static, python=python,
                          extra=extra)


def my_node_index(hosts: list[str], explicit: int | None) -> int:
    if explicit is not None:
        return explicit
    me = socket.gethostname().split(".")[0]
    short = [h.split(".")[0] for h in hosts]
    if me in short:
        return short.index(me)
    if "SLURM_NODEID" in os.environ:
        return int(os.environ["SLURM_NODEID"])
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m launch.supervisor", description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["sglang", "cpu"], default="sglang")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--engine-tp", type=int, default=1)
    ap.add_argument("--engine", type=Engine.parse, action="append", default=[], required=True)
    ap.add_argument("--hosts", default="127.0.0.1", help="comma-separated rollout node host names, node order")
    ap.add_argument("--node-index", type=int, default=None)
    ap.add_argument("--bind-host", default="0.0.0.0")
    ap.add_argument("--mem-fraction-static", type=float, default=None)
    ap.add_argument("--router-port", type=int, default=None)
    ap.add_argument("--router-policy", default="cache_aware")
    ap.add_argument("--router-prometheus-port", type=int, default=None,
                    help="the router's metrics port, bound on 127.0.0.1 (default: a free port)")
    ap.add_argument("--health-timeout", type=float, default=3600.0)
    ap.add_argument("--stop-file", default=None)
    ap.add_argument("--engine-log-dir", default=None, help="CPU engines: append each served request to "
                                                           "DIR/engine-INDEX.jsonl")
    return ap


def main(argv=None) -> int:
    argv, extra = split_command(argv)
    ap = _parser()
    args = ap.parse_args(argv)

    hosts = [h for h in args.hosts.split(",") if h]
    node = my_node_index(hosts, args.node_index)
    bad = [e for e in args.engine if e.node >= len(hosts)]
    if bad:
        ap.error(f"engine {bad[0].spec()} is on node {bad[0].node} but --hosts lists {len(hosts)} host(s)")
    procs: list[tuple[str, subprocess.Popen]] = []
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    if args.stop_file and Path(args.stop_file).exists():
        Path(args.stop_file).unlink(missing_ok=True)  # left by an earlier attempt of a requeued job
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for e in args.engine:
        if e.node != node:
            continue
        cmd = server_command(args.backend, args.model_path, e, engine_tp=args.engine_tp, bind_host=args.bind_host,
                             mem_fraction_static=args.mem_fraction_static, extra=extra, log_dir=args.engine_log_dir)
        if args.backend != "cpu":  # the CPU engine reads $A3PO_API_KEY itself; SGLang takes a flag
            cmd = keyed_command(cmd)
        print(f"[launch.supervisor] node {node} ({os.environ.get('SLURMD_NODENAME') or socket.gethostname()}): "
              f"engine {e.index}: {' '.join(cmd)}", flush=True)
        procs.append((f"engine {e.index}", subprocess.Popen(cmd)))

    router_pending = args.router_port is not None and node == 0
    worker_urls = [f"http://{hosts[e.node]}:{e.port}" for e in args.engine]
    router_deadline = time.monotonic() + args.health_timeout
    down: list[str] = []
    code = 0
    try:
        while not stopping:
            if args.stop_file and Path(args.stop_file).exists():
                break
            dead = [(n, p) for n, p in procs if p.poll() is not None]
            if dead:
                name, p = dead[0]
                print(f"[launch.supervisor] {name} exited with status {p.returncode}; stopping the fleet", flush=True)
                code = p.returncode or 1
                break
            if router_pending:
                down = [u for u in worker_urls if not healthy(u)]
                if down and time.monotonic() > router_deadline:
                    print(f"[launch.supervisor] engines not healthy after {args.health_timeout:.0f}s: "
                          f"{', '.join(down)}", file=sys.stderr, flush=True)
                    code = 3
                    break
            if router_pending and not down:
                cmd = keyed_command(router_command(worker_urls, port=args.router_port, policy=args.router_policy,
                                                   host=args.bind_host,
                                                   prometheus_port=args.router_prometheus_port or free_port()))
                print(f"[launch.supervisor] router: {' '.join(cmd)}", flush=True)
                procs.append(("router", subprocess.Popen(cmd)))
                router_pending = False
            time.sleep(1.0)
    finally:
        stop_processes([p for _, p in procs], timeout=30)
    return code


if __name__ == "__main__":
    sys.exit(main())
