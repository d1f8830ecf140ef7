"""Rank 0's waits for its fleet end before the trainer's collectives time out, and their error reaches every
rank (issue 24): config.timeouts is the one place that sets both, in that order.

While rank 0 waits for a batch (or an evaluation, or a weight update), the other ranks wait for it in a
collective; had that collective's timeout come first, NCCL's watchdog would kill them (SIGABRT, no
message) before rank 0's clear error.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from megatron_a3po.config import FLEET_START_S, RolloutCfg, load_recipe, timeouts
from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kw", [{}, {"request_timeout_s": 60.0}, {"request_timeout_s": 1000.0},
                                {"request_timeout_s": 5000.0}, {"wait_timeout_s": 3.0}, {"wait_timeout_s": 7200.0}])
def test_rank0_waits_end_before_the_process_groups_time_out(kw):
    t = timeouts(RolloutCfg(**kw))
    # a whole batch may take several request timeouts; never less than 10 minutes unless set
    if "wait_timeout_s" in kw:
        assert t.rollout_wait_s == kw["wait_timeout_s"]
    else:
        assert t.rollout_wait_s == max(600.0, 4 * kw.get("request_timeout_s", 600.0))
    assert t.pg_timeout_s >= t.rollout_wait_s + 60  # the wait's error, handed to every rank, comes first
    assert t.pg_timeout_s >= FLEET_START_S + 60  # so does a failed fleet start
    # the default: the process groups no longer time out (1800 s) before a batch wait ends (2400 s)
    if not kw:
        assert (t.rollout_wait_s, t.pg_timeout_s) == (2400.0, 2700.0)


def test_the_fleet_start_fits_its_bound():
    """Rank 0's fleet start, as its parts bound it: CPU engines up, the router, every server's /health, the
    update group."""
    from megatron_a3po.engine.launch import launch_engine
    from megatron_a3po.rollout import NcclTransport, RolloutManager
    from megatron_a3po.rollout.router import start_router

    parts = [inspect.signature(launch_engine).parameters["timeout"].default,
             inspect.signature(start_router).parameters["timeout"].default,
             inspect.signature(RolloutManager.start).parameters["wait_s"].default,
             inspect.signature(NcclTransport).parameters["timeout_s"].default]
    assert sum(parts) <= FLEET_START_S, parts


class _NoGenerateProxy:
    """An HTTP proxy in front of a real engine that forwards every route but holds each /generate until it
    is closed: a fleet that is healthy and takes weight updates, but never finishes a batch."""

    def __init__(self, target: str):
        import http.server
        import threading

        closed = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                if self.path.startswith("/generate"):
                    closed.wait()
                    return
                r = httpx.request(self.command, target + self.path, content=body, timeout=300,
                                  headers={k: v for k, v in self.headers.items()
                                           if k.lower() in ("content-type", "authorization")})
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("content-type", "application/json"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = _forward

            def log_message(self, *a):
                pass

        self._closed = closed
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self._closed.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_rank0_rollout_error_ends_every_rank(tmp_path):
    """Two trainer ranks (gloo), a fleet that finishes no /generate: rank 0's wait for a batch ends at
    rollout.wait_timeout_s with its clear error, and rank 1, which waits for rank 0 in a collective, stops
    with the same error at once (not at the process groups' timeout, nor with a broken-connection error)."""
    from megatron_a3po.engine.launch import launch_engine
    from megatron_a3po.trainer.loop import prepare_initial_model

    run_dir = tmp_path / "run"
    overrides = [f"trainer.log_dir={run_dir}", "trainer.steps=2", "trainer.warm_start_steps=0", "parallel.dp=2",
                 "rollout.wait_timeout_s=4", "trainer.eval_every=0", "rollout.batch_prompts=8"]
    recipe = load_recipe("demo_cpu", overrides)
    prepare_initial_model(recipe, run_dir)  # the weights the trainer reuses, served by our engine
    ep = launch_engine(run_dir / "init_hf", version="0", weights_root=tmp_path)
    proxy = _NoGenerateProxy(ep.url)
    try:
        p = subprocess.run([sys.executable, "-m", "megatron_a3po.trainer", "--recipe", "demo_cpu", *overrides,
                            f"rollout.engine_urls=[{proxy.url}]"], cwd=REPO,
                           env=subprocess_env(A3PO_NO_PROGRESS="1"), capture_output=True, text=True, timeout=600)
    finally:
        proxy.close()
        ep.stop()
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    clear = r"a batch of 8 groups for version 0 not done within 4 s \(rollout\.wait_timeout_s"
    assert re.search(clear, out), out[-4000:]
    assert re.search(r"rank 1: stopping, rank 0 failed: RolloutError: " + clear, out), out[-4000:]
    assert not re.search(r"Connection closed by peer|Timed out waiting|timed out after \d+ms", out), out[-4000:]
