"""Contract: what our client sends and what the engines answer validate against SGLang's own published
schema (sglang 0.5.23 wheel, sglang/api/v1/api_types.py, downloaded at test time into a cache), the
weight-update bodies use exactly the keys of the spec table (the schema does not cover those), and the
engines behave as a real 0.5.23 server does. Every test that talks to an engine runs twice: against the
project's CPU engine and against the real SGLang 0.5.23 server on this CPU (``engine`` is parametrized;
the real one is the session's ``sglang_server``, skipped with the reason where its environment is
missing). Generation also works behind the real sglang-router (0.3.2), which rebuilds the /generate body."""

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
from real_sglang import reset, wait_running
from rollout_util import toy_prompts, toy_task, tokenizer

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
def cpu_engine(sglang_models):
    d = sglang_models[0]
    ep = launch_engine(d, version="0", extra_args=["--health-check-timeout", "2"])
    yield ep, d
    ep.stop()


@pytest.fixture(params=["cpu", "sglang"])
def engine(request, sglang_models):
    """(EngineProcess, model dir) of the CPU engine or of the real SGLang server, serving model 0 as
    version "0" with nothing running."""
    if request.param == "cpu":
        ep, d = request.getfixturevalue("cpu_engine")
    else:
        ep, _ = request.getfixturevalue("sglang_server")
        d = sglang_models[0]
    reset(ep.url, d)
    yield ep, d
    reset(ep.url, d)


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
    sps = [sp for p in sent for sp in (p["sampling_params"] if isinstance(p["sampling_params"], list)
                                        else [p["sampling_params"]])]
    assert all(isinstance(sp.get("sampling_seed"), int) for sp in sps)
    # a group request is a batch of the prompt n times with ONE sampling_params object (sglang-router
    # 0.3.2 rejects a list of them with 422)
    groups = [p for p in sent if isinstance(p["input_ids"][0], list)]
    assert groups and all(isinstance(p["sampling_params"], dict) and len(p["input_ids"]) == 2 for p in groups)
    for p in sent:
        api.GenerateRequest.from_json_value(dict(p, rid="x"))
    for sp in sps:
        api.SamplingParams.from_json_value(sp)
    # the check can fail: our own body with one key misspelled, or one value of the wrong type, is refused
    sp = dict(sps[0])
    sp["max_tokens"] = sp.pop("max_new_tokens")
    with pytest.raises(api.JsonContractError):
        api.GenerateRequest.from_json_value(dict(sent[0], rid="x", sampling_params=sp))
    with pytest.raises(api.JsonContractError):
        api.GenerateRequest.from_json_value(dict(sent[0], rid="x", input_ids=str(sent[0]["input_ids"])))
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


def _start_request(url, box, key, **body):
    import threading

    body = {"input_ids": [3, 4, 5], "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}, **body}
    t = threading.Thread(target=lambda: box.update({key: httpx.post(f"{url}/generate", json=body, timeout=120)}))
    t.start()
    return t


def _slow(url, seconds: float | None):
    """SGLang's /slow_down: every forward pass sleeps this long (None: back to full speed), so that a
    request is still running when the test acts on it, however fast the machine."""
    r = httpx.post(f"{url}/slow_down", json={"forward_sleep_time": seconds}, timeout=30)
    assert r.status_code == 200, r.text


def _running_paused_in_place(url, box, key, **body):
    """A request that is running (its KV cache held) and then paused in place: nothing it does next
    depends on timing."""
    _slow(url, 0.05)
    t = _start_request(url, box, key, **body)
    wait_running(url)
    assert httpx.post(f"{url}/pause_generation", json={"mode": "in_place"}, timeout=30).status_code == 200
    _slow(url, None)
    return t


def test_unknown_keys(engine):
    """Unknown top-level keys are ignored; an unknown sampling_params key is a 400."""
    url = engine[0].url
    r = httpx.post(f"{url}/generate", json={"input_ids": [5, 6], "no_such_key": 1, "background": False,
                                            "sampling_params": {"max_new_tokens": 2}}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{url}/generate", json={"input_ids": [5, 6], "sampling_params": {"max_tokens": 2}}, timeout=60)
    assert r.status_code == 400 and "max_tokens" in r.text


def test_weight_versions_span_on_a_response_without_tokens(engine):
    url = engine[0].url
    r = httpx.post(f"{url}/generate", json={"input_ids": [5], "sampling_params": {"max_new_tokens": 0}}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["output_ids"] == []
    assert r.json()["meta_info"]["weight_versions"] == [{"version": "0", "start": 0, "end": 0}]


def test_weight_update_session(engine):
    """The distributed and tensor updates only inside /begin_weight_update ... /end_weight_update (the same
    refusals when missing or already open); /update_weights_from_disk needs no session."""
    url, d = engine[0].url, engine[1]
    must = "must run between begin_weight_update() and end_weight_update()"
    r = httpx.post(f"{url}/update_weights_from_distributed", json={"names": [], "dtypes": [], "shapes": [],
                                                                    "group_name": "nope"}, timeout=30)
    assert r.status_code == 400 and r.json()["success"] is False and must in r.json()["message"]
    r = httpx.post(f"{url}/update_weights_from_tensor", json={"serialized_named_tensors": []}, timeout=30)
    assert r.status_code == 400 and must in r.json()["message"]
    r = httpx.post(f"{url}/end_weight_update", json={}, timeout=30)
    assert r.status_code == 400 and "no weight-update session is open" in r.json()["message"]
    assert httpx.post(f"{url}/begin_weight_update", json={}, timeout=30).json()["success"] is True
    r = httpx.post(f"{url}/begin_weight_update", json={"selector": "all"}, timeout=30)
    assert r.status_code == 400 and "a weight-update session is already open" in r.json()["message"]
    r = httpx.post(f"{url}/update_weights_from_distributed", json={"names": [], "dtypes": [], "shapes": [],
                                                                    "group_name": "nope"}, timeout=30)
    assert r.status_code == 400 and must not in r.json()["message"]  # inside a session: the group is the problem
    assert httpx.post(f"{url}/end_weight_update", json={}, timeout=30).json()["success"] is True
    r = httpx.post(f"{url}/update_weights_from_disk", json={"model_path": d, "weight_version": "0"}, timeout=120)
    assert r.status_code == 200 and r.json()["success"], r.text


# wrong-typed control bodies (issue 24): (route, body, a field the 400 must name)
WRONG_TYPED = [
    ("/update_weight_version", {"new_version": {"x": [1, 2]}, "abort_all_requests": "no"}, "new_version"),
    ("/update_weights_from_disk", {"model_path": "/nowhere", "weight_version": ["7"], "flush_cache": "false"},
     "weight_version"),
]


def test_wrong_typed_control_bodies_are_a_400_naming_the_field_and_store_nothing(engine):
    """As SGLang 0.5.23 answers a body that fails its request model: HTTP 400 ``{"object": "error",
    "message", "type": "Bad Request", "code": 400}`` naming the field; the version is unchanged and
    generation is not paused."""
    url = engine[0].url
    for path, body, field in WRONG_TYPED:
        r = httpx.post(f"{url}{path}", json=body, timeout=60)
        assert r.status_code == 400, (path, r.status_code, r.text)
        out = r.json()
        assert out["object"] == "error" and out["code"] == 400 and out["type"] == "Bad Request", r.text
        assert field in out["message"], r.text
        assert httpx.get(f"{url}/model_info", timeout=30).json()["weight_version"] == "0"
    r = httpx.post(f"{url}/generate", json={"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}},
                   timeout=60)
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 2, r.text


# wrong-typed /generate fields that SGLang 0.5.23 refuses (its JSON contract: a boolean is not a number, an
# integer not a boolean, null not a rid) and the hand-written check took (issue 24); SGLang's message names
# the type, this engine's also the field
WRONG_TYPED_GENERATE = [
    ({"sampling_params": {"max_new_tokens": 2, "frequency_penalty": False}}, "sampling_params.frequency_penalty"),
    ({"sampling_params": {"max_new_tokens": 2, "repetition_penalty": True}}, "sampling_params.repetition_penalty"),
    ({"sampling_params": {"max_new_tokens": 2, "spaces_between_special_tokens": 1}},
     "sampling_params.spaces_between_special_tokens"),
    ({"input_ids": [[5, 6], [7, 8]], "rid": ["a", None], "sampling_params": {"max_new_tokens": 2}}, "rid.1"),
]


def test_wrong_typed_generate_fields_are_a_400(engine, request):
    url, ours = engine[0].url, request.node.callspec.params["engine"] == "cpu"
    for extra, field in WRONG_TYPED_GENERATE:
        r = httpx.post(f"{url}/generate", json={"input_ids": [5, 6], **extra}, timeout=60)
        assert r.status_code == 400, (extra, r.status_code, r.text)
        assert not ours or field in r.json()["message"], (extra, r.text)


def test_n_samples_get_their_own_rids_abort_by_group_rid_does_nothing(engine):
    """``n > 1``: every sample has its own (uuid) rid; aborting by the request's rid does nothing. /ready is
    503 while paused; /health runs a one-token generation, so it waits out the pause and answers 503, and
    /ready then stays 503 until a health check passes."""
    import time

    url = engine[0].url
    box = {}
    assert httpx.post(f"{url}/pause_generation", json={"mode": "in_place"}).status_code == 200
    t = _start_request(url, box, "g", rid="grp", sampling_params={"max_new_tokens": 30, "n": 2, "ignore_eos": True})
    time.sleep(0.5)
    assert httpx.post(f"{url}/abort_request", json={"rid": "grp"}).status_code == 200
    assert httpx.get(f"{url}/ready", timeout=10).status_code == 503
    t0 = time.monotonic()
    assert httpx.get(f"{url}/health", timeout=60).status_code == 503
    assert time.monotonic() - t0 >= 1.5  # it waited for its generation (health-check timeout 2 s)
    httpx.post(f"{url}/continue_generation", json={})
    t.join(120)
    out = box["g"].json()
    ids = [o["meta_info"]["id"] for o in out]
    assert len(set(ids)) == 2 and not any(i.startswith("grp") for i in ids)
    assert [o["meta_info"]["finish_reason"]["type"] for o in out] == ["length", "length"]
    # the failed health check left the server unhealthy: /ready stays 503 until a health check passes
    assert httpx.get(f"{url}/ready", timeout=10).status_code == 503
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{url}/ready", timeout=10).status_code == 200


def test_a_batch_with_one_rid_names_its_samples_and_each_can_be_aborted(engine):
    """A batch of prompts with a string rid: the samples are ``<rid>_<i>`` (meta_info.id), each with its
    own sampling_params, and aborting ``<rid>_<i>`` stops that sample (the group request of the rollout
    workflow is such a batch: its samples can be aborted, unlike ``n > 1``'s)."""
    url = engine[0].url
    box = {}
    sps = [{"max_new_tokens": 400, "ignore_eos": True, "sampling_seed": k} for k in range(3)]
    t = _running_paused_in_place(url, box, "b", input_ids=[[3, 4, 5]] * 3, rid="grp", sampling_params=sps)
    for i in (0, 2):
        assert httpx.post(f"{url}/abort_request", json={"rid": f"grp_{i}"}, timeout=30).status_code == 200
    httpx.post(f"{url}/continue_generation", json={})
    t.join(120)
    out = box["b"].json()
    assert [o["meta_info"]["id"] for o in out] == ["grp_0", "grp_1", "grp_2"]
    assert [o["meta_info"]["finish_reason"]["type"] for o in out] == ["abort", "length", "abort"]
    assert len(out[1]["output_ids"]) == 400 and all(len(out[i]["output_ids"]) < 400 for i in (0, 2))


def test_flush_cache_refused_while_a_request_holds_its_kv_cache(engine):
    """``flush_cache`` (default true) on a weight update while a request is paused in place: the weights
    load, the call fails (400) and the version does not change; without a flush it works; after a pause
    in ``retract`` mode (KV dropped) a flush works and the request resumes afterwards."""
    url, d = engine[0].url, engine[1]
    box = {}
    t = _running_paused_in_place(url, box, "long")
    r = httpx.post(f"{url}/update_weights_from_disk", json={"model_path": d, "weight_version": "5"}, timeout=120)
    assert r.status_code == 400 and r.json()["success"] is False and "flush" in r.json()["message"]
    assert httpx.get(f"{url}/model_info").json()["weight_version"] == "0"
    assert httpx.post(f"{url}/flush_cache", timeout=30).status_code == 400
    r = httpx.post(f"{url}/update_weights_from_disk", json={"model_path": d, "weight_version": "5",
                                                            "flush_cache": False}, timeout=120)
    assert r.status_code == 200 and r.json()["success"], r.text
    assert httpx.post(f"{url}/pause_generation", json={"mode": "retract"}).status_code == 200
    r = httpx.post(f"{url}/update_weights_from_disk", json={"model_path": d, "weight_version": "0"}, timeout=120)
    assert r.status_code == 200 and r.json()["success"], r.text
    httpx.post(f"{url}/continue_generation", json={})
    t.join(120)
    o = box["long"].json()
    assert o["meta_info"]["finish_reason"]["type"] == "length" and len(o["output_ids"]) == 400
    assert {s["version"] for s in o["meta_info"]["weight_versions"]} <= {"0", "5"}


def test_update_weight_version_aborts_running_requests(engine):
    """/update_weight_version aborts running requests unless ``abort_all_requests: false``; the aborted
    request comes back with its partial output and its versions."""
    url = engine[0].url
    box = {}
    t = _running_paused_in_place(url, box, "long")
    r = httpx.post(f"{url}/update_weight_version", json={"new_version": "0"}, timeout=30)
    assert r.status_code == 200, r.text
    httpx.post(f"{url}/continue_generation", json={})
    t.join(120)
    o = box["long"].json()
    assert o["meta_info"]["finish_reason"]["type"] == "abort" and len(o["output_ids"]) < 400
    assert o["meta_info"]["weight_versions"][-1]["end"] == len(o["output_ids"])


@pytest.fixture(scope="module")
def router_for(tmp_path_factory):
    pytest.importorskip("sglang_router")
    from megatron_a3po.rollout.router import start_router

    started = []

    def start(urls):
        rp = start_router(urls, log_path=tmp_path_factory.mktemp("router") / "router.log")
        started.append(rp)
        return rp

    yield start
    for rp in started:
        rp.stop()


def test_real_router_rewritten_body_is_accepted_by_the_engine(api, engine, router_for):
    """Capture the body sglang-router really sends (from a logging worker registered behind it) and post
    it to the engine: 200. The router 404s the control routes (so they must go to the workers)."""
    import json
    import threading

    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    from megatron_a3po.platform.procs import free_port

    ep, _ = engine
    seen = []
    app = FastAPI()

    @app.post("/generate")
    async def gen(request: Request):
        seen.append(json.loads(await request.body()))
        return JSONResponse({"text": "", "output_ids": [], "meta_info": {"id": "x", "finish_reason": {
            "type": "length", "length": 0}}})

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    @app.get("/get_model_info")
    @app.get("/get_server_info")
    async def info():
        return {}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        rp = router_for([f"http://127.0.0.1:{port}"])
        sent = {"input_ids": [5, 6, 7], "rid": "g0-n2.0", "return_logprob": True,
                "sampling_params": {"max_new_tokens": 4, "temperature": 0.9, "top_p": 0.95, "top_k": 5, "n": 2}}
        r = httpx.post(f"{rp.url}/generate", json=sent, timeout=30)
        assert r.status_code == 200, r.text
        for path in ("/pause_generation", "/update_weights_from_disk", "/begin_weight_update", "/abort_request"):
            assert httpx.post(f"{rp.url}{path}", json={}, timeout=30).status_code == 404, path
    finally:
        server.should_exit = True
        th.join(10)
    assert len(seen) == 1
    rewritten = seen[0]
    assert rewritten != sent and {"background", "log_metrics", "stream"} <= set(rewritten)  # it is rebuilt
    api.GenerateRequest.from_json_value(rewritten)
    r = httpx.post(f"{ep.url}/generate", json=rewritten, timeout=60)
    assert r.status_code == 200, r.text
    assert [len(o["output_ids"]) for o in r.json()] == [4, 4]


def test_generation_through_the_real_router_control_calls_to_workers(engine, router_for):
    """Generation goes through sglang-router; pause/update/continue/abort go straight to the worker. Checks
    only a direct call can make (list rids, unknown sampling keys) are in the tests above."""
    ep, d = engine
    httpx.post(f"{ep.url}/update_weight_version", json={"new_version": "0"})
    rp = router_for([ep.url])
    # seeded, as the trainer runs the CPU engine: the router must accept the group request as sent
    cfg = ControllerConfig(n_samples=2, max_inflight_groups=2, batch_groups=2, max_staleness=1, max_new_tokens=6,
                           sampling_seed=3)
    rm = RolloutManager([ep.url], toy_prompts(20), toy_task(), tokenizer(), cfg, router_url=rp.url)
    with rm:
        rm.get_batch(2, 0, timeout=60)
        rm.update_weights(1, hf_dir=d)  # would fail if sent to the router (404)
        b = rm.get_batch(2, 1, timeout=60)
    rids = [r for s in b.samples for r in s.rids]
    assert len(rids) == len(set(rids))  # per-sample rids from meta_info.id, not "<request>_<j>"
    assert httpx.get(f"{ep.url}/model_info").json()["weight_version"] == "1"
    # behind the router an unknown sampling key is dropped silently (the engine itself says 400: see above)
    r = httpx.post(f"{rp.url}/generate", json={"input_ids": [5], "sampling_params": {"max_tokens": 2,
                                                                                     "max_new_tokens": 2}}, timeout=60)
    assert r.status_code == 200, r.text
