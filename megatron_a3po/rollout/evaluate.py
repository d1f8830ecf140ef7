"""Evaluation: the fleet's answers to a held-out prompt set, scored with the task's reward.

Eval requests go straight to the fleet (``Fleet.generate``): the controller never admits them, so they
never count in its staleness accounting, never move its data cursor and never reach a training batch.
The trainer starts an evaluation right after a weight push and lets training go on; the next weight
update waits for it to finish (``trainer/rollout_side.py``), so every eval token comes from the one version
being evaluated (counted otherwise, ``mixed_version_samples``).

Metrics of one evaluation (``EvalResult.metrics``), over ``n_prompts`` prompts x ``n_samples`` samples:

    eval/accuracy        mean reward over every sample (with 0/1 rewards: the fraction answered correctly;
                         with several samples, the pass@1 estimate)
    eval/pass@k          k = n_samples > 1: the fraction of prompts with at least one sample of reward > 0
    eval/reward_failures rewards that raised or timed out (scored 0), when there were any
"""

from __future__ import annotations

import asyncio
import statistics
from collections import Counter
from dataclasses import dataclass, field

from megatron_a3po.rollout.rewards import REWARD_TIMEOUT_S
from megatron_a3po.rollout.types import ADV_EPS
from megatron_a3po.rollout.workflow import GroupWorkflow


@dataclass
class EvalConfig:
    n_samples: int = 1
    temperature: float = 0.0  # greedy
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 1024
    extra_sampling: dict = field(default_factory=dict)
    concurrency: int = 64  # prompts in flight at once
    reward_timeout_s: float = REWARD_TIMEOUT_S  # per response (rewards.py), when evaluate() gets no scorer


@dataclass
class EvalResult:
    version: int
    samples: list[dict]  # prompt_index, sample_index, response_ids, versions, record, text, reward
    metrics: dict
    seconds: float = 0.0


def eval_metrics(rewards_by_prompt: list[list[float]]) -> dict:
    """accuracy (mean reward over every sample) and, for k > 1 samples a prompt, pass@k."""
    flat = [r for rs in rewards_by_prompt for r in rs]
    out = {"eval/accuracy": statistics.fmean(flat) if flat else float("nan"),
           "eval/n_prompts": len(rewards_by_prompt)}
    k = max((len(rs) for rs in rewards_by_prompt), default=1)
    if k > 1:
        out[f"eval/pass@{k}"] = statistics.fmean(float(any(r > 0 for r in rs)) for rs in rewards_by_prompt)
    return out


def _no_wait():
    """An evaluation has no admission gate: it runs between two weight updates (trainer/rollout_side.py)."""
    return asyncio.sleep(0)


async def evaluate(fleet, prompts: list, task, tokenizer, cfg: EvalConfig, version: int, *,
                   scorer=None) -> EvalResult:
    """Generate ``cfg.n_samples`` answers per prompt with the fleet's current weights and score them: the
    training rollout's per-group workflow (workflow.py), with no staleness rule (nothing is trained on
    these samples) and no sampling seed (greedy by default). ``scorer``: the rollout's reward workers
    (rewards.py; default: a pool of this evaluation's own)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    counters: Counter = Counter()
    wf = GroupWorkflow(fleet, task, tokenizer, n_samples=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
                       sampling={"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                                 **cfg.extra_sampling},
                       sampling_seed=None, reward_timeout_s=cfg.reward_timeout_s, adv_norm="mean", adv_eps=ADV_EPS,
                       counters=counters, gate=_no_wait, too_stale=lambda versions: False,
                       rid=lambda p, j, seg: f"eval-v{version}-p{p}" + (f"-s{j}-c{seg}" if j >= 0 else ""),
                       scorer=scorer)
    sem = asyncio.Semaphore(max(1, cfg.concurrency))

    async def one(p):
        async with sem:
            return await wf.run(p.index, p)

    try:
        groups = await asyncio.gather(*(one(p) for p in prompts))
    finally:
        wf.close()
    samples = [{"prompt_index": s.prompt_index, "sample_index": s.sample_index, "response_ids": s.response_ids,
                "versions": s.versions, "record": p.record, "text": s.text, "reward": s.reward}
               for p, g in zip(prompts, groups) for s in g]
    m = eval_metrics([[s.reward for s in g] for g in groups])
    m["eval/mixed_version_samples"] = sum(1 for s in samples if any(v != version for v in s["versions"]))
    if counters["reward_errors"] or counters["reward_timeouts"]:
        m["eval/reward_failures"] = counters["reward_errors"] + counters["reward_timeouts"]
    return EvalResult(version=version, samples=samples, metrics=m, seconds=loop.time() - t0)
