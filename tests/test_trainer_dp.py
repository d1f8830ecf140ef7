"""Data parallelism (gloo, CPU): DP=2 against DP=1 on the same global batch.

The references are the DP=1 run's own numbers (one process trains on the whole batch) and the batch
itself: which prompt groups and how many tokens each DP rank packs is read off the batch through a
wrapper around ``collate`` (what the packer hands to the model), not from the trainer's bookkeeping.
"""

import pytest
import torch

from train_samples import random_samples

from megatron_a3po import metrics as M

COUNT_KEYS = (M.NUM_TOKENS, M.CLIP_COUNT, M.DUAL_CLIP_COUNT, M.STALENESS_HIST)


def _samples(seed, n_groups=6, n=4):
    # uneven lengths: a split by count would be unbalanced
    return random_samples(n_groups, n, seed, lambda k: (4 + (k * 5) % 7, 2 + (k * 7) % 9))


def _recipe(d, *, dist_opt, n_mb):
    """adam_eps 1e-4, not 1e-8: Adam's first step moves a weight by lr * g / (|g| + eps), which for
    |g| near eps turns the fp32 rounding of the gradient sum (~1e-10 here, DP=2 sums in another order)
    into weight differences of ~lr * 1e-10 / eps: 1e-5 at eps 1e-8 on a few elements per tensor, 1e-9
    at 1e-4. The comparison is of the DP code path, not of Adam's conditioning."""
    from megatron_a3po.config import Recipe

    return Recipe.model_validate({
        "name": "t", "model": {"hf_path": str(d)}, "parallel": {"use_distributed_optimizer": dist_opt},
        "trainer": {"mode": "loglinear", "lr": 1e-3, "ppo_n_minibatches": n_mb, "max_tokens_per_mb": 64,
                    "adam_eps": 1e-4},
        "loss": {"eps_clip": 0.1, "dual_clip": 3.0},
        "rollout": {"n_samples": 4, "temperature": 0.7}})


def _worker(rank, world, d, full=True):
    from transformers import AutoConfig

    import megatron_a3po.trainer.actor as A
    from megatron_a3po.platform import init_distributed
    from megatron_a3po.trainer.loop import build_actor

    init_distributed(tp=1, pp=1, seed=0)
    cfg = AutoConfig.from_pretrained(d)
    packed = []
    orig = A.collate

    def counting_collate(samples, indices, seq_len, *a, **k):
        packed.append((seq_len, [(samples[i].group_id, samples[i].length) for i in indices]))
        return orig(samples, indices, seq_len, *a, **k)

    A.collate = counting_collate
    out = {}
    # distributed optimizer on: two steps, grad norm, counts, the next step's loss, weights after
    actor = build_actor(_recipe(d, dist_opt=True, n_mb=2), cfg, hf_dir=d)
    s1 = actor.train_step(_samples(0), 6, group_size=4)
    out["packed"] = list(packed)
    A.collate = orig
    if not full:
        return out
    s2 = actor.train_step(_samples(1), 7, group_size=4)
    # numpy: tensors would cross the result queue through shared memory that dies with the process
    weights = {n: t.float().numpy().copy() for bucket in actor.export_hf_weights(64 << 20) for n, t in bucket}
    # distributed optimizer off: the all-reduced gradient itself (one minibatch: the buffers still hold it)
    actor2 = build_actor(_recipe(d, dist_opt=False, n_mb=1), cfg, hf_dir=d)
    actor2.train_step(_samples(0), 6, group_size=4)
    grads = {n: p.main_grad.detach().float().numpy().copy() for n, p in actor2.chunks[0].module.named_parameters()}
    if rank == 0:
        out.update(s1=s1, s2=s2, weights=weights, grads=grads)
    return out


@pytest.mark.slow
def test_each_dp_rank_packs_its_share_of_every_minibatch(tmp_path):
    """Read off what each rank hands the model: every sample of the batch once over the two ranks, each
    rank at least one micro-batch of every minibatch (it joins the gradient reduction), every
    micro-batch under the budget and padded to its longest row, and the ranks' padded work even up to
    one micro-batch (the busiest rank is what the step waits for)."""
    from megatron_a3po.models.tiny import save_tiny_hf_model
    from megatron_a3po.platform.procs import run_distributed

    d = str(save_tiny_hf_model(tmp_path / "m", "qwen2", num_hidden_layers=1))
    r0, r1 = run_distributed(_worker, 2, d, False, timeout=600)
    batch = sorted((s.group_id, s.length) for s in _samples(0))
    assert sorted(x for r in (r0, r1) for _, rows in r["packed"] for x in rows) == batch
    for lo, hi in ((0, 3), (3, 6)):  # minibatch 0: groups 0-2, minibatch 1: groups 3-5
        work = []
        for r in (r0, r1):
            mbs = [(S, rows) for S, rows in r["packed"] if lo <= rows[0][0] < hi]
            assert mbs, "a DP rank got no micro-batch of a minibatch"
            for S, rows in mbs:
                assert all(lo <= g < hi for g, _ in rows)  # a micro-batch holds one minibatch's samples
                assert S == max(L for _, L in rows) and S * len(rows) <= 64
            work.append([S * len(rows) for S, rows in mbs])
        assert abs(sum(work[0]) - sum(work[1])) <= max(max(w) for w in work) + 0.05 * 64 * max(map(len, work))


@pytest.mark.slow
def test_dp2_matches_dp1_gradient_loss_counts(tmp_path):
    from megatron_a3po.models.tiny import save_tiny_hf_model
    from megatron_a3po.platform.procs import run_distributed

    d = str(save_tiny_hf_model(tmp_path / "m", "qwen2", num_hidden_layers=2))
    (ref,) = run_distributed(_worker, 1, d, timeout=600)
    r0, _ = run_distributed(_worker, 2, d, timeout=600)
    for key in COUNT_KEYS:
        assert r0["s1"][key] == ref["s1"][key], key
        assert r0["s2"][key] == ref["s2"][key], key
    assert r0["s1"][M.GRAD_NORM] == pytest.approx(ref["s1"][M.GRAD_NORM], rel=1e-6)
    assert r0["s2"][M.PG_LOSS] == pytest.approx(ref["s2"][M.PG_LOSS], abs=1e-6)
    for n, g in ref["grads"].items():
        torch.testing.assert_close(torch.from_numpy(r0["grads"][n]), torch.from_numpy(g), rtol=0, atol=1e-6, msg=n)
    for n, w in ref["weights"].items():
        torch.testing.assert_close(torch.from_numpy(r0["weights"][n]), torch.from_numpy(w), rtol=0, atol=1e-6, msg=n)


@pytest.mark.slow
def test_dp2_tp2_loop_with_two_engines(tmp_path):
    """The whole loop at DP=2 x TP=2 (4 gloo ranks) with two CPU engines: staleness bounded, versions
    advance, the engines serve exactly the trainer's export, every group trained once."""
    import json
    import math
    import subprocess
    import sys
    from pathlib import Path

    from conftest import subprocess_env

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    env = subprocess_env(A3PO_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "megatron_a3po.trainer", "--recipe", "demo_cpu", "--run-dir", str(run),
           "parallel.tp=2", "parallel.dp=2", "rollout.num_engines=2", "rollout.max_staleness=2",
           "trainer.steps=3", "trainer.verify_weight_sync=true", "trainer.warm_start_steps=0",
           "rollout.batch_prompts=4", "rollout.n_samples=4", "rollout.max_inflight_groups=12",
           "trainer.ppo_n_minibatches=2", "data.synthetic.num_prompts=400"]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    recs = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [r["version_trained"] for r in recs] == [0, 1, 2]
    assert [r["version_after"] for r in recs] == [1, 2, 3]
    gids = [g for r in recs for g in r["group_ids"]]
    assert len(gids) == len(set(gids)) == 3 * 4
    for r in recs:
        st = r["stats"]
        assert st["staleness/max"] <= 2
        assert all(math.isfinite(v) for v in st.values() if isinstance(v, float))
        assert set(r["engine_digests"].values()) == {r["weights_digest"]} and len(r["engine_digests"]) == 2
    assert len({r["weights_digest"] for r in recs}) == 3


# every aggregation mode, each with sequence-level options riding along (they need the global sequence count)
AGG_CONFIGS = [
    dict(agg_mode="token-mean", tis_level="token", tis_cap=1.2, mis_level="token", mis_ratio="theta", mis_low=0.05),
    dict(agg_mode="seq-mean-token-mean", pg_variant="gspo", tis_level="geometric", tis_cap=1.1, kl_coef=0.1),
    dict(agg_mode="seq-mean-token-sum", mis_level="sequence", mis_high=3.0, entropy_coef=0.01),
    dict(agg_mode="seq-mean-token-sum-norm", agg_norm_constant=10.0, pg_variant="cispo", dual_clip=None, kl_coef=0.1,
         kl_in="reward", kl_estimator="k1"),
]


def _agg_worker(rank, world, d):
    """The all-reduced gradient of one step per AGG_CONFIGS entry, at lr 0 (the weights never move, so
    every entry sees the same model), with small and large micro-batches."""
    from transformers import AutoConfig

    from megatron_a3po.config import LossCfg
    from megatron_a3po.platform import init_distributed
    from megatron_a3po.trainer.loop import build_actor

    init_distributed(tp=1, pp=1, seed=0)
    cfg = AutoConfig.from_pretrained(d)
    recipe = _recipe(d, dist_opt=False, n_mb=1)
    recipe.trainer.grad_clip = 0.0   # the raw gradient
    actor = build_actor(recipe, cfg, hf_dir=d)
    actor.set_lr = lambda lr: actor.optim.set_lr(0.0)
    out = {}
    for k, extra in enumerate(AGG_CONFIGS):
        actor.lc = LossCfg(**{**recipe.loss.model_dump(), "kl_coef": 0.0, **extra})
        for mb_tokens in ((64, 1000) if world == 1 else (64,)):
            actor.tc.max_tokens_per_mb = mb_tokens
            st = actor.train_step(_samples(0), 6, group_size=4)
            grads = {n: p.main_grad.detach().float().numpy().copy() for n, p in actor.chunks[0].module.named_parameters()}
            if rank == 0:
                out[(k, mb_tokens)] = (grads, st[M.PG_LOSS])
    return out


@pytest.mark.slow
def test_every_aggregation_mode_gradient_is_independent_of_dp_and_micro_batches(tmp_path):
    from megatron_a3po.models.tiny import save_tiny_hf_model
    from megatron_a3po.platform.procs import run_distributed

    d = str(save_tiny_hf_model(tmp_path / "m", "qwen2", num_hidden_layers=1))
    (ref,) = run_distributed(_agg_worker, 1, d, timeout=600)
    r0, _ = run_distributed(_agg_worker, 2, d, timeout=600)
    for k in range(len(AGG_CONFIGS)):
        base, base_loss = ref[(k, 64)]
        for other, loss in (ref[(k, 1000)], r0[(k, 64)]):
            assert loss == pytest.approx(base_loss, abs=1e-6), AGG_CONFIGS[k]
            for n, g in base.items():
                torch.testing.assert_close(torch.from_numpy(other[n]), torch.from_numpy(g), rtol=0, atol=1e-6,
                                           msg=f"{AGG_CONFIGS[k]}: {n}")
        assert any(abs(g).max() > 1e-4 for g in base.values())
    # the modes differ: the same batch gives other gradients
    g0, g1 = ref[(0, 64)][0], ref[(1, 64)][0]
    assert any(abs(g0[n] - g1[n]).max() > 1e-5 for n in g0)
