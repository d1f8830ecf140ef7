"""The rollout side against the real SGLang 0.5.23 server on this CPU (the session's ``sglang_server``;
skipped with the reason where its environment is missing): aborting a group's request stops every sample
of it, and weights pushed by each transport (disk, tensor, distributed over gloo) are what the server then
serves, checked against HF transformers' forward on the pushed weights."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest
import torch

from megatron_a3po.rollout.fleet import Fleet
from megatron_a3po.rollout.workflow import GroupWorkflow
from real_sglang import hf_model_with, loads, reset, served_vs_hf
from rollout_util import toy_prompts, toy_task, tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture
def sglang(sglang_server):
    ep, dirs = sglang_server
    reset(ep.url, dirs[0])
    yield ep, dirs
    reset(ep.url, dirs[0])


def test_aborting_a_group_request_stops_every_sample(sglang):
    """The fleet aborts a group's request on a server while the client still waits for it (as it does for
    the requests of a worker that left the fleet behind a router, to get their partial output back): every
    sample of the group comes back aborted with its partial output. (SGLang gives the samples of ``n > 1``
    fresh uuid rids, so an abort by the request's rid did nothing and the group ran to its end.)"""
    ep, _ = sglang
    url = ep.url
    n = 3
    httpx.post(f"{url}/slow_down", json={"forward_sleep_time": 0.05}, timeout=30).raise_for_status()

    async def run():
        fleet = Fleet([url], request_timeout=120.0, health_interval_s=0.5)
        await fleet.start(30)
        wf = GroupWorkflow(fleet, toy_task(), tokenizer(), n_samples=n, max_new_tokens=400,
                           sampling={"temperature": 1.0, "ignore_eos": True}, sampling_seed=None,
                           reward_timeout_s=10, adv_norm="mean", adv_eps=1e-6, counters=Counter(),
                           gate=_open_gate, too_stale=lambda v: False)
        sent = []
        orig = fleet.generate

        async def spy(payload, rid_base):
            sent.append(dict(payload, rid=f"{rid_base}.0"))  # the rid of its first attempt
            return await orig(payload, rid_base)

        fleet.generate = spy
        try:
            task = asyncio.create_task(wf.group_request(0, toy_prompts(1)[0]))
            while not sent or (await asyncio.to_thread(loads, url))["running"] < n:
                assert not task.done(), task
                await asyncio.sleep(0.05)
            await fleet.abort(fleet.servers[0], sent[0])
            return await asyncio.wait_for(task, 60)  # 400 tokens at 0.05 s a step would take 20 s
        finally:
            await fleet.close()

    out = asyncio.run(run())
    assert [r["meta_info"]["finish_reason"]["type"] for r, _ in out] == ["abort"] * n
    assert all(len(r["output_ids"]) < 400 for r, _ in out)
    assert loads(url) == {"running": 0, "waiting": 0}


async def _open_gate():
    return None


def _pushed_weights(d, seed: int) -> dict:
    """Weights the trainer would push: model ``d``'s tensors, perturbed (so they are no file's)."""
    from rollout_util import hf_tensors

    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).contiguous() for k, v in hf_tensors(d).items()}


@pytest.mark.parametrize("kind", ["disk", "tensor", "distributed"])
def test_served_logprobs_after_a_push_equal_hf_forward_on_the_pushed_weights(sglang, kind, tmp_path):
    """Each transport pushes new weights through the controller (pause, push, check the version,
    continue); the server's greedy log-probs on fixed prompts then equal HF transformers' forward on the
    pushed weights (fp32, 1e-4)."""
    from megatron_a3po.platform.procs import free_port
    from megatron_a3po.rollout import (ControllerConfig, DiskTransport, NcclTransport, RolloutManager,
                                       TensorTransport)

    ep, dirs = sglang
    weights = _pushed_weights(dirs[1], seed={"disk": 1, "tensor": 2, "distributed": 3}[kind])
    ref = hf_model_with(dirs[1], weights)
    if kind == "disk":
        ref.save_pretrained(tmp_path / "pushed")
        payload = {"hf_dir": str(tmp_path / "pushed")}
        transport = DiskTransport()
    else:
        payload = {"named_tensors": iter(weights.items())}
        transport = TensorTransport(bucket_bytes=64 << 10) if kind == "tensor" else NcclTransport(
            "127.0.0.1", free_port(), backend="gloo", bucket_bytes=64 << 10, group_name=f"test-{kind}-{free_port()}")
    cfg = ControllerConfig(n_samples=2, max_inflight_groups=2, batch_groups=1, max_staleness=1, max_new_tokens=8)
    rm = RolloutManager([ep.url], toy_prompts(20), toy_task(), tokenizer(), cfg, transport=transport)
    try:
        rm.start()
        rm.init_weight_transport()
        rm.get_batch(1, 0, timeout=120)
        rm.update_weights(1, **payload)
        assert httpx.get(f"{ep.url}/model_info", timeout=30).json()["weight_version"] == "1"
        b = rm.get_batch(1, 1, timeout=120)
        assert all(v >= 0 for s in b.samples for v in s.versions)
    finally:
        rm.close_transport()
        rm.close()
    err = served_vs_hf(ep.url, ref)
    print(f"{kind}: max |served - HF| = {err:.2e}")
    assert err < 1e-4


def test_samples_of_versions_this_trainer_did_not_produce_are_dropped_and_counted(sglang):
    """Someone else changes the server's version mid-run ("default", then "99"): the samples it then
    generates are dropped, counted, and regenerated; no delivered token has a version this trainer did not
    push, and the run goes on (the next push sets the version again)."""
    from megatron_a3po.rollout import ControllerConfig, RolloutManager

    ep, dirs = sglang
    url = ep.url
    # a loose bound keeps groups admitted (so requests keep going) while the test waits without consuming
    cfg = ControllerConfig(n_samples=2, max_inflight_groups=4, batch_groups=2, max_staleness=50, max_new_tokens=6)
    rm = RolloutManager([url], toy_prompts(200), toy_task(), tokenizer(), cfg)
    delivered = []
    try:
        rm.start()
        delivered += rm.get_batch(2, 0, timeout=120).samples
        for foreign in ("default", "99"):
            before = rm.metrics().get("rollout/samples_dropped_foreign_version", 0)
            r = httpx.post(f"{url}/update_weight_version", json={"new_version": foreign, "abort_all_requests": False},
                           timeout=30)
            assert r.status_code == 200, r.text
            deadline = time.monotonic() + 120
            while rm.metrics().get("rollout/samples_dropped_foreign_version", 0) == before:
                assert time.monotonic() < deadline, "no sample of the foreign version was seen"
                time.sleep(0.1)
        rm.update_weights(1, hf_dir=dirs[1])
        delivered += rm.get_batch(2, 1, timeout=120).samples
        delivered += rm.get_batch(2, 2, timeout=120).samples
        m = rm.metrics()
    finally:
        rm.close()
    assert m["rollout/samples_dropped_foreign_version"] >= 2
    assert {v for s in delivered for v in s.versions} <= {0, 1}


def test_a_stale_update_group_of_the_same_name_is_replaced_at_once(sglang):
    """A trainer that died holding an update group leaves it on the server; the next one with the same
    group name (a resumed run) destroys it and makes its own, at once, and pushes through it. (Before, the
    server refused the name and the new trainer waited out the store timeout, then failed.)"""
    from megatron_a3po.platform.procs import free_port
    from megatron_a3po.rollout import NcclTransport
    from rollout_util import hf_tensors

    ep, dirs = sglang
    name = f"stale-{free_port()}"

    async def run():
        fleet = Fleet([ep.url], health_interval_s=0.5)
        await fleet.start(30)
        try:
            dead = NcclTransport("127.0.0.1", free_port(), backend="gloo", group_name=name, timeout_s=20)
            await dead.init(fleet)
            import torch.distributed as dist

            dist.destroy_process_group(dead.group)  # the trainer "dies": the server keeps the group
            t = NcclTransport("127.0.0.1", free_port(), backend="gloo", group_name=name, timeout_s=20,
                              bucket_bytes=64 << 10)
            await t.init(fleet)
            await fleet.call_all("/pause_generation", {"mode": "abort"})
            await t.push(fleet, 7, named_tensors=iter(hf_tensors(dirs[1]).items()))
            await fleet.call_all("/continue_generation", {})
            await t.destroy(fleet)
        finally:
            await fleet.close()

    asyncio.run(run())
    assert httpx.get(f"{ep.url}/model_info", timeout=30).json()["weight_version"] == "7"
    assert served_vs_hf(ep.url, hf_model_with(dirs[1], hf_tensors(dirs[1]))) < 1e-4


def test_router_keeps_a_worker_paused_past_its_failure_window(sglang, tmp_path):
    """sglang-router 0.3.2 as ``start_router`` configures it, in front of the real server, with its health
    window made small (a check every 1 s, unhealthy after 2 failures): a pause (as during a
    weight push) twice the failure window long drops no worker: ``/workers`` still lists it, healthy, and a request
    through the router is answered once generation continues. (With the router's defaults, SGLang's
    /health, a generation, waits out the pause and the worker is marked unhealthy.)"""
    pytest.importorskip("sglang_router")
    from megatron_a3po.rollout.router import router_workers, start_router

    ep, _ = sglang
    # the registration's own /health check (a generation on SGLang) takes the check timeout too: 5 s
    window = ["--health-check-interval-secs", "1", "--health-check-timeout-secs", "5",
              "--health-failure-threshold", "2"]
    rp = start_router([ep.url], log_path=tmp_path / "router.log", extra=window)
    try:
        httpx.post(f"{ep.url}/pause_generation", json={"mode": "abort"}, timeout=30).raise_for_status()
        # paused, SGLang's /health answers 503 after 2 s (SGLANG_HEALTH_CHECK_TIMEOUT in real_sglang): 2 failed
        # checks 1 s apart take about 6 s, the router's failure window; the pause lasts longer
        time.sleep(12)
        workers = {w["url"].rstrip("/"): w for w in router_workers(rp.url)}
        assert ep.url in workers, workers
        assert workers[ep.url]["is_healthy"], workers
        httpx.post(f"{ep.url}/continue_generation", json={}, timeout=30).raise_for_status()
        r = httpx.post(f"{rp.url}/generate", timeout=120,
                       json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2}})
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 2, r.text
    finally:
        httpx.post(f"{ep.url}/continue_generation", json={}, timeout=30)
        rp.stop()
