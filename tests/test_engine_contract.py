"""Contract: what our client sends and what our engine answers validate against SGLang's own published
schema (sglang 0.5.23 wheel, sglang/api/v1/api_types.py, downloaded at test time into a cache), and the
weight-update bodies use exactly the keys of the spec table (the schema does not cover those)."""

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from megatron_a3po.engine.launch import launch_engine
from megatron_a3po.rollout import ControllerConfig, DiskTransport, NcclTransport, RolloutManager
from rollout_util import model_dirs, toy_prompts, toy_task, tokenizer

SGLANG = "0.5.23"
CACHE = Path(os.environ.get("A3PO_SGLANG_WHEEL_CACHE", Path.home() / ".cache/megatron_a3po/sglang-wheel"))


@pytest.fixture(scope="module")
def api():
    pytest.importorskip("msgspec")
    mod_path = CACHE / SGLANG / "api_types.py"
    if not mod_path.exists():
        wheels = list(CACHE.glob(f"sglang-{SGLANG}-*.whl"))
        if not wheels:
            CACHE.mkdir(parents=True, exist_ok=True)
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"sglang=={SGLANG}",
                                "-d", str(CACHE), "-q"], capture_output=True, text=True, timeout=600)
            wheels = list(CACHE.glob(f"sglang-{SGLANG}-*.whl"))
            if not wheels:
                pytest.skip(f"cannot download the sglang=={SGLANG} wheel for its schema: {r.stderr[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            data = z.read("sglang/api/v1/api_types.py")
        mod_path.parent.mkdir(parents=True, exist_ok=True)
        mod_path.write_bytes(data)
    spec = importlib.util.spec_from_file_location("sglang_api_types_v1", mod_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = model_dirs(tmp_path_factory.mktemp("contract"), 1)[0]
    ep = launch_engine(d, version="0")
    yield ep, d
    ep.stop()


def test_schema_is_strict(api):
    with pytest.raises(api.JsonContractError):
        api.SamplingParams.from_json_value({"max_tokens": 4})
    with pytest.raises(api.JsonContractError):
        api.GenerateMetaInfo.from_json_value({"prompt_tokens": "3"})


def _validate_response(api, obj):
    resp = api.GenerateResponse.from_json_value(obj)
    mi = resp.meta_info
    assert mi is not None and mi.id and mi.finish_reason is not None
    assert not isinstance(mi.finish_reason, dict), f"finish_reason not a known variant: {mi.finish_reason}"
    assert mi.weight_version is not None
    assert mi.output_token_logprobs is not None and len(mi.output_token_logprobs) == len(resp.output_ids)
    if mi.weight_versions:
        assert mi.weight_versions[0].start == 0 and mi.weight_versions[-1].end == len(resp.output_ids)
    return resp


def test_engine_responses_validate(api, engine):
    ep, _ = engine
    bodies = [
        {"input_ids": [5, 6, 7], "return_logprob": True, "sampling_params": {"max_new_tokens": 5}},
        {"input_ids": [[5, 6], [7, 8, 9]], "return_logprob": True, "rid": ["a", "b"],
         "sampling_params": {"max_new_tokens": 4, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.01,
                             "n": 2, "stop_token_ids": [3], "sampling_seed": 1, "ignore_eos": False}},
        {"text": "1+1=", "return_logprob": True, "sampling_params": {"max_new_tokens": 3, "stop": ["="]}},
        {"input_ids": [5, 6], "return_logprob": True,
         "sampling_params": {"max_new_tokens": 8, "temperature": 0.0, "stop_token_ids": [0, 1, 2, 3, 4]}},
    ]
    for b in bodies:
        api.GenerateRequest.from_json_value(b)
        r = httpx.post(f"{ep.url}/generate", json=b, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        for o in out if isinstance(out, list) else [out]:
            _validate_response(api, o)
    # the schema and the engine reject the same unknown key
    bad = {"input_ids": [1], "sampling_params": {"max_tokens": 3}}
    with pytest.raises(api.JsonContractError):
        api.GenerateRequest.from_json_value(bad)
    assert httpx.post(f"{ep.url}/generate", json=bad).status_code == 400
    mi = httpx.get(f"{ep.url}/model_info").json()
    api.GetModelInfoResponse.from_json_value(mi)


def test_client_requests_and_aborted_responses_validate(api, engine):
    ep, d = engine
    sent, received = [], []
    cfg = ControllerConfig(n_samples=2, max_inflight_groups=4, batch_groups=2, max_staleness=1, max_new_tokens=12,
                           top_k=5, top_p=0.95, temperature=0.9, sampling_seed=7)  # seeded: sampling_seed sent
    rm = RolloutManager([ep.url], toy_prompts(40), toy_task(), tokenizer(), cfg)
    orig = rm.fleet.generate

    async def spy(payload, rid_base):
        sent.append(payload)
        resp, rid, url = await orig(payload, rid_base)
        received.append(resp)
        return resp, rid, url

    rm.fleet.generate = spy
    try:
        rm.start()
        for v in range(3):
            rm.get_batch(2, v, timeout=60)
            rm.update_weights(v + 1, hf_dir=d)
    finally:
        rm.close()
    assert sent and received
    assert all(isinstance(p["sampling_params"].get("sampling_seed"), int) for p in sent)
    for p in sent:
        api.GenerateRequest.from_json_value(dict(p, rid="x"))
        api.SamplingParams.from_json_value(p["sampling_params"])
    kinds = set()
    for o in received:  # a group request (sampling_params.n > 1) returns a list of GenerateResponse
        for item in (o if isinstance(o, list) else [o]):
            resp = _validate_response(api, item)
            kinds.add(type(resp.meta_info.finish_reason).__name__)
    assert "FinishAbort" in kinds or "FinishLength" in kinds


# The weight-update / flow-control table of the SGLang 0.5.23 native API (request keys per endpoint).
SPEC_TABLE = {
    "/update_weights_from_disk": {"model_path", "load_format", "abort_all_requests", "weight_version", "flush_cache"},
    "/init_weights_update_group": {"master_address", "master_port", "rank_offset", "world_size", "group_name",
                                   "backend"},
    "/update_weights_from_distributed": {"names", "dtypes", "shapes", "group_name", "flush_cache",
                                         "abort_all_requests", "weight_version", "load_format"},
    "/destroy_weights_update_group": {"group_name"},
    "/update_weight_version": {"new_version", "abort_all_requests"},
    "/pause_generation": {"mode"},
    "/continue_generation": {"torch_empty_cache"},
    "/abort_request": {"rid", "abort_all"},
}


def test_weight_update_bodies_match_spec_table():
    import torch

    b = DiskTransport().body(3, "/ckpt/hf/v3")
    assert set(b) <= SPEC_TABLE["/update_weights_from_disk"] and b["model_path"] == "/ckpt/hf/v3"
    assert b["weight_version"] == "3" and isinstance(b["abort_all_requests"], bool)

    t = NcclTransport("10.0.0.1", 29600, backend="nccl", server_tp=[2, 4], device="cpu", group_name="g")
    inits = t.init_bodies(["http://a:1", "http://b:2"])
    for body in inits.values():
        assert set(body) == SPEC_TABLE["/init_weights_update_group"]
        assert body["world_size"] == 1 + 2 + 4 and body["backend"] == "nccl"
    assert [x["rank_offset"] for x in inits.values()] == [1, 3]  # trainer is rank 0

    named = [("model.embed_tokens.weight", torch.zeros(10, 4, dtype=torch.bfloat16)),
             ("model.norm.weight", torch.zeros(4))]
    body = t.update_body(named, 5, last=True)
    assert set(body) <= SPEC_TABLE["/update_weights_from_distributed"]
    assert body["names"] == ["model.embed_tokens.weight", "model.norm.weight"]
    assert body["dtypes"] == ["bfloat16", "float32"] and body["shapes"] == [[10, 4], [4]]
    assert body["weight_version"] == "5" and body["group_name"] == "g"
    assert "weight_version" not in t.update_body(named, 5, last=False)

    from megatron_a3po.rollout.weights import buckets

    bs = list(buckets(((f"w{i}", torch.zeros(256)) for i in range(10)), bucket_bytes=3 * 1024))
    assert [len(x) for x in bs] == [3, 3, 3, 1]  # 1 KiB tensors in 3 KiB buckets, order kept
    assert [n for x in bs for n, _ in x] == [f"w{i}" for i in range(10)]


def test_generation_through_a_router_control_calls_to_workers(engine):
    """A stand-in router (forwards only /generate and /health, like sglang-router forwards no weight-update
    call): generation goes through it, pause/update/continue go straight to the workers."""
    import threading

    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    from megatron_a3po.platform.procs import free_port

    ep, d = engine
    httpx.post(f"{ep.url}/update_weight_version", json={"new_version": "0"})
    seen = []
    app = FastAPI()

    @app.post("/generate")
    async def gen(request: Request):
        body = await request.json()
        seen.append(body["rid"])
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(f"{ep.url}/generate", json=body)
        return JSONResponse(r.json(), status_code=r.status_code)

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        cfg = ControllerConfig(n_samples=2, max_inflight_groups=2, batch_groups=2, max_staleness=1, max_new_tokens=6)
        rm = RolloutManager([ep.url], toy_prompts(20), toy_task(), tokenizer(), cfg,
                            router_url=f"http://127.0.0.1:{port}")
        with rm:
            rm.get_batch(2, 0, timeout=60)
            rm.update_weights(1, hf_dir=d)  # would fail if sent to the router (404)
            b = rm.get_batch(2, 1, timeout=60)
        # a sample's first segment is part of its group's request (rid "<request>_<j>" on the engine)
        assert seen and all(r in seen or r.rsplit("_", 1)[0] in seen for s in b.samples for r in s.rids)
        assert httpx.get(f"{ep.url}/model_info").json()["weight_version"] == "1"
    finally:
        server.should_exit = True
        th.join(10)
