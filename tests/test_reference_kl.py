"""KL to a reference policy: the reference pass gives the initial policy's log-probs (HF fp64 forward of
the initial weights) after the weights moved, puts the trained weights back, and the KL-in-reward
advantages follow the formula on hand-made groups."""

import pytest
import torch

from train_samples import random_samples

from megatron_a3po import metrics as M
from megatron_a3po.trainer.reference import kl_penalised_advantages

TEMP = 0.7


def test_kl_penalised_advantages_on_hand_made_groups():
    # two interleaved groups; reward - coef * (summed KL), then each group's mean (adv_norm=mean)
    rewards = [1.0, 0.0, 1.0, 0.5, 0.5]
    kl = [2.0, 0.0, 1.0, 3.0, 1.0]
    gid = [7, 7, 7, 9, 9]
    adv = kl_penalised_advantages(rewards, kl, gid, 0.1, "mean", 1e-6)
    g7 = [0.8, 0.0, 0.9]
    g9 = [0.2, 0.4]
    expect = [g7[0] - sum(g7) / 3, g7[1] - sum(g7) / 3, g7[2] - sum(g7) / 3, g9[0] - 0.3, g9[1] - 0.3]
    assert adv == pytest.approx(expect, abs=1e-12)
    # mean_std: the constant group 9 of equal rewards is no longer constant once its KL differs
    adv = kl_penalised_advantages(rewards, kl, gid, 0.1, "mean_std", 1e-6)
    assert adv[3] == pytest.approx(-0.1 / ((2 * 0.1 ** 2) ** 0.5 + 1e-6), rel=1e-9)
    with pytest.raises(ValueError, match="KL sums"):
        kl_penalised_advantages(rewards, kl[:2], gid, 0.1, "mean", 1e-6)


def _worker(rank, world, d):
    from megatron_a3po.platform import init_distributed

    init_distributed(tp=1, pp=1, seed=0)
    return {placement: _train_and_swap(d, placement) for placement in ("device", "host")}


def _train_and_swap(d, placement):
    from transformers import AutoConfig

    from megatron_a3po.config import Recipe
    from megatron_a3po.trainer.loop import build_actor

    recipe = Recipe.model_validate({
        "name": "t", "model": {"hf_path": d}, "parallel": {"use_distributed_optimizer": False},
        "trainer": {"mode": "loglinear", "lr": 3e-2, "ppo_n_minibatches": 1, "max_tokens_per_mb": 64},
        "loss": {"kl_coef": 0.5, "kl_in": "reward", "kl_ref_placement": placement, "adv_norm": "mean"},
        "rollout": {"n_samples": 2, "temperature": TEMP}})
    actor = build_actor(recipe, AutoConfig.from_pretrained(d), hf_dir=d)
    samples = random_samples(2, 2, 3, lambda k: (3 + k % 2, 2 + k))
    stats = [actor.train_step(samples, 5, group_size=2) for _ in range(2)]   # the weights move
    before = {n: t.clone() for b in actor.export_hf_weights(64 << 20) for n, t in b}
    share = actor._split([[s] for s in samples], 1)[0]
    mbs = actor._microbatches(share)
    actor.recompute_logprobs(mbs, attr="cur_logp")
    with actor.reference.swapped_in():
        actor.recompute_logprobs(mbs, attr="ref_logp")
    after = {n: t.clone() for b in actor.export_hf_weights(64 << 20) for n, t in b}
    # numpy: tensors would cross the result queue through shared memory that dies with the process
    # (FileNotFoundError in the parent, seen once under load)
    rows = [([share.positions[i] for i in mb.sample_index], *(t.detach().double().numpy().copy()
                                                              for t in (mb.ref_logp, mb.cur_logp, mb.loss_mask)))
            for mb in mbs]
    return dict(stats=stats, same=all(torch.equal(before[n], after[n]) for n in before), rows=rows,
                nbytes=actor.reference.nbytes)


@pytest.mark.slow
def test_reference_pass_is_the_initial_policy_and_puts_the_weights_back(tmp_path):
    from megatron_a3po.models.tiny import save_tiny_hf_model
    from megatron_a3po.platform.procs import run_distributed

    d = str(save_tiny_hf_model(tmp_path / "m", "qwen2", num_hidden_layers=1))
    (outs,) = run_distributed(_worker, 1, d, timeout=600)
    for placement, out in outs.items():
        _check_against_initial_model(d, out, placement)


def _check_against_initial_model(d, out, placement):
    from transformers import AutoModelForCausalLM

    assert out["same"], f"{placement}: the trained weights were not restored after the reference pass"
    assert all(M.TIME_REF in s and M.KL_REF_REWARD_PENALTY in s for s in out["stats"])
    assert out["stats"][0][M.KL_REF_REWARD_PENALTY] > 0
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64)
    samples = random_samples(2, 2, 3, lambda k: (3 + k % 2, 2 + k))
    moved = 0.0
    for idx, *arrays in out["rows"]:
        ref, cur, mask = (torch.from_numpy(a) for a in arrays)
        for row, i in enumerate(idx):
            s = samples[i]
            seq = torch.tensor([s.prompt_ids + s.response_ids])
            P, R = len(s.prompt_ids), len(s.response_ids)
            lp = torch.log_softmax(hf(seq).logits[0].double() / TEMP, -1)
            want = lp[torch.arange(P - 1, P - 1 + R), seq[0, P:]]
            got = ref[row][mask[row].bool()].double()
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=placement)
            moved = max(moved, float((cur[row][mask[row].bool()].double() - want).abs().max()))
    assert moved > 1e-3   # the trained policy has moved away from the reference
    assert out["nbytes"] > 0
