"""Evaluation: the fleet's answers to a held-out prompt set, scored with the task's reward.

Eval requests go straight to the fleet (``Fleet.generate``): the controller never admits them, so they
never count in its staleness accounting, never move its data cursor and never reach a training batch.
The trainer starts an evaluation right after a weight push and lets training go on; the next weight
update waits for it to finish (``trainer/fleet.py``), so every eval token comes from the one version
being evaluated (counted otherwise, ``mixed_version_samples``).

Metrics of one evaluation (``EvalResult.metrics``), over ``n_prompts`` prompts x ``n_samples`` samples:

    eval/accuracy        mean reward over every sample (with 0/1 rewards: the fraction answered correctly;
                         with several samples, the pass@1 estimate)
    eval/pass@k          k = n_samples > 1: the fraction of prompts with at least one sample of reward > 0
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass, field

from megatron_a3po.rollout.controller import RolloutError, token_versions


@dataclass
class EvalConfig:
    n_samples: int = 1
    temperature: float = 0.0  # greedy
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 1024
    extra_sampling: dict = field(default_factory=dict)
    concurrency: int = 64  # prompts in flight at once
    reward_timeout_s: float = 300.0


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


async def _one_prompt(fleet, prompt, cfg: EvalConfig, version: int, sem: asyncio.Semaphore) -> list[dict]:
    async with sem:
        n = cfg.n_samples
        sp = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
              "top_k": cfg.top_k, **cfg.extra_sampling}
        payload = {"input_ids": list(prompt.prompt_ids), "sampling_params": dict(sp, n=n) if n > 1 else sp,
                   "return_logprob": True}
        resp, rid, _ = await fleet.generate(payload, rid_base=f"eval-v{version}-p{prompt.index}")
        resps = resp if isinstance(resp, list) else [resp]
        if len(resps) != n:
            raise RolloutError(f"eval request {rid}: asked for n={n} samples, got {len(resps)}")
        out = []
        for j, r in enumerate(resps):
            ids, vers, seg = [], [], 0
            while True:
                toks = list(r.get("output_ids") or [])
                ids += toks
                vers += token_versions(r["meta_info"], len(toks))
                fr = (r["meta_info"].get("finish_reason") or {}).get("type")
                if fr != "abort" or len(ids) >= cfg.max_new_tokens:
                    break
                seg += 1  # paused mid-request (no weight update runs during an eval): continue where it was
                if seg > 20:
                    raise RolloutError(f"eval request {rid}: aborted {seg} times")
                cont = {"input_ids": list(prompt.prompt_ids) + ids,
                        "sampling_params": dict(sp, max_new_tokens=cfg.max_new_tokens - len(ids)),
                        "return_logprob": True}
                r, _, _ = await fleet.generate(cont, rid_base=f"eval-v{version}-p{prompt.index}-s{j}-c{seg}")
            out.append({"prompt_index": prompt.index, "sample_index": j, "response_ids": ids, "versions": vers})
        return out


async def evaluate(fleet, prompts: list, task, tokenizer, cfg: EvalConfig, version: int) -> EvalResult:
    """Generate ``cfg.n_samples`` answers per prompt with the fleet's current weights and score them."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    sem = asyncio.Semaphore(max(1, cfg.concurrency))
    groups = await asyncio.gather(*(_one_prompt(fleet, p, cfg, version, sem) for p in prompts))

    def score():
        by_prompt = []
        for p, g in zip(prompts, groups):
            for s in g:
                s["record"] = p.record
                s["text"] = tokenizer.decode(s["response_ids"], skip_special_tokens=True)
                s["reward"] = float(task.reward(s["text"], p.record))
            by_prompt.append([s["reward"] for s in g])
        return by_prompt

    by_prompt = await asyncio.wait_for(asyncio.to_thread(score), cfg.reward_timeout_s)
    samples = [s for g in groups for s in g]
    m = eval_metrics(by_prompt)
    m["eval/mixed_version_samples"] = sum(1 for s in samples if any(v != version for v in s["versions"]))
    return EvalResult(version=version, samples=samples, metrics=m, seconds=loop.time() - t0)
