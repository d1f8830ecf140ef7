"""Pure pieces of the rollout side, checked against hand-written expectations and numpy."""

import numpy as np
import pytest

from megatron_a3po.rollout.controller import Controller, ControllerConfig, RolloutError, token_versions
from megatron_a3po.rollout.cursor import PromptCursor
from megatron_a3po.rollout.fleet import Fleet
from megatron_a3po.rollout.types import Batch, Sample, batch_normalise, group_advantages


def test_token_versions_from_spans_and_fallback():
    meta = {"weight_version": "3", "weight_versions": [{"version": "2", "start": 0, "end": 2},
                                                       {"version": "3", "start": 2, "end": 5}]}
    assert token_versions(meta, 5) == [2, 2, 3, 3, 3]
    assert token_versions({"weight_version": "4"}, 3) == [4, 4, 4]  # no spans: the request's version
    with pytest.raises(RolloutError, match="do not cover"):
        token_versions({"weight_versions": [{"version": "1", "start": 0, "end": 2}]}, 3)
    with pytest.raises(RolloutError, match="not an integer"):
        token_versions({"weight_version": "default"}, 1)


@pytest.mark.parametrize("norm,ddof", [("mean", None), ("mean_std", 1), ("mean_std_population", 0)])
def test_group_advantages_match_numpy(norm, ddof):
    rng = np.random.default_rng(0)
    for n in (2, 3, 4, 8):
        for kind in ("binary", "real"):
            r = rng.integers(0, 2, n).astype(float) if kind == "binary" else rng.normal(size=n)
            if r.max() == r.min():
                continue
            eps = float(rng.choice([1e-6, 1e-5]))
            ref = r - r.mean() if ddof is None else (r - r.mean()) / (np.std(r, ddof=ddof) + eps)
            assert np.allclose(group_advantages(list(r), norm, eps), ref, rtol=1e-12, atol=1e-12)
    for const in ([1.0, 1.0, 1.0], [0.1] * 4, [0.7], [0.0] * 8):  # constant groups: zeros, never NaN
        assert group_advantages(const, norm) == [0.0] * len(const)
    with pytest.raises(ValueError, match="adv_norm"):
        group_advantages([0.0, 1.0], "zscore")


def test_batch_normalise_is_token_weighted():
    rng = np.random.default_rng(1)
    a, w = rng.normal(size=12), rng.integers(1, 9, 12).astype(float)
    tok = np.repeat(a, w.astype(int))  # every response token carries its sample's advantage
    ref = (a - tok.mean()) / (tok.std() + 1e-5)
    assert np.allclose(batch_normalise(list(a), list(w), 1e-5), ref)
    assert batch_normalise([0.0, 0.0], [3, 1]) == [0.0, 0.0]


def test_batch_staleness():
    s1 = Sample(0, 0, 0, [1, 2], [3, 4, 5], [-0.1, -0.2, -0.3], [4, 5, 5], "stop", 1.0, 0.5)
    s2 = Sample(0, 0, 1, [1, 2], [6], [-0.4], [5], "length", 0.0, -0.5)
    b = Batch([[s1, s2]], version=6)
    assert b.staleness() == [2, 1, 1, 1] and b.num_tokens == 4


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="at least one engine URL"):
        Fleet([])
    with pytest.raises(ValueError, match="duplicate"):
        Fleet(["http://a:1", "http://a:1/"])
    c = Controller(None, [object()] * 3, None, None, ControllerConfig())
    with pytest.raises(ValueError, match="dataset of 5 prompts"):
        c.load_state_dict({"num_prompts": 5, "epoch": 0, "pos": 0, "seed": 0, "shuffle": True, "pending": [],
                           "next_gid": 0})


def test_data_cursor_wraps_epochs_and_requeue_first():
    c = PromptCursor(4, seed=3, epochs=2)
    seen = [c.next() for _ in range(8)]
    assert sorted(seen[:4]) == [0, 1, 2, 3] and sorted(seen[4:]) == [0, 1, 2, 3]
    assert c.next() is None
    c.give_back(2)
    assert c.next() == 2


def test_launchers_engine_command_parses_with_the_engines_own_parser(monkeypatch, tmp_path):
    """The command ``launch_engine`` starts a CPU engine with (captured at Popen, never run) parses with the
    engine's own argument parser to the values it was given: a flag the engine lacks, or one it reads
    differently, fails here."""
    import subprocess

    from megatron_a3po.engine import launch as L
    from megatron_a3po.engine.server import parse_args

    class Captured(Exception):
        pass

    def popen(cmd, **kw):
        raise Captured(cmd)

    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(Captured) as e:
        L.launch_engine(tmp_path / "model", version="7", version_log=str(tmp_path / "v-{port}.jsonl"), test_hooks=True,
                        weights_root=tmp_path, threads=2, extra_args=["--max-n", "8"], wait=False)
    cmd = e.value.args[0]
    assert cmd[1:3] == ["-m", "megatron_a3po.engine"]
    a = parse_args(cmd[3:])
    assert (a.model_path, a.host, a.weight_version, a.threads) == (str(tmp_path / "model"), "127.0.0.1", "7", 2)
    assert a.version_log == str(tmp_path / f"v-{a.port}.jsonl") and a.port > 0 and a.listen_fd is not None
    assert a.enable_test_hooks and a.weights_root == str(tmp_path) and a.max_n == 8


def test_a_weight_transport_must_declare_its_capabilities():
    """The controller's weight sync takes only a ``Transport`` that says whether it can resend and whether
    it needs a group (and implements what that needs): anything else is refused when it is built."""
    from megatron_a3po.rollout.weights import DiskTransport, NcclTransport, Transport

    class NoCaps(Transport):
        async def push(self, fleet, version, **kw): ...

    class GroupWithoutRegroup(Transport):
        can_resend, needs_group = False, True

        async def push(self, fleet, version, **kw): ...

    class Duck:  # the old duck-typed shape: a push method and nothing declared
        async def push(self, fleet, version, **kw): ...

    for t, msg in [(NoCaps(), "NoCaps does not declare can_resend, needs_group"),
                   (GroupWithoutRegroup(), "GroupWithoutRegroup declares needs_group but does not implement "
                                           "regroup, init"),
                   (Duck(), "Duck is not a megatron_a3po.rollout.weights.Transport")]:
        with pytest.raises(TypeError, match=msg):
            Controller(None, [0], None, None, ControllerConfig(), transport=t)
    for t in (DiskTransport(), NcclTransport("127.0.0.1", 1, backend="gloo")):
        Controller(None, [0], None, None, ControllerConfig(), transport=t)


def test_a_server_back_is_resynced_by_the_weight_sync_and_no_task_outlives_close(monkeypatch):
    """A dropped server that answers again is reported by the fleet; the weight sync pauses it, checks its
    version, continues it and has the fleet put it back on the router. Once both are closed, no task they
    started is left (HTTP answered by httpx's MockTransport: no server starts)."""
    import asyncio
    import json

    import httpx

    from megatron_a3po.rollout import fleet as fleet_mod
    from megatron_a3po.rollout.sync import WeightSync
    from megatron_a3po.rollout.weights import DiskTransport

    engine, router = "http://127.0.0.1:1", "http://127.0.0.1:2"
    down, calls, workers = [False], [], [engine]

    def answer(req: httpx.Request) -> httpx.Response:
        if str(req.url).startswith(engine):
            if down[0]:
                raise httpx.ConnectError("refused", request=req)
            calls.append(req.url.path)
            return httpx.Response(200, json={"weight_version": "0"} if req.url.path == "/model_info" else {})
        if req.method == "POST":
            workers.append(json.loads(req.content)["url"])
        elif req.method == "DELETE":
            workers.clear()
        return httpx.Response(200, json={"workers": [{"url": u + "/", "id": "w0", "is_healthy": True}
                                                     for u in workers]})

    client = httpx.AsyncClient
    monkeypatch.setattr(fleet_mod.httpx, "AsyncClient",
                        lambda **kw: client(transport=httpx.MockTransport(answer), **kw))

    async def until(cond):
        for _ in range(400):
            if cond():
                return
            await asyncio.sleep(0.025)
        raise AssertionError("timed out")

    async def main():
        fleet = Fleet([engine], router_url=router, health_interval_s=0.05, hang_timeout_s=2.0)
        sync = WeightSync(fleet, DiskTransport())
        await fleet.start(5)
        await sync.start()
        s = fleet.servers[0]
        down[0] = True
        assert await fleet.settle([s], "test") == [] and s.state == "dead"
        await until(lambda: not workers)  # taken off the router
        calls.clear()
        down[0] = False
        await until(lambda: s.state == "up")
        assert [c for c in calls if c != "/model_info"] == ["/pause_generation", "/continue_generation"]
        assert workers == [engine] and fleet.counters["servers_rejoined"] == 1
        await sync.close()
        await fleet.close()
        return asyncio.all_tasks() - {asyncio.current_task()}

    assert asyncio.run(main()) == set()
