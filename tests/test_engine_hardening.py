"""The CPU engine under bad input: every field checked before admission (400 naming it), a failure
inside a scheduler round ends only its requests, the OpenAPI-driven fuzz finds no 5xx, SIGTERM ends an
engine with open requests. One engine serves the module (its start-up is the slow part)."""

import json
import signal
import threading
import time

import httpx
import psutil
import pytest

from megatron_a3po.engine.launch import launch_engine
from rollout_util import model_dirs

pytestmark = pytest.mark.slow
LIMITS = ["--context-length", "64", "--max-n", "4", "--max-batch-prompts", "4"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    d = model_dirs(root, 1, "qwen2")[0]
    ep = launch_engine(d, version="0", extra_args=LIMITS, log_dir=root, timeout=300)
    yield ep, d
    ep.stop()


def _post(url, body=None, *, content=None, timeout=60):
    if content is not None:
        return httpx.post(f"{url}/generate", content=content, headers={"content-type": "application/json"},
                          timeout=timeout)
    return httpx.post(f"{url}/generate", json=body, timeout=timeout)


OK = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}
POISON = [  # (raw JSON body, what the 400's message must say: the field)
    ('{"input_ids": [5, 6], "sampling_params": {"temperature": NaN}}', "sampling_params.temperature"),
    ('{"input_ids": [5, 6], "sampling_params": {"top_p": Infinity}}', "sampling_params.top_p"),
    ('{"input_ids": [5, 6], "sampling_params": {"min_p": -Infinity}}', "sampling_params.min_p"),
    ('{"input_ids": [5, 6], "sampling_params": "hot"}', "sampling_params: Input should be a valid dictionary"),
    ('{"input_ids": [5, 6], "sampling_params": 5}', "sampling_params: Input should be a valid dictionary"),
    ('{"input_ids": [5, 6], "sampling_params": {"stop": 5}}', "sampling_params.stop"),
    ('{"input_ids": [5, 6], "sampling_params": {"stop_token_ids": 5}}', "sampling_params.stop_token_ids"),
    ('{"input_ids": [5, 6], "sampling_params": {"n": 20000}}', "sampling_params.n"),
    ('{"input_ids": [5, 6], "sampling_params": {"n": 0}}', "sampling_params.n"),
    ('{"input_ids": [5, 6], "sampling_params": {"max_new_tokens": -1}}', "sampling_params.max_new_tokens"),
    ('{"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2.5}}', "sampling_params.max_new_tokens"),
    ('{"input_ids": [5, 6], "sampling_params": {"top_k": 0}}', "sampling_params.top_k"),
    ('{"input_ids": [5, 6], "sampling_params": [{}, {}]}', "sampling_params has 2 entries"),
    ('{"text": 5}', "text: Input should be a valid string"),
    ('{"text": ""}', "text is empty"),
    ('{"text": ["ab", 3]}', "text.1: Input should be a valid string"),
    ('{"input_ids": "abc"}', "input_ids: Input should be a valid list"),
    ('{"input_ids": [[5], "x"]}', "input_ids.1: Input should be a valid list"),
    ('{"input_ids": [5, 1e3]}', "input_ids.1: Input should be a valid integer"),
    ('{"input_ids": [5, 100000]}', "outside the vocabulary"),
    ('{"input_ids": [[5], [6], [7], [8], [9]]}', "--max-batch-prompts"),
    ('{"input_ids": [5, 6], "rid": 5}', "rid: Input should be a valid string"),
    ('{"input_ids": [5, 6], "return_logprob": [true, false]}', "return_logprob"),
    ('{"input_ids": [5, 6], "stream": "yes"}', "stream: Input should be a valid boolean"),
    ('{"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2.0}}', "sampling_params.max_new_tokens"),
    ('{"input_ids": [5, 6], "sampling_params": {"frequency_penalty": false}}', "sampling_params.frequency_penalty"),
    ('[1, 2]', "body: Input should be a valid dictionary"),
    ('{"input_ids": [5, 6]', "not valid JSON"),
    ('{"input_ids": [' + "1," * 70 + '1]}', "the context length is 64"),
]


def _message(r) -> str:
    """A 400's message, in either of SGLang's shapes: a body that fails its model, or a limit of the
    server or the model (a ValueError in SGLang)."""
    out = r.json()
    if out.get("object") == "error":
        assert out["type"] == "Bad Request" and out["code"] == 400, r.text
        return out["message"]
    return out["error"]["message"]


def test_each_bad_field_is_a_400_naming_it(engine):
    ep, _ = engine
    for raw, field in POISON:
        r = _post(ep.url, content=raw)
        assert r.status_code == 400, (raw, r.status_code, r.text)
        assert field in _message(r), (raw, r.text)
    r = _post(ep.url, content=b'{"text": "\xff\xfe"}')  # not UTF-8
    assert r.status_code == 400 and "not valid JSON" in r.text
    # a huge sampling_seed is reduced, not a crash
    r = _post(ep.url, {**OK, "sampling_params": {**OK["sampling_params"], "sampling_seed": 10 ** 30}})
    assert r.status_code == 200, r.text


def test_requests_beside_poison_requests_are_answered(engine):
    ep, _ = engine
    results = {}

    def send(key, **kw):
        results[key] = _post(ep.url, **kw)

    threads = [threading.Thread(target=send, args=(f"ok{i}",), kwargs={"body": OK}) for i in range(4)]
    threads += [threading.Thread(target=send, args=(f"bad{i}",), kwargs={"content": raw})
                for i, (raw, _) in enumerate(POISON[:6])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for k, r in results.items():
        if k.startswith("ok"):
            assert r.status_code == 200 and len(r.json()["output_ids"]) == 4, r.text
        else:
            assert r.status_code == 400, r.text
    assert len(results) == 10


def test_a_huge_prompt_is_refused_before_tokenising_and_health_keeps_answering(engine):
    ep, _ = engine
    proc = psutil.Process(ep.proc.pid)
    rss0 = proc.memory_info().rss
    huge = {"text": "1" * (10 << 20), "sampling_params": {"max_new_tokens": 1}}
    maximal = {"text": "12345678" * 7 + "1234567", "sampling_params": {"max_new_tokens": 1}}  # 63 of 64
    replies, health = {}, []

    def send(k, body):
        replies[k] = _post(ep.url, body, timeout=120)

    ts = [threading.Thread(target=send, args=("huge", huge)), threading.Thread(target=send, args=("max", maximal))]
    for t in ts:
        t.start()
    while any(t.is_alive() for t in ts) or len(health) < 3:
        t0 = time.perf_counter()
        r = httpx.get(f"{ep.url}/health", timeout=30)
        health.append((r.status_code, time.perf_counter() - t0))
    for t in ts:
        t.join()
    assert replies["huge"].status_code == 400 and "text has 10485760 characters" in replies["huge"].text
    assert replies["max"].status_code == 200, replies["max"].text
    assert replies["max"].json()["meta_info"]["prompt_tokens"] == 63
    assert all(code == 200 for code, _ in health)
    print(f"/health during a 10 MB and a maximal prompt: {len(health)} checks, slowest "
          f"{max(dt for _, dt in health) * 1e3:.0f} ms")
    rss1 = proc.memory_info().rss
    print(f"engine RSS {rss0 / 2**20:.0f} MiB before, {rss1 / 2**20:.0f} MiB after")
    assert rss1 <= 1.10 * rss0, (rss0, rss1)


def test_a_failure_inside_a_scheduler_round_ends_only_its_requests(engine):
    """In-process scheduler over the same model: a forward that raises on one prompt (batched with
    equal-length others) and a sampling failure (temperature NaN, past validation) end only their own
    sequences, with an error reply; the scheduler keeps serving."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_a3po.engine.scheduler import Sampling, Scheduler, Seq

    _, d = engine
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    POISON_TOKEN = 13

    class Poisoned(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def forward(self, input_ids, **kw):
            if (input_ids == POISON_TOKEN).any():
                raise RuntimeError("poisoned forward")
            return self.m(input_ids=input_ids, **kw)

    sched = Scheduler(Poisoned(model), eos_ids=[], max_context=64)
    done, ev = {}, threading.Event()

    def make(rid, prompt, sp):
        def cb(s):
            done[s.rid] = s
            if len(done) == len(seqs):
                ev.set()
        return Seq(rid=rid, prompt=prompt, sp=sp, on_done=cb)

    sp = Sampling(max_new_tokens=3, ignore_eos=True)
    seqs = [make(f"ok{i}", [5 + i, 6, 7], sp) for i in range(4)]
    seqs += [make("poison", [5, POISON_TOKEN, 7], sp), make("nan", [9, 6, 7], Sampling(max_new_tokens=3, temperature=float("nan")))]
    for s in seqs:  # queued before the thread starts: one round admits them all, one prefill batch (length 3)
        sched.submit(s)
    sched.start()
    try:
        assert ev.wait(120), f"unanswered: {sorted(set(s.rid for s in seqs) - set(done))}"
        for i in range(4):
            assert done[f"ok{i}"].finish == {"type": "length", "length": 3}
        for rid, msg in (("poison", "poisoned forward"), ("nan", "engine error")):
            f = done[rid].finish
            assert f["type"] == "abort" and f["status_code"] == 500 and msg in f["message"], f
        seqs, done, ev = [], {}, threading.Event()  # still serving
        seqs.append(make("after", [5, 6, 7], sp))
        sched.submit(seqs[0])
        assert ev.wait(60) and done["after"].finish["type"] == "length"
    finally:
        sched.stop()


def test_fuzz_the_openapi_schema_no_5xx_and_still_serving(engine):
    """The fuzz drives the real validator: every route's body schema in the document is its model's."""
    from engine_fuzz import fuzz
    from megatron_a3po.engine.validate import ROUTE_MODELS, body_schema

    ep, _ = engine
    doc = httpx.get(f"{ep.url}/openapi.json", timeout=30).json()
    for route in ROUTE_MODELS:
        body = doc["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == body_schema(route), route
    findings = fuzz(ep.url, examples=12, seconds=90, request_timeout=30)
    assert not findings, json.dumps(findings[:5], indent=1)
    assert httpx.get(f"{ep.url}/health", timeout=30).status_code == 200
    httpx.post(f"{ep.url}/continue_generation", json={}, timeout=30)
    r = _post(ep.url, OK)
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 4, r.text


# every control route with wrong-typed fields (strict: SGLang's lax model would take "no" as false)
CONTROL_POISON = [
    ("/update_weight_version", {"new_version": {"x": [1, 2]}, "abort_all_requests": "no"},
     ["new_version", "abort_all_requests"]),
    ("/update_weight_version", {"new_version": "9", "abort_all_requests": "no"}, ["abort_all_requests"]),
    ("/update_weights_from_disk", {"model_path": "/x", "weight_version": ["7"], "flush_cache": "false"},
     ["weight_version", "flush_cache"]),
    ("/update_weights_from_disk", {"weight_version": "7"}, ["model_path"]),
    ("/pause_generation", {"mode": 1}, ["mode"]),
    ("/continue_generation", {"torch_empty_cache": "yes"}, ["torch_empty_cache"]),
    ("/abort_request", {"rid": 5, "abort_all": "true"}, ["rid", "abort_all"]),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": "29500", "rank_offset": 1.0,
                                    "world_size": 2, "group_name": "g"}, ["master_port", "rank_offset"]),
    ("/update_weights_from_distributed", {"names": ["w"], "dtypes": ["float32"], "shapes": [[2, "3"]],
                                          "group_name": "g", "weight_version": 7}, ["shapes.0.1", "weight_version"]),
    ("/destroy_weights_update_group", {"group_name": ["g"]}, ["group_name"]),
    ("/update_weights_from_tensor", {"serialized_named_tensors": "abc"}, ["serialized_named_tensors"]),
    ("/begin_weight_update", {"selector": True}, ["selector"]),
    ("/slow_down", {"forward_sleep_time": "1"}, ["forward_sleep_time"]),
]


def test_each_control_route_answers_wrong_types_with_a_400_naming_them_and_stores_nothing(engine):
    ep, _ = engine
    httpx.post(f"{ep.url}/continue_generation", json={}, timeout=30)  # after the fuzz: generating again
    httpx.post(f"{ep.url}/slow_down", json={"forward_sleep_time": None}, timeout=30)
    before = httpx.get(f"{ep.url}/model_info", timeout=30).json()["weight_version"]
    for path, body, fields in CONTROL_POISON:
        r = httpx.post(f"{ep.url}{path}", json=body, timeout=60)
        assert r.status_code == 400, (path, body, r.status_code, r.text)
        out = r.json()
        assert out["object"] == "error" and out["code"] == 400, r.text
        for f in fields:
            assert f in out["message"], (path, f, r.text)
    r = httpx.post(f"{ep.url}/slow_down", content='{"forward_sleep_time": NaN}',
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "forward_sleep_time" in r.text, r.text
    info = httpx.get(f"{ep.url}/model_info", timeout=30).json()
    assert info["weight_version"] == before, info
    assert httpx.get(f"{ep.url}/server_info", timeout=30).json()["internal_states"][0]["paused"] is False
    r = _post(ep.url, OK)  # not slowed down, not aborted: served
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 4, r.text


def test_sigterm_stops_an_engine_with_open_requests(engine):
    """A request waiting on a paused engine stays open; SIGTERM still ends the process (runs last)."""
    ep, _ = engine
    assert httpx.post(f"{ep.url}/pause_generation", json={"mode": "in_place"}, timeout=30).status_code == 200

    def hold():
        try:
            _post(ep.url, OK, timeout=60)
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    time.sleep(1.0)  # the request is in the engine (no timing is asserted)
    ep.proc.send_signal(signal.SIGTERM)
    ep.proc.wait(timeout=20)  # a hang here is the failure
    assert ep.proc.returncode is not None

