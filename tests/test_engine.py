"""The CPU engine against an independent reference: HF transformers' forward on the same weights."""

import threading
import time

import httpx
import pytest
import torch

from megatron_a3po.engine.launch import launch_engine
from rollout_util import model_dirs, read_version_logs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    dirs = model_dirs(root, 2, "llama") + model_dirs(root, 1, "qwen2")
    ep = launch_engine(dirs[0], version="0", version_log=root / "versions.jsonl", test_hooks=True)
    yield ep, dirs, root
    ep.stop()


def _reference_logprobs(model_dir, prompt, output, temperature):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    P = len(prompt)
    return [float(logp[P - 1 + i, t]) for i, t in enumerate(output)]


@pytest.mark.parametrize("temperature,extra", [(1.0, {}), (0.7, {}), (0.7, {"top_k": 5, "top_p": 0.9})])
def test_logprobs_match_hf_forward(setup, temperature, extra):
    ep, dirs, _ = setup
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]]
    body = {"input_ids": prompts, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 24, "temperature": temperature, "ignore_eos": True, "n": 2,
                                "sampling_seed": 3, **extra}}
    r = httpx.post(f"{ep.url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    outs = r.json()
    assert len(outs) == 4  # 2 prompts x n=2
    for k, o in enumerate(outs):
        prompt = prompts[k // 2]
        toks = o["output_ids"]
        lps = o["meta_info"]["output_token_logprobs"]
        assert len(toks) == 24 == o["meta_info"]["completion_tokens"]
        assert [e[1] for e in lps] == toks and all(e[2] is None for e in lps)
        ref = _reference_logprobs(dirs[0], prompt, toks, temperature)
        got = [e[0] for e in lps]
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-5
        assert o["meta_info"]["prompt_tokens"] == len(prompt)
        assert o["meta_info"]["finish_reason"] == {"type": "length", "length": 24}


def test_update_mid_request_records_spans(setup):
    ep, dirs, root = setup
    box = {}

    def run():
        box["r"] = httpx.post(f"{ep.url}/generate", timeout=120, json={
            "input_ids": [3, 4, 5], "rid": "span-test", "return_logprob": True,
            "sampling_params": {"max_new_tokens": 100, "ignore_eos": True}})

    # hold the request in place so the update lands mid-request deterministically
    assert httpx.post(f"{ep.url}/pause_generation", json={"mode": "in_place"}).status_code == 200
    t = threading.Thread(target=run)
    t.start()
    httpx.post(f"{ep.url}/continue_generation", json={})
    deadline = time.time() + 60
    while time.time() < deadline:
        st = httpx.get(f"{ep.url}/server_info").json()["internal_states"][0]
        if st["num_running"] >= 1:
            break
        time.sleep(0.005)
    httpx.post(f"{ep.url}/pause_generation", json={"mode": "in_place"})
    r = httpx.post(f"{ep.url}/update_weights_from_disk", json={"model_path": dirs[1], "weight_version": "1",
                                                                   "flush_cache": False},
                   timeout=120)
    assert r.status_code == 200 and r.json()["success"], r.text
    httpx.post(f"{ep.url}/continue_generation", json={})
    t.join(120)
    o = box["r"].json()
    spans = o["meta_info"]["weight_versions"]
    assert [s["version"] for s in spans] == ["0", "1"], spans
    assert spans[0]["start"] == 0 and spans[0]["end"] == spans[1]["start"] and spans[1]["end"] == 100
    assert 0 < spans[0]["end"] < 100
    assert o["meta_info"]["weight_version"] == "1"
    logged = read_version_logs([root / "versions.jsonl"])["span-test"]
    assert logged["output_ids"] == o["output_ids"]
    k = spans[0]["end"]
    assert logged["versions"] == ["0"] * k + ["1"] * (100 - k)
    assert httpx.get(f"{ep.url}/model_info").json()["weight_version"] == "1"
    # a fresh request on the new weights matches HF forward of the new weights
    r = httpx.post(f"{ep.url}/generate", timeout=60, json={
        "input_ids": [7, 8, 9], "return_logprob": True, "sampling_params": {"max_new_tokens": 10, "ignore_eos": True}})
    o = r.json()
    ref = _reference_logprobs(dirs[1], [7, 8, 9], o["output_ids"], 1.0)
    assert max(abs(e[0] - b) for e, b in zip(o["meta_info"]["output_token_logprobs"], ref)) < 1e-5


def test_pause_abort_returns_partial_output(setup):
    ep, _, _ = setup
    httpx.post(f"{ep.url}/pause_generation", json={"mode": "in_place"})
    box = {}
    t = threading.Thread(target=lambda: box.update(r=httpx.post(f"{ep.url}/generate", timeout=60, json={
        "input_ids": [3, 4], "sampling_params": {"max_new_tokens": 50, "ignore_eos": True}, "return_logprob": True})))
    t.start()
    time.sleep(0.3)
    httpx.post(f"{ep.url}/pause_generation", json={"mode": "abort"})
    t.join(60)
    o = box["r"].json()
    assert o["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(o["output_ids"]) < 50
    assert len(o["meta_info"]["output_token_logprobs"]) == len(o["output_ids"])
    assert httpx.post(f"{ep.url}/continue_generation", json={}).json()["status"] == "ok"


def test_bad_requests_are_400_naming_the_field(setup):
    ep, dirs, _ = setup
    r = httpx.post(f"{ep.url}/generate", json={"input_ids": [1, 2], "sampling_params": {"max_tokens": 4}})
    assert r.status_code == 400 and "max_tokens" in r.text
    r = httpx.post(f"{ep.url}/generate", json={"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}})
    assert r.status_code == 400 and "temperature" in r.text
    r = httpx.post(f"{ep.url}/generate", json={"input_ids": [1, 100000]})
    assert r.status_code == 400 and "100000" in r.text
    r = httpx.post(f"{ep.url}/update_weights_from_disk", json={"model_path": "/nonexistent/dir"}, timeout=60)
    assert r.status_code == 400 and r.json()["success"] is False and "/nonexistent/dir" in r.json()["message"]
    r = httpx.post(f"{ep.url}/update_weights_from_disk", json={"model_path": dirs[2]}, timeout=60)  # other arch
    assert r.status_code == 400 and r.json()["success"] is False


def test_stop_tokens_and_text_input(setup):
    ep, _, _ = setup
    r = httpx.post(f"{ep.url}/generate", timeout=60, json={
        "input_ids": [5, 6], "sampling_params": {"max_new_tokens": 30, "temperature": 0.0}})
    greedy = r.json()["output_ids"]
    stop_tok = greedy[3]
    first = greedy.index(stop_tok)
    r = httpx.post(f"{ep.url}/generate", timeout=60, json={
        "input_ids": [5, 6], "sampling_params": {"max_new_tokens": 30, "temperature": 0.0, "stop_token_ids": [stop_tok]}})
    o = r.json()
    assert o["output_ids"] == greedy[:first + 1]
    assert o["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}
    r = httpx.post(f"{ep.url}/generate", timeout=60, json={"text": "1+1=", "sampling_params": {"max_new_tokens": 3}})
    assert r.status_code == 200 and isinstance(r.json()["text"], str)
    for path in ("/health", "/health_generate", "/model_info", "/server_info", "/flush_cache"):
        assert httpx.get(f"{ep.url}{path}", timeout=60).status_code == 200, path
    r = httpx.post(f"{ep.url}/update_weight_version", json={"new_version": "7"})
    assert r.json() == {"success": True, "message": "Weight version updated to 7", "new_version": "7"}
