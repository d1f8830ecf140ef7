"""A fleet the user started: the trainer (CLI, the demo recipe, a few steps) against a real SGLang 0.5.23
server it did not start (``rollout.engine_urls``), as a GPU cluster's user would run it.

One server, started the way SGLang's docs start one (no ``--weight-version``: it reports "default"), is
used in turn by: a run with disk sync (the first push sets the version); a run with distributed sync over
gloo, SIGKILLed mid-run (the server then serves a higher version than its checkpoint's and still holds the
run's weight-update group); its resume (``trainer.resume=true``, same group name: the stale group is
destroyed first); a new run with disk sync (a reused fleet at a higher version, a group of another run
left). Each trains without error, and the server ends at the version of the run's last push.
Skipped with the reason where SGLang's environment is missing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import subprocess_env

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SHORT = ["trainer.warm_start_steps=0", "trainer.eval_every=0", "rollout.batch_prompts=4", "rollout.n_samples=4",
         "rollout.max_inflight_groups=8", "trainer.ppo_n_minibatches=1", "data.synthetic.num_prompts=2000",
         "rollout.backend=sglang", "rollout.weight_sync_master_addr=127.0.0.1", "rollout.request_timeout_s=60"]


@pytest.fixture(scope="module")
def user_fleet(tmp_path_factory):
    """A real SGLang server started without --weight-version on the demo's model (the trainer's initial
    weights are the same tiny model: its weights are replaced by the first push anyway)."""
    from real_sglang import require_sglang, start_sglang

    require_sglang()
    from megatron_a3po.config import load_recipe
    from megatron_a3po.trainer.loop import prepare_initial_model

    root = tmp_path_factory.mktemp("user-fleet")
    _, hf_dir, _, _ = prepare_initial_model(load_recipe("demo_cpu", ["trainer.seed=7"]), root)
    ep = start_sglang(hf_dir, version=None, log_dir=root / "logs")
    yield ep
    ep.stop()


def _version(url) -> str:
    return httpx.get(f"{url}/model_info", timeout=30).json()["weight_version"]


def _train(run_dir, url, *overrides, timeout=600):
    env = subprocess_env(A3PO_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "megatron_a3po.trainer", "--recipe", "demo_cpu", "--run-dir", str(run_dir),
           *SHORT, f"rollout.engine_urls=[{url}]", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _steps(run_dir) -> list[dict]:
    f = Path(run_dir) / "steps.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def _check(r, run_dir, steps: int):
    assert r.returncode == 0, (r.stdout[-2000:] + r.stderr[-3000:])
    recs = _steps(run_dir)
    assert [x["step"] for x in recs][-1] == steps, recs
    # every trained token came from a version this run pushed (0 .. steps-1), within the bound
    assert all(x["stats"]["staleness/max"] <= 2 for x in recs)
    return recs


def test_a_fleet_started_without_weight_version_gets_its_version_from_the_first_push(user_fleet, tmp_path):
    url = user_fleet.url
    assert _version(url) == "default"
    r = _train(tmp_path / "run", url, "trainer.steps=2")
    _check(r, tmp_path / "run", 2)
    assert _version(url) == "2"


def test_a_reused_fleet_with_a_stale_update_group_then_resume(user_fleet, tmp_path):
    """Distributed sync: a run killed after its first checkpoint leaves the server at a higher version with
    its weight-update group; the resumed run (same run dir, same group name) and a new run (disk sync) both
    train."""
    url = user_fleet.url
    run = tmp_path / "crashed"
    env = subprocess_env(A3PO_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "megatron_a3po.trainer", "--recipe", "demo_cpu", "--run-dir", str(run), *SHORT,
           f"rollout.engine_urls=[{url}]", "rollout.weight_sync=nccl", "trainer.steps=100", "trainer.save_every=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while len(_steps(run)) < 3:  # a checkpoint at step 2, then one more push
            assert proc.poll() is None and time.monotonic() < deadline, _steps(run)
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    assert int(_version(url)) >= 3  # higher than the checkpoint's version 2, and the group is still there
    r = _train(run, url, "rollout.weight_sync=nccl", "trainer.steps=4", "trainer.save_every=2", "trainer.resume=true")
    recs = _check(r, run, 4)
    assert [x["step"] for x in recs] == [1, 2, 3, 4]  # resumed after step 2: steps 3 and 4 replaced
    assert _version(url) == "4"
    # a new run with disk sync on the reused fleet (version 4, higher than its 0)
    r = _train(tmp_path / "new-disk", url, "trainer.steps=2")
    _check(r, tmp_path / "new-disk", 2)
    assert _version(url) == "2"


def test_the_trainer_starts_real_sglang_itself(tmp_path):
    """``rollout.backend=sglang`` with no engine URLs on a CPU machine: the trainer starts SGLang's own
    server (the command line launch/ writes for GPU nodes, plus the CPU flags), trains a few steps of the
    demo against it (disk sync) and stops it. With ``loss.mismatch_metrics`` in recompute mode it reports
    the engine/trainer mismatch (issue 25): step 1's tokens all come from the weights the step starts
    from, so its d0 bucket is real SGLang's fp32 log-probs against the trainer's at the same weights."""
    from real_sglang import require_sglang

    require_sglang()
    run = tmp_path / "run"
    env = subprocess_env(A3PO_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "megatron_a3po.trainer", "--recipe", "demo_cpu", "--run-dir", str(run), *SHORT,
           "trainer.steps=3", "trainer.mode=recompute", "loss.mismatch_metrics=true"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    _check(r, run, 3)
    first = _steps(run)[0]["stats"]
    assert first["mismatch/token_frac/d0"] == 1.0  # step 1: every token from version 0, the step's weights
    # fp32 SGLang vs the trainer at the same weights: rounding, orders of magnitude below one version of
    # policy drift (docs/rollout.md's table: mean |diff| ~1e-7)
    assert abs(first["mismatch/k1/d0"]) < 1e-4 and 0.0 <= first["mismatch/k3/d0"] < 1e-6, first
    logs = list((run / "engines").glob("engine-*.log"))
    assert len(logs) == 1 and "sglang" in logs[0].read_text(errors="replace").lower()
    recs = _steps(run)
    assert max(x["stats"]["staleness/max"] for x in recs) <= 2
