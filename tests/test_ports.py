"""A port chosen for a server is never lost to another process before the server serves it (issue 24).

The race, made deterministic: ``free_port()`` probes a free port as before, and another socket takes that
port at once (the first probe only), as a process on the machine may between the probe and the server's
bind. The engine (bound by its launcher, which hands the listening socket down), the router (binds itself:
started again on other ports) and the weight-update group's store (bound before the engines are told its
port) each still come up. The servers are real: a CPU engine and sglang-router 0.3.2.
"""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import httpx
import pytest

from megatron_a3po.config import RolloutCfg
from megatron_a3po.engine import launch as engine_launch
from megatron_a3po.platform import procs
from megatron_a3po.rollout import router, weights
from megatron_a3po.rollout.fleet import Fleet
from megatron_a3po.trainer import rollout_side
from rollout_util import model_dirs

pytestmark = pytest.mark.slow


@pytest.fixture()
def race(monkeypatch):
    """free_port() as the code under test sees it: the port it returns first is taken right away."""
    real, taken = procs.free_port, []

    def probed_then_taken() -> int:
        port = real()
        if not taken:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", port))
            s.listen()
            taken.append(s)
        return port

    for mod in (procs, engine_launch, router, weights, rollout_side):
        monkeypatch.setattr(mod, "free_port", probed_then_taken, raising=False)
    yield taken
    for s in taken:
        s.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_dirs(tmp_path_factory.mktemp("ports"), 1)[0]


@pytest.fixture(scope="module")
def engine(model):
    ep = engine_launch.launch_engine(model, version="0")
    yield ep
    ep.stop()


def test_engine_port_is_held_from_the_start(race, model):
    ep = engine_launch.launch_engine(model, version="0")
    try:
        assert httpx.get(f"{ep.url}/health", timeout=30).status_code == 200
        assert not race or ep.port != race[0].getsockname()[1]
    finally:
        ep.stop()


def test_router_starts_again_when_its_port_is_taken(race, engine):
    rp = router.start_router([engine.url])
    try:
        assert race, "the router chose no port"
        assert race[0].getsockname()[1] not in (rp.port, rp.prometheus_port)
        assert router.router_ready(rp.url, [engine.url])
    finally:
        rp.stop()


def test_weight_group_store_is_bound_before_the_engines_are_told(race, engine, tmp_path):
    """The trainer's NCCL transport (gloo on CPU), as trainer/rollout_side.py makes it, forms its group."""
    rc = RolloutCfg(weight_sync="nccl", engine_urls=[engine.url])
    transport = rollout_side.RolloutSide._transport(SimpleNamespace(rc=rc, run_dir=tmp_path))
    transport.master_address = "127.0.0.1"

    async def form():
        fleet = Fleet([engine.url], health_interval_s=0.5)
        try:
            await fleet.start(60)
            await transport.init(fleet)
            await fleet.call_one(fleet.live()[0], "/destroy_weights_update_group",
                                 {"group_name": transport.group_name}, retries=0)
        finally:
            await fleet.close()

    asyncio.run(form())
    assert transport.group is not None
    assert not race or transport.master_port != race[0].getsockname()[1]
    import torch.distributed as dist

    dist.destroy_process_group(transport.group)
