"""End to end: the trainer (TP=2 on CPU, gloo) with two CPU rollout engines and max_staleness 2.

Independent references: the per-token staleness bound and version arithmetic are checked from the
step records; the weights the engines serve are compared with a digest of the HF files the trainer
wrote, read back with safetensors (not through the trainer's export code)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def _run_trainer(run_dir, *overrides, timeout=420):
    env = subprocess_env(A3PO_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "megatron_a3po.trainer", "--recipe", "demo_cpu", "--run-dir", str(run_dir),
           *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _run_watching_listeners(run_dir, *overrides, timeout=420):
    """Run the trainer and sample, every 0.1 s, the listening sockets of its whole process tree (trainer
    ranks, engines, their stores and gloo pairs); returns (completed process, (set of (ip, port), the API keys in their environments))."""
    import time

    import psutil

    env = subprocess_env(A3PO_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "megatron_a3po.trainer", "--recipe", "demo_cpu", "--run-dir", str(run_dir),
           *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    listeners, deadline = set(), time.monotonic() + timeout
    cmdlines, keys = set(), set()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        assert time.monotonic() < deadline, "trainer timed out"
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                listeners |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN}
                cmdlines.add(" ".join(p.cmdline()))
                if p.environ().get("A3PO_API_KEY"):
                    keys.add(p.environ()["A3PO_API_KEY"])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        time.sleep(0.1)
    proc.wait()
    reader.join(timeout=10)
    # the engines' API key is in their environment only, never on a command line ps shows
    assert not any(k in c for k in keys for c in cmdlines)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), ""), (listeners, keys)


def _records(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "steps.jsonl").read_text().splitlines()]


SMALL = ["trainer.warm_start_steps=0", "rollout.batch_prompts=4", "rollout.n_samples=4",
         "rollout.max_inflight_groups=12", "trainer.ppo_n_minibatches=2", "data.synthetic.num_prompts=400"]


@pytest.mark.slow
def test_tp2_two_engines_staleness_versions_and_weight_sync(tmp_path):
    run = tmp_path / "run"
    p = _run_trainer(run, "parallel.tp=2", "rollout.num_engines=2", "rollout.max_staleness=2",
                     "trainer.steps=5", "trainer.verify_weight_sync=true", "loss.entropy_coef=0.01", *SMALL)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = _records(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    # versions advance by one per step, starting from the engines' version 0
    assert [r["version_trained"] for r in recs] == [0, 1, 2, 3, 4]
    assert [r["version_after"] for r in recs] == [1, 2, 3, 4, 5]
    gids = [g for r in recs for g in r["group_ids"]]
    assert len(gids) == len(set(gids)), "a prompt group was trained on twice"
    for r in recs:
        st = r["stats"]
        assert st["staleness/max"] <= 2  # the bound, per token, over the whole batch
        for k, v in st.items():
            if isinstance(v, float):
                assert math.isfinite(v), (r["step"], k, v)
        # both engines serve exactly what the trainer exported
        assert set(r["engine_digests"].values()) == {r["weights_digest"]}
        assert len(r["engine_digests"]) == 2
    assert len({r["weights_digest"] for r in recs}) == len(recs)  # the weights changed every step
    # independent check of the last digest: the HF files on disk, read with safetensors
    from safetensors.torch import load_file

    from megatron_a3po.convert.digest import state_digest

    files = sorted((run / "weights" / "v5").glob("*.safetensors"))
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    assert state_digest(tensors.items()) == recs[-1]["weights_digest"]
    # some tokens really were stale (asynchronous training)
    assert any(r["stats"]["staleness/mean"] > 0 for r in recs)


@pytest.mark.slow
def test_resume_after_sigkill_continues_the_same_batches(tmp_path):
    import signal
    import time

    common = [*SMALL, "trainer.steps=4", "trainer.save_every=2", "rollout.max_staleness=4",
              "loss.entropy_coef=0.01"]
    a = tmp_path / "a"
    p = _run_trainer(a, *common)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rec_a = _records(a)

    b = tmp_path / "b"
    env = subprocess_env(A3PO_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "megatron_a3po.trainer", "--recipe", "demo_cpu",
                             "--run-dir", str(b), *common], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill once step 3 is done: past the step-2 checkpoint
        if (b / "steps.jsonl").exists() and len(_records(b)) >= 3:
            break
        assert proc.poll() is None, "trainer exited before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before = _records(b)
    assert (b / "checkpoints" / "latest").read_text().strip() == "step_000002"

    p = _run_trainer(b, *common, "trainer.resume=true")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # one history: the records of the killed run's steps after the checkpoint (3, maybe 4) are replaced
    final = _records(b)
    assert [r["step"] for r in final] == [1, 2, 3, 4]
    assert final[:2] == before[:2]
    gids = [g for r in final for g in r["group_ids"]]
    assert len(gids) == len(set(gids)), "a group id appears twice in steps.jsonl"
    after = final[2:]
    # TensorBoard: one value per step, the resumed run's (events of the killed run's steps 3+ purged)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(b / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("train/reward/mean", "train/policy/version"):
        ev = acc.Scalars(tag)
        assert [e.step for e in ev] == [0, 1, 2, 3], (tag, [(e.step, e.value) for e in ev])
    assert [e.value for e in acc.Scalars("train/reward/mean")] == pytest.approx(
        [r["stats"]["reward/mean"] for r in final], abs=1e-6)
    # same version numbering as the uninterrupted run
    assert [r["version_trained"] for r in after] == [r["version_trained"] for r in rec_a[2:]] == [2, 3]
    # the same batches: no prompt lost or used twice across the crash (ordered delivery)
    seq_b = [r["prompt_indices"] for r in before[:2]] + [r["prompt_indices"] for r in after]
    assert seq_b == [r["prompt_indices"] for r in rec_a]
    # in-flight groups at the crash were regenerated and counted
    assert after[0]["stats"]["rollout/groups_regenerated_on_resume"] > 0
    # the loss curve continues: entropy right after the resume is close to the value before the crash
    h2, h3 = before[1]["stats"]["entropy/mean"], after[0]["stats"]["entropy/mean"]
    assert abs(h3 - h2) < 0.25, (h2, h3)


@pytest.mark.slow
def test_pp2_streamed_weight_sync_reaches_the_engine(tmp_path):
    """rollout.weight_sync=nccl (gloo on CPU): no HF dir per step; the engine's served weights equal the
    trainer's export after every step, and the engine reports every new version. Nothing in the run's
    process tree listens outside loopback."""
    run = tmp_path / "run"
    p, (listeners, keys) = _run_watching_listeners(run, "parallel.pp=2", "rollout.weight_sync=nccl",
                                           "rollout.weight_sync_bucket_mb=1", "trainer.steps=3",
                                           "trainer.verify_weight_sync=true", *SMALL)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # a single-machine run listens on loopback only: the engine's HTTP port, the default group's store
    # (2 ranks), the weight-update group's store and gloo's pair sockets
    assert listeners, "no listening socket seen (the sampling missed the run)"
    assert {ip for ip, _ in listeners} <= {"127.0.0.1", "::1"}, sorted(listeners)
    assert len(keys) == 1  # the engine ran with a key; the trainer's calls (generate, weights, digest) sent it
    recs = _records(run)
    assert [r["version_after"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert list(r["engine_digests"].values()) == [r["weights_digest"]]
        assert r["stats"]["rollout/served_version"] == r["version_trained"]  # the push before it landed
    assert len({r["weights_digest"] for r in recs}) == 3
    assert sorted(d.name for d in (run / "weights").iterdir()) == ["v0"]  # only the engine's start-up weights
