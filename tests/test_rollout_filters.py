"""Dynamic sampling under async and DAPO's overlong handling (rollout/filters.py), on hand-made groups
and through the controller with a scripted workflow (no engine): constant groups never reach a batch,
replacements obey the staleness bound, every-group-constant does not stall."""

import asyncio
import logging

import pytest

from megatron_a3po.rollout.controller import Controller, ControllerConfig
from megatron_a3po.rollout.filters import DynamicSampler, drop_truncated, overlong_penalty, shape_rewards
from megatron_a3po.rollout.types import Sample, group_advantages


def _s(reward, n_tokens=3, finish="stop", gid=0, j=0, versions=None):
    return Sample(group_id=gid, prompt_index=gid, sample_index=j, prompt_ids=[1], response_ids=[5] * n_tokens,
                  behave_logprobs=[-1.0] * n_tokens, versions=versions or [0] * n_tokens, finish_reason=finish,
                  reward=reward)


def test_overlong_penalty_is_dapos_soft_ramp():
    # L = 10, buffer 4: no penalty up to 6 tokens, then -(n - 6) / 4, reaching -1 at 10
    got = [overlong_penalty(n, 10, 4) for n in range(1, 11)]
    assert got == pytest.approx([0, 0, 0, 0, 0, 0, -0.25, -0.5, -0.75, -1.0], abs=1e-15)
    assert overlong_penalty(9, 10, 4, factor=0.5) == pytest.approx(-0.375)
    assert overlong_penalty(10, 10, 0) == 0.0   # off
    with pytest.raises(ValueError, match="overlong_buffer"):
        overlong_penalty(5, 10, 10)


def test_overlong_shaping_feeds_the_group_advantages():
    group = [_s(1.0, 3), _s(1.0, 9), _s(0.0, 10, "length"), _s(1.0, 4)]
    shaped = shape_rewards(group, [s.reward for s in group], max_new_tokens=10, buffer=4, factor=1.0)
    assert shaped == pytest.approx([1.0, 0.25, -1.0, 1.0])
    # mean advantages of the shaped rewards (mean 0.3125)
    assert group_advantages(shaped, "mean") == pytest.approx([0.6875, -0.0625, -1.3125, 0.6875])


def test_mask_truncated_takes_cut_samples_out_and_empty_groups_go():
    g1 = [_s(1.0, 3, gid=1), _s(0.0, 10, "length", gid=1, j=1)]
    g2 = [_s(0.0, 10, "length", gid=2), _s(0.0, 10, "length", gid=2, j=1)]
    g3 = [_s(1.0, 2, gid=3), _s(0.0, 4, gid=3, j=1)]
    kept, n = drop_truncated([g1, g2, g3])
    assert n == 3 and [[(s.group_id, s.sample_index) for s in g] for g in kept] == [[(1, 0)], [(3, 0), (3, 1)]]


def test_dynamic_sampler_drops_counts_and_bounds():
    ds = DynamicSampler("refill", 2, max_drops=2)
    assert ds.keep([_s(1.0), _s(0.0)])
    assert not ds.keep([_s(1.0), _s(1.0)]) and not ds.keep([_s(0.0, 5), _s(0.0, 5)])
    assert ds.counters["ds_groups_dropped"] == 2 and ds.counters["ds_tokens_dropped"] == 16
    assert ds.keep([_s(0.0), _s(0.0)])                  # past the bound: let through
    assert ds.counters["ds_groups_let_through"] == 1 and ds.groups_needed(2) == 2
    ds.delivered()
    assert ds.counters["ds_dropped_last_batch"] == 2 and not ds.keep([_s(0.0), _s(0.0)])
    shrink = DynamicSampler("shrink", 4, min_groups=2)
    for _ in range(3):
        shrink.keep([_s(1.0), _s(1.0)])
    assert shrink.groups_needed(4) == 2                 # 4 - 3 dropped, at least min_groups
    shrink.delivered()
    assert shrink.groups_needed(4) == 4


class _ScriptedWorkflow:
    """Stands in for GroupWorkflow: a group's rewards are constant when ``constant(prompt index)``; its
    tokens carry the version the engines serve when it finishes (after ``delay`` seconds)."""

    def __init__(self, ctl, constant, delay=0.002):
        self.ctl, self.constant, self.delay, self.gen_tokens = ctl, constant, delay, 0

    async def run(self, gid, prompt):
        await asyncio.sleep(self.delay)
        v = self.ctl.served_version
        rewards = [1.0, 1.0] if self.constant(prompt) else [1.0, 0.0]
        self.gen_tokens += 6
        return [Sample(gid, prompt, j, [1], [5, 6, 7], [-1.0] * 3, [v] * 3, "stop", reward=r)
                for j, r in enumerate(rewards)]


def _run_controller(cfg, constant, steps, prompts=200):
    async def main():
        c = Controller(None, list(range(prompts)), None, None, cfg)
        c.workflow = _ScriptedWorkflow(c, constant)
        await c.start()
        batches = []
        try:
            for v in range(steps):
                b = await c.get_batch(cfg.batch_groups, v, timeout=30)
                batches.append(b)
                await asyncio.sleep(0.01)       # training
                c.served_version = v + 1        # the weight update (no engines here)
                c.set_version(v + 1)
        finally:
            await c.stop()
        return c, batches

    return asyncio.run(main())


def test_refill_keeps_batches_full_of_informative_groups_within_the_staleness_bound():
    cfg = ControllerConfig(n_samples=2, batch_groups=4, max_inflight_groups=6, max_staleness=1,
                           dynamic_sampling="refill")
    c, batches = _run_controller(cfg, lambda p: p % 3 == 0, steps=8)
    assert all(len(b.groups) == 4 for b in batches)
    for b in batches:
        for g in b.groups:
            assert len({s.reward for s in g}) > 1            # no zero-variance group reached a batch
            assert all(s.staleness(b.version) <= 1 for s in g)
    assert c.counters["ds_groups_dropped"] > 0 and c.counters["ds_tokens_dropped"] == 6 * c.counters["ds_groups_dropped"]
    assert c.counters.get("ds_groups_let_through", 0) == 0
    # the dropped groups' prompts are used up, not re-queued: no prompt is delivered twice
    got = [g[0].prompt_index for b in batches for g in b.groups]
    assert len(got) == len(set(got)) and not any(p % 3 == 0 for p in got)


def test_every_group_constant_does_not_stall_it_warns_and_lets_them_through(caplog):
    cfg = ControllerConfig(n_samples=2, batch_groups=3, max_inflight_groups=4, max_staleness=2,
                           dynamic_sampling="refill", ds_max_drops=5)
    with caplog.at_level(logging.WARNING, logger="megatron_a3po.rollout.filters"):
        c, batches = _run_controller(cfg, lambda p: True, steps=3)
    assert all(len(b.groups) == 3 for b in batches)
    # (groups finishing after the last batch count too: at least the bound per batch)
    assert c.counters["ds_groups_dropped"] >= 5 * 3 and c.counters["ds_groups_let_through"] >= 3 * 3
    warnings = sum("letting constant groups through" in r.getMessage() for r in caplog.records)
    assert 3 <= warnings <= 4   # once per batch


def test_shrink_delivers_smaller_batches_without_extra_generation():
    cfg = ControllerConfig(n_samples=2, batch_groups=4, max_inflight_groups=4, max_staleness=1,
                           dynamic_sampling="shrink", ds_min_groups=2)
    c, batches = _run_controller(cfg, lambda p: p % 2 == 0, steps=6)
    sizes = [len(b.groups) for b in batches]
    assert all(2 <= n <= 4 for n in sizes) and min(sizes) < 4
    assert all(len({s.reward for s in g}) > 1 for b in batches for g in b.groups)


def test_without_dynamic_sampling_constant_groups_are_delivered():
    cfg = ControllerConfig(n_samples=2, batch_groups=4, max_inflight_groups=6, max_staleness=1)
    c, batches = _run_controller(cfg, lambda p: p % 3 == 0, steps=3)
    assert any(len({s.reward for s in g}) == 1 for b in batches for g in b.groups)
    assert "ds_groups_dropped" not in c.counters


def test_recipe_keys_of_the_filters_and_their_errors():
    from megatron_a3po.config import RecipeError, load_recipe

    r = load_recipe("demo_cpu", ["rollout.dynamic_sampling=refill", "rollout.overlong_buffer=1",
                                 "rollout.mask_truncated=true"])
    from megatron_a3po.trainer.rollout_side import controller_config

    cc = controller_config(r.rollout, seed=0, shuffle=True, adv_norm="mean", adv_eps=1e-6, adv_batch_norm=False)
    assert (cc.dynamic_sampling, cc.overlong_buffer, cc.ds_max_drops) == ("refill", 1, None)
    for ov, match in ((["rollout.overlong_buffer=2"], "overlong_buffer=2 must be < rollout.max_new_tokens"),
                      (["rollout.dynamic_sampling=shrink"], "dynamic_sampling_min_groups=1 must be at least"),
                      (["rollout.dynamic_sampling=sometimes"], "rollout.dynamic_sampling"),
                      (["loss.kl_coef=0.1", "loss.kl_in=reward", "loss.adv_batch_norm=true"], "adv_batch_norm")):
        with pytest.raises(RecipeError, match=match):
            load_recipe("demo_cpu", ov)
