"""The real SGLang 0.5.23 server in the tests: the reference the rollout, contract and fault tests talk to.

It runs from its own environment, built by ``scripts/sglang_env.sh`` (``scripts/test.sh`` builds it):
``require_sglang()`` skips a test, with the reason, where it is missing or failed to build (never a pass).
Servers start through the product's own builder (``megatron_a3po.engine.launch``, backend "sglang":
``sglang_command`` with the CPU flags). One session-wide server (conftest ``sglang_server``) serves the
tests that do not kill or restart servers; each test gets it back in a known state (``reset``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
# each server holds ~1.7 GB and two cores are shared: tests never run more than this many at once
MAX_SERVERS = 3


def require_sglang() -> str:
    """SGLang's python, or skip naming why there is none."""
    from megatron_a3po.engine.launch import SGLANG_VENV_ENV, sglang_python

    py = sglang_python()
    if py is not None:
        return py
    venv = Path(os.environ.get(SGLANG_VENV_ENV) or ROOT / ".venv-sglang")
    failed = venv / ".build-failed"
    if failed.exists():
        pytest.skip(f"real SGLang: its environment failed to build: {failed.read_text().strip()[:500]}")
    pytest.skip(f"real SGLang: no environment at {venv} (scripts/test.sh builds it with scripts/sglang_env.sh)")


def start_sglang(model_dir, *, version: str | None = "0", log_dir=None, port: int | None = None, timeout=300.0,
                 wait: bool = True, extra_args=()):
    """A real SGLang server on this CPU (an ``EngineProcess``; ``version`` None: no --weight-version).
    Its /health gives up after 2 s (SGLANG_HEALTH_CHECK_TIMEOUT; 20 s by default), as the CPU engine's
    ``--health-check-timeout 2`` in the contract tests."""
    require_sglang()
    from megatron_a3po.engine.launch import launch_engine

    return launch_engine(model_dir, backend="sglang", version=version, log_dir=log_dir, port=port,
                         timeout=timeout, wait=wait, extra_args=extra_args, env={"SGLANG_HEALTH_CHECK_TIMEOUT": "2"})


def loads(url: str) -> dict:
    """Running / waiting requests (``GET /v1/loads``, SGLang's; the CPU engine answers it the same way)."""
    r = httpx.get(f"{url}/v1/loads", timeout=10)
    r.raise_for_status()
    ld = r.json()["loads"][0]
    return {"running": ld["num_running_reqs"], "waiting": ld["num_waiting_reqs"]}


def wait_running(url: str, n: int = 1, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while loads(url)["running"] < n:
        assert time.monotonic() < deadline, f"{url}: fewer than {n} requests running after {timeout}s"
        time.sleep(0.01)


def reset(url: str, model_dir, version: str = "0"):
    """Back to a known state: generating, nothing running, no open session or update group, the weights
    of ``model_dir`` as ``version``, no slow-down."""
    httpx.post(f"{url}/continue_generation", json={}, timeout=30)
    httpx.post(f"{url}/abort_request", json={"abort_all": True}, timeout=30)
    httpx.post(f"{url}/slow_down", json={"forward_sleep_time": None}, timeout=30)
    httpx.post(f"{url}/end_weight_update", json={}, timeout=30)  # 400 when none is open
    r = httpx.post(f"{url}/update_weights_from_disk", json={"model_path": str(model_dir), "weight_version": version},
                   timeout=120)
    assert r.status_code == 200 and r.json()["success"], r.text
    deadline = time.monotonic() + 30
    while loads(url)["running"] or loads(url)["waiting"]:
        assert time.monotonic() < deadline, f"{url}: requests still running after a reset"
        time.sleep(0.05)


# fixed prompts of the toy vocabulary: the served weights are checked by greedy log-probs on them
PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [20, 3, 3]]


def hf_model_with(d, weights: dict):
    """HF transformers' model of ``d``'s architecture holding ``weights`` (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    missing, unexpected = m.load_state_dict(weights, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return m


def served_vs_hf(url, model) -> float:
    """Greedy generations of the server on fixed prompts: max |served log-prob - HF forward's| (fp64)."""
    import torch

    worst = 0.0
    for p in PROMPTS:
        o = httpx.post(f"{url}/generate", timeout=120, json={
            "input_ids": p, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}}).json()
        toks = o["output_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + toks])).logits[0].double(), -1)
        ref = [float(logp[len(p) - 1 + i, t]) for i, t in enumerate(toks)]
        assert toks == [int(logp[len(p) - 1 + i].argmax()) for i in range(len(toks))]  # greedy under HF too
        got = [e[0] for e in o["meta_info"]["output_token_logprobs"]]
        worst = max(worst, max(abs(a - b) for a, b in zip(got, ref)))
    return worst
