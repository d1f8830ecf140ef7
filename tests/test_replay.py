"""Reproducible asynchronous runs: the CPU engine's held versions and batch-invariant serving
(engine/replay.py), and a recorded schedule replayed by the trainer (rollout/schedule.py, rollout/replay.py).

Independent references: the pinned log-probs against HF transformers' forward of the named weights (with
the KV cache of the tokens before, as an engine paused in place across an update computes them); a run's
step records against the records of the run it replays, field by field as the JSON holds them."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import torch
from conftest import subprocess_env

from megatron_a3po.engine.launch import launch_engine
from rollout_util import model_dirs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay_engine")
    dirs = model_dirs(root, 3, "qwen2")
    ep = launch_engine(dirs[0], version="0", weights_root=root,
                       extra_args=["--enable-deterministic-inference", "--keep-weight-versions", "2"])
    for v in (1,):
        r = httpx.post(f"{ep.url}/update_weights_from_disk", json={"model_path": dirs[v], "weight_version": str(v)},
                       timeout=120)
        assert r.status_code == 200 and r.json()["success"], r.text
    yield ep, dirs
    ep.stop()


def _reference(dirs, prompt, out, version_of, T=1.0):
    """HF log-probs of ``out`` after ``prompt``, token k by the model of version_of(k), each step reusing
    the KV cache of the tokens before it (computed by the versions that produced them)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    models = {v: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for v, d in enumerate(dirs)}
    cache, got = DynamicCache(), []
    with torch.no_grad():
        ids = torch.tensor([prompt])
        for k, tok in enumerate(out):
            logits = models[version_of(k)](input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
            got.append(float(torch.log_softmax(logits.double() / T, -1)[tok]))
            ids = torch.tensor([[tok]])
    return got


def _gen(ep, body):
    r = httpx.post(f"{ep.url}/generate", json=body, timeout=120)
    return r


def test_pinned_versions_cuts_and_batch_invariance(engine):
    ep, dirs = engine
    prompt = [5, 6, 7, 8]
    body = {"input_ids": prompt, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 8, "ignore_eos": True, "n": 3, "sampling_seed": 11},
            "replay": {"samples": [{"versions": [["0", 8]]}, {"versions": [["0", 3], [1, 2]]},
                                   {"versions": [["1", 1]], "max_new_tokens": 3}]}}
    r = _gen(ep, body)
    assert r.status_code == 200, r.text
    outs = r.json()
    plans = [lambda k: 0, lambda k: 0 if k < 3 else 1, lambda k: 1]
    for o, v_of, n in zip(outs, plans, (8, 8, 3)):
        toks = o["output_ids"]
        assert len(toks) == n
        assert o["meta_info"]["finish_reason"]["type"] == "length"
        spans = [(int(s["version"]), s["end"] - s["start"]) for s in o["meta_info"]["weight_versions"]]
        assert [v for v, c in spans for _ in range(c)] == [v_of(k) for k in range(n)]
        ref = _reference(dirs[:2], prompt, toks, v_of)
        assert max(abs(e[0] - x) for e, x in zip(o["meta_info"]["output_token_logprobs"], ref)) < 1e-5

    # batch invariance: the same request while others are served gives the same bits
    box = {}

    def other(i):
        box[i] = _gen(ep, {"input_ids": [9, 10 + i, 11], "return_logprob": True,
                           "sampling_params": {"max_new_tokens": 12, "ignore_eos": True, "n": 2}})

    ts = [threading.Thread(target=other, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    again = _gen(ep, body).json()
    for t in ts:
        t.join(120)
    assert all(box[i].status_code == 200 for i in range(4))
    assert [(o["output_ids"], o["meta_info"]["output_token_logprobs"]) for o in again] == \
           [(o["output_ids"], o["meta_info"]["output_token_logprobs"]) for o in outs]

    # a version the engine does not hold is a 400 naming it; the oldest goes when a third arrives
    bad = dict(body, replay={"samples": [{"versions": [["7", 1]]}] * 3})
    r = _gen(ep, bad)
    assert r.status_code == 400 and "'7' is not held" in r.text
    r = httpx.post(f"{ep.url}/update_weights_from_disk", json={"model_path": dirs[2], "weight_version": "2"},
                   timeout=120)
    assert r.json()["success"]
    r = _gen(ep, body)
    assert r.status_code == 400 and "'0' is not held" in r.text and "['1', '2']" in r.text
    # the held version 1 is still exactly what it was
    o = _gen(ep, dict(body, replay={"samples": [{"versions": [["1", 8]]}] * 3})).json()[2]
    ref = _reference(dirs[:2], prompt, o["output_ids"], lambda k: 1)
    assert max(abs(e[0] - x) for e, x in zip(o["meta_info"]["output_token_logprobs"], ref)) < 1e-5


# ---------------------------------------------------------------- the trainer: record, replay

SMALL = ["trainer.steps=8", "trainer.warm_start_steps=5", "rollout.batch_prompts=4", "rollout.n_samples=4",
         "rollout.max_inflight_groups=12", "rollout.max_staleness=2", "rollout.max_new_tokens=6",
         "trainer.ppo_n_minibatches=2", "data.synthetic.num_prompts=400", "trainer.eval_every=0"]


def _train(run_dir, *overrides):
    env = subprocess_env(A3PO_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "megatron_a3po.trainer", "--recipe", "demo_cpu", "--run-dir", str(run_dir),
           *SMALL, *overrides]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _schedule(run_dir):
    lines = (Path(run_dir) / "schedule.jsonl").read_text().splitlines()
    return json.loads(lines[0]), [json.loads(x) for x in lines[1:]]


def _token_versions(sample_entry):
    return [v for _, spans in sample_entry["segments"] for v, n in spans for _ in range(n)]


def test_replay_reproduces_an_asynchronous_run_and_runs_another_mode_on_it(tmp_path):
    from megatron_a3po.rollout.schedule import compare_step_records

    rec, rep, crn = tmp_path / "rec", tmp_path / "rep", tmp_path / "crn"
    _train(rec, "replay.record=true")
    head, steps = _schedule(rec)
    assert len(steps) == 8 and head["max_staleness"] == 2
    stale = [st["version"] - v for st in steps for g in st["groups"] for s in g["samples"] for v in _token_versions(s)]
    assert 1 <= max(stale) <= 2  # asynchronous (how stale depends on the machine), within the bound
    sched = str(rec / "schedule.jsonl")
    # the same mode on the schedule, and recompute on it, at the same time (two processes)
    t = threading.Thread(target=_train, args=(crn, f"replay.schedule={sched}", "replay.record=true",
                                              "trainer.mode=recompute"))
    t.start()
    _train(rep, f"replay.schedule={sched}", "replay.record=true")
    t.join()
    n, diffs = compare_step_records(rec / "steps.jsonl", rep / "steps.jsonl")
    assert n == 8 and diffs == []
    assert _schedule(rep) == (head, steps)  # and it generated exactly the recorded schedule again
    # another mode: the same groups and prompts each step, every token at the version the schedule gives
    # its position (common random numbers); step 1's samples come from the same weights: identical
    _, crn_steps = _schedule(crn)
    for a, b in zip(steps, crn_steps):
        assert [(g["gid"], g["prompt_index"]) for g in a["groups"]] == [(g["gid"], g["prompt_index"]) for g in b["groups"]]
        for ga, gb in zip(a["groups"], b["groups"]):
            for sa, sb in zip(ga["samples"], gb["samples"]):
                va, vb = _token_versions(sa), _token_versions(sb)
                assert vb == [va[min(k, len(va) - 1)] for k in range(len(vb))]
    r_rec = [json.loads(x) for x in (rec / "steps.jsonl").read_text().splitlines()]
    r_crn = [json.loads(x) for x in (crn / "steps.jsonl").read_text().splitlines()]
    assert r_rec[0]["stats"]["reward/mean"] == r_crn[0]["stats"]["reward/mean"]
    assert r_rec[0]["stats"]["response/length_mean"] == r_crn[0]["stats"]["response/length_mean"]
    # the same samples under two objectives: pi_prox differs, so the importance ratio's extremes do (the
    # loss may not: with nothing clipped, w * r = pi_theta / pi_behave in every mode)
    assert (r_rec[0]["stats"]["ratio/max"], r_rec[0]["stats"]["approx_kl"]) != \
           (r_crn[0]["stats"]["ratio/max"], r_crn[0]["stats"]["approx_kl"])
