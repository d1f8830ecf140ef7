"""Actor-level checks in one process: micro-batch split invariance of a whole PPO step."""

import os

import pytest
from train_samples import random_samples

from megatron_a3po import metrics as M


@pytest.fixture(scope="module")
def dist1():
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron_a3po.platform import init_distributed
    from megatron_a3po.platform.procs import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    init_distributed(tp=1, pp=1, seed=0)
    yield
    for k, v in saved.items():  # leave no torchrun-like variables to later tests' child processes
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _samples(n_groups=4, n=4, seed=0):
    return random_samples(n_groups, n, seed, lambda k: (4 + k % 3, 2 + (k * 7) % 5))


def test_grad_norm_invariant_to_micro_batch_size(dist1, tmp_path):
    from transformers import AutoConfig

    from megatron_a3po.models.tiny import save_tiny_hf_model
    from megatron_a3po.trainer.loop import build_actor
    from megatron_a3po.trainer.packing import pack_microbatches
    from megatron_a3po.config import Recipe

    d = save_tiny_hf_model(tmp_path / "m", "qwen2", num_hidden_layers=2)
    cfg = AutoConfig.from_pretrained(d)
    samples = _samples()
    lengths = [s.length for s in samples[:8]]
    norms, n_mbs = {}, {}
    for budget in (64, 32):
        r = Recipe.model_validate({"name": "t", "model": {"hf_path": str(d)},
                                   "trainer": {"mode": "loglinear", "lr": 1e-3, "ppo_n_minibatches": 2,
                                               "max_tokens_per_mb": budget},
                                   "rollout": {"n_samples": 4, "temperature": 0.7}})
        actor = build_actor(r, cfg, hf_dir=str(d))
        stats = actor.train_step(samples, 6, group_size=4)
        norms[budget] = stats[M.GRAD_NORM]
        n_mbs[budget] = len(pack_microbatches(lengths, budget))
    assert n_mbs[32] > n_mbs[64] >= 1  # the split really differs
    assert norms[64] > 0
    assert abs(norms[64] - norms[32]) <= 1e-5 * max(1.0, norms[64])
