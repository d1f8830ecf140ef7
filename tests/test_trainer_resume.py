"""Checkpoints through dist_checkpointing: resume after a SIGKILL at the same layout, resume at another
layout, and damaged or foreign checkpoints (a clear error, exit code 2, nothing unpickled).

References: an uninterrupted run on the same deterministic batches (its Adam moments and next-step
loss), and files the test itself damages."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

from megatron_a3po import metrics as M

ROOT = Path(__file__).resolve().parents[1]


def _samples(step, n_groups=4, n=4):
    from megatron_a3po.trainer.batch import TrainSample

    g = torch.Generator().manual_seed(100 + step)
    out = []
    for k in range(n_groups * n):
        P, R = 4 + (k * 5) % 7, 2 + (k * 7) % 9
        out.append(TrainSample(prompt_ids=torch.randint(3, 90, (P,), generator=g).tolist(),
                               response_ids=torch.randint(3, 90, (R,), generator=g).tolist(),
                               behave_logprobs=(-torch.rand(R, generator=g) * 3 - 1).tolist(),
                               versions=[step] * R, advantage=float(torch.randn((), generator=g)),
                               group_id=step * 100 + k // n))
    return out


def _worker(rank, world, d, ckpt_root, *, tp, start, stop, save_at=None, kill_after=None):
    from transformers import AutoConfig

    from megatron_a3po.config import Recipe
    from megatron_a3po.platform import init_distributed
    from megatron_a3po.trainer.loop import build_actor
    from megatron_a3po.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    init_distributed(tp=tp, pp=1, seed=0)
    r = Recipe.model_validate({"name": "t", "model": {"hf_path": d}, "parallel": {"tp": tp},
                               "trainer": {"mode": "loglinear", "lr": 1e-3, "ppo_n_minibatches": 2,
                                           "max_tokens_per_mb": 64},
                               "rollout": {"n_samples": 4, "temperature": 0.7}})
    actor = build_actor(r, AutoConfig.from_pretrained(d), hf_dir=d)
    version = 0
    if start > 0:
        st = load_checkpoint(latest_checkpoint(ckpt_root), actor)
        assert st["step"] == start
        version, actor.step_count = st["version"], st["step"]
    losses = {}
    for step in range(start, stop):
        stats = actor.train_step(_samples(step), version, group_size=4)
        version += 1
        losses[step + 1] = stats.get(M.PG_LOSS)
        if save_at == step + 1:
            save_checkpoint(ckpt_root, step + 1, actor, {"step": step + 1, "version": version, "rng": {},
                                                         "rollout": None})
        if kill_after == step + 1:
            os.kill(os.getpid(), signal.SIGKILL)
    moments = {k: v.numpy().copy() for k, v in sorted(actor.optim.main_state("exp_avg").items())[:4]}
    return {"losses": losses, "version": version, "exp_avg": moments}


@pytest.mark.slow
def test_resume_after_sigkill_same_layout_and_at_another_layout(tmp_path):
    from megatron_a3po.models.tiny import save_tiny_hf_model
    from megatron_a3po.platform.procs import WorkerError, run_distributed

    d = str(save_tiny_hf_model(tmp_path / "m", "qwen2", num_hidden_layers=2))
    # uninterrupted: DP=2, four steps
    ref = run_distributed(_worker, 2, d, str(tmp_path / "a"), tp=1, start=0, stop=4, save_at=2, timeout=600)
    # killed after step 3 (the step-2 checkpoint is the last one), then resumed at the same layout
    with pytest.raises(WorkerError, match="exited with code -9"):
        run_distributed(_worker, 2, d, str(tmp_path / "k"), tp=1, start=0, stop=4, save_at=2, kill_after=3,
                        timeout=600)
    assert (tmp_path / "k" / "latest").read_text().strip() == "step_000002"
    assert not list((tmp_path / "k").glob(".tmp-*"))
    res = run_distributed(_worker, 2, d, str(tmp_path / "k"), tp=1, start=2, stop=4, timeout=600)
    for a, b in zip(ref, res):  # each DP rank's own slice of the moments
        assert b["version"] == a["version"] == 4
        assert list(a["exp_avg"]) == list(b["exp_avg"]) and a["exp_avg"]
        for k in a["exp_avg"]:
            torch.testing.assert_close(torch.from_numpy(b["exp_avg"][k]), torch.from_numpy(a["exp_avg"][k]),
                                       rtol=0, atol=1e-6, msg=k)
    assert res[0]["losses"][3] == pytest.approx(ref[0]["losses"][3], abs=1e-6)
    assert res[0]["losses"][4] == pytest.approx(ref[0]["losses"][4], abs=1e-6)
    # saved at DP=2 TP=1, resumed at DP=1 TP=2: the same next-step loss
    tp2 = run_distributed(_worker, 2, d, str(tmp_path / "k"), tp=2, start=2, stop=3, timeout=600)
    assert tp2[0]["losses"][3] == pytest.approx(ref[0]["losses"][3], abs=1e-5)


# ---------------------------------------------------------------------------------- bad checkpoints
def _cli(run_dir, *overrides, timeout=600):
    env = subprocess_env(A3PO_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "megatron_a3po.trainer", "--recipe", "demo_cpu", "--run-dir", str(run_dir),
           "trainer.warm_start_steps=0", "rollout.batch_prompts=4", "rollout.n_samples=4",
           "trainer.ppo_n_minibatches=2", "data.synthetic.num_prompts=200", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


class _Plant:
    """Unpickling it would create the file ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.slow
def test_damaged_or_foreign_checkpoint_is_exit_2_naming_the_file(tmp_path):
    good = tmp_path / "good"
    p = _cli(good, "trainer.steps=1", "trainer.save_every=1")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ck = good / "checkpoints" / "step_000001"
    assert json.loads((ck / "state.json").read_text())["layout"] == {"tp": 1, "pp": 1, "dp": 1}

    def copy(name):
        run = tmp_path / name
        shutil.copytree(good / "checkpoints", run / "checkpoints")
        return run, run / "checkpoints" / "step_000001"

    # a truncated shard (model and optimizer)
    for sub in ("model", "optim"):
        run, c = copy(f"trunc_{sub}")
        shard = sorted((c / sub).glob("*.distcp"))[0]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        p = _cli(run, "trainer.steps=2", "trainer.resume=true")
        assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
        assert str(shard) in p.stderr and "truncated" in p.stderr and str(c) in p.stderr, p.stderr[-2000:]
    # a missing shard
    run, c = copy("missing")
    shard = sorted((c / "optim").glob("*.distcp"))[0]
    shard.unlink()
    p = _cli(run, "trainer.steps=2", "trainer.resume=true")
    assert p.returncode == 2 and str(shard) in p.stderr and "missing" in p.stderr, p.stderr[-2000:]
    # a checkpoint of another model
    p = _cli(copy("other")[0], "trainer.steps=2", "trainer.resume=true", "model.tiny.hidden_size=32")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "state.json" in p.stderr and "different model" in p.stderr and "hidden_size" in p.stderr, p.stderr[-2000:]
    # crafted pickles: the torch_dist metadata (read by torch with a bare pickle.load) and common.pt
    for sub, name in (("model", ".metadata"), ("optim", "common.pt")):
        run, c = copy(f"pickle_{sub}")
        marker = tmp_path / f"pwned_{sub}"
        target = c / sub / name
        if name == "common.pt":
            torch.save({"x": _Plant(str(marker))}, target)
        else:
            target.write_bytes(pickle.dumps(_Plant(str(marker))))
        p = _cli(run, "trainer.steps=2", "trainer.resume=true")
        assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
        assert not marker.exists(), "resume ran code from the checkpoint"
        assert str(target) in p.stderr, p.stderr[-2000:]
