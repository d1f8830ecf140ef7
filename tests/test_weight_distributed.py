"""The NCCL weight transport end to end: trainer (this process, rank 0) broadcasts bucketed (name, tensor)
pairs to a real engine process that joined the group via /init_weights_update_group. On CPU the same code
runs with backend="gloo"; with a GPU and an SGLang server it runs with "nccl" (GPU-only test below)."""

import time

import httpx
import pytest
import torch

from megatron_a3po.engine.launch import launch_engine, launch_engines
from megatron_a3po.platform.procs import free_port
from megatron_a3po.rollout import ControllerConfig, NcclTransport, RolloutManager
from megatron_a3po.rollout.weights import buckets
from rollout_util import hf_tensors, model_dirs, toy_prompts, toy_task, tokenizer

pytestmark = pytest.mark.slow


def _ref_logprobs(model, prompt, out):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + out])).logits[0].double(), -1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(out)]


def test_bucketed_broadcast_updates_engine_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    dirs = model_dirs(tmp_path, 2)
    ep = launch_engine(dirs[0], version="0")
    new = AutoModelForCausalLM.from_pretrained(dirs[1], dtype=torch.float32).eval()
    transport = NcclTransport("127.0.0.1", free_port(), backend="gloo", bucket_bytes=64 << 10,
                              group_name="test_weights")
    cfg = ControllerConfig(n_samples=2, max_inflight_groups=2, batch_groups=2, max_staleness=1, max_new_tokens=8)
    rm = RolloutManager([ep.url], toy_prompts(20), toy_task(), tokenizer(), cfg, transport=transport)
    calls = []
    orig = rm.fleet.call_one

    async def spy(s, path, body, **kw):
        calls.append(path)
        return await orig(s, path, body, **kw)

    rm.fleet.call_one = spy
    try:
        rm.start()
        rm.init_weight_transport()
        rm.get_batch(2, 0, timeout=60)
        named = list(new.named_parameters())
        assert len(list(buckets(iter(named), 64 << 10))) > 1
        rm.update_weights(1, named_tensors=((n, p.detach()) for n, p in named))
        assert httpx.get(f"{ep.url}/model_info").json()["weight_version"] == "1"
        # the updates ran inside a weight-update session (SGLang refuses them outside one), closed afterwards
        upd = [p for p in calls if "weight_update" in p or p == "/update_weights_from_distributed"]
        assert upd[0] == "/begin_weight_update" and upd[-1] == "/end_weight_update"
        assert upd.count("/begin_weight_update") == upd.count("/end_weight_update") == 1
        assert upd.count("/update_weights_from_distributed") > 1
        r = httpx.post(f"{ep.url}/end_weight_update", json={}, timeout=30)
        assert r.status_code == 400 and "no weight-update session is open" in r.json()["message"]
        b = rm.get_batch(2, 1, timeout=60)
        assert b.samples
        o = httpx.post(f"{ep.url}/generate", timeout=60, json={
            "input_ids": [5, 6, 7], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 12, "ignore_eos": True}}).json()
        ref = _ref_logprobs(new, [5, 6, 7], o["output_ids"])
        got = [e[0] for e in o["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - c) for a, c in zip(got, ref)) < 1e-5
        # a wrong name is refused by the engine after the broadcast completes: clear error, fleet paused
        from megatron_a3po.rollout import WeightUpdateError

        with pytest.raises(WeightUpdateError, match="unknown parameter"):
            rm.update_weights(2, named_tensors=iter([("no.such.weight", torch.zeros(3))]))
        assert calls[-1] == "/end_weight_update"  # the session is closed after a failure too
        assert httpx.post(f"{ep.url}/end_weight_update", json={}, timeout=30).status_code == 400
    finally:
        rm.close()
        ep.stop()


def test_engine_killed_mid_push_survivor_gets_the_weights_and_rejoin(tmp_path):
    """NCCL transport (gloo), two engines: one is SIGKILLed in the middle of a push (after some buckets
    reached both) -> the push fails within its bound, the dead engine leaves the fleet, the group is made
    again over the survivor and the weights are pushed again from a new export: the update succeeds, the
    survivor holds exactly the new weights, no group is lost and generation goes on. The engine restarts on
    its port with version-0 weights -> it stays out (old weights, and a streaming transport has nothing to
    resend) until the next update, which makes a group with it and brings it to the new version; only then
    it serves. Digests against the HF files (safetensors, independent of the export and the engine)."""
    from megatron_a3po.convert.digest import state_digest

    dirs = model_dirs(tmp_path, 3)
    a, b = launch_engines(dirs[0], n=2, version="0", test_hooks=True, timeout=300, log_dir=tmp_path / "logs")
    transport = NcclTransport("127.0.0.1", free_port(), backend="gloo", bucket_bytes=16 << 10, timeout_s=20.0)
    cfg = ControllerConfig(n_samples=2, max_inflight_groups=2, batch_groups=1, max_staleness=1, max_new_tokens=4)
    rm = RolloutManager([a.url, b.url], toy_prompts(50), toy_task(), tokenizer(), cfg, transport=transport,
                        health_interval_s=0.3, hang_timeout_s=10.0)
    restarted = None
    weights = {v: hf_tensors(dirs[v % 3]) for v in (1, 2, 3)}
    # the stated bound of a push that loses a server (docs/rollout.md, Bounds): the failed bucket
    # (timeout_s), the probe (hang_timeout_s), the new group (its timeout), the push again (timeout_s a bucket)
    n_buckets = len(list(buckets(iter(weights[2].items()), 16 << 10)))
    bound = transport.timeout_s + 10.0 + transport.group_timeout_s + n_buckets * transport.timeout_s

    def digest(url):
        return httpx.get(f"{url}/weights_digest", timeout=30).json()["digest"]

    exports = []

    def export_killing_a():
        """The trainer's export of version 2; the first one SIGKILLs engine a halfway through."""
        exports.append(0)
        first = len(exports) == 1
        for i, nt in enumerate(weights[2].items()):
            if first and i == len(weights[2]) // 2:
                a.kill()
            exports[-1] += 1
            yield nt

    try:
        rm.start()
        rm.init_weight_transport()
        rm.get_batch(1, 0, timeout=120)
        rm.update_weights(1, named_tensors=iter(weights[1].items()))
        assert digest(a.url) == digest(b.url) == state_digest(weights[1].items())
        assert n_buckets > 4
        rm.get_batch(1, 1, timeout=120)
        rm.update_weights(2, named_tensors=export_killing_a, timeout=bound)
        assert not a.alive() and exports[0] < len(weights[2]) and exports[1] == len(weights[2])
        assert transport.regroups == 1 and transport.urls == [b.url]
        assert a.url not in {s.url for s in rm.fleet.live()}
        assert digest(b.url) == state_digest(weights[2].items())
        assert httpx.get(f"{b.url}/model_info").json()["weight_version"] == "2"
        m = rm.metrics()
        assert m["rollout/weight_push_retries"] == 1 and m.get("rollout/groups_failed", 0) == 0
        assert m.get("rollout/weight_update_failures", 0) == 0
        rm.get_batch(1, 2, timeout=120)
        restarted = launch_engine(dirs[0], port=a.port, version="0", test_hooks=True, timeout=300)
        deadline = time.time() + 60
        while a.url not in rm.controller.sync.joiners:  # seen again, older weights: held out for the next update
            assert time.time() < deadline, f"the restarted engine was not seen within 60 s: {rm.fleet.events}"
            time.sleep(0.2)
        assert a.url not in {s.url for s in rm.fleet.live()}
        rm.update_weights(3, named_tensors=iter(weights[3].items()))  # the group is made with a again
        assert transport.regroups == 2 and sorted(transport.urls) == sorted([a.url, b.url])
        assert digest(a.url) == digest(b.url) == state_digest(weights[3].items())
        assert httpx.get(f"{a.url}/model_info").json()["weight_version"] == "3"
        assert a.url in {s.url for s in rm.fleet.live()}
        assert any(u == a.url and x.startswith("rejoined") for _, u, x in rm.fleet.events)
        batch = rm.get_batch(1, 3, timeout=120)
        assert all(min(s.versions) >= 2 for s in batch.samples)
        assert rm.metrics().get("rollout/groups_failed", 0) == 0
    finally:
        rm.close()
        for e in (a, b, restarted):
            if e is not None:
                e.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and an SGLang server")
def test_nccl_backend_group_on_gpu():
    """Rank 0 (trainer) + rank 1 (a second process standing in for an SGLang TP rank) over NCCL."""
    import multiprocessing as mp

    from megatron_a3po.platform.stores import init_update_group

    port = free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_gpu_receiver, args=(port, q))
    p.start()
    import torch.distributed as dist

    pg = init_update_group("127.0.0.1", port, 0, 2, "g", "nccl")
    t = torch.arange(1000, dtype=torch.float32, device="cuda")
    dist.broadcast(t, src=0, group=pg)
    torch.cuda.synchronize()
    assert q.get(timeout=120) == float(t.sum())
    p.join(60)


def _gpu_receiver(port, q):
    import torch.distributed as dist

    from megatron_a3po.platform.stores import init_update_group

    pg = init_update_group("127.0.0.1", port, 1, 2, "g", "nccl")
    t = torch.empty(1000, dtype=torch.float32, device="cuda")
    dist.broadcast(t, src=0, group=pg)
    torch.cuda.synchronize()
    q.put(float(t.sum()))
