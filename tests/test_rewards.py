"""Rewards are bounded: an answer whose check never returns scores 0 within the timeout, is counted, and
the rewards after it are computed normally (rollout/rewards.py).

The scoring runs in a child process that the test kills at a fence: on code whose bound cannot fire (a
thread-based timeout while sympy holds the GIL) the child hangs, and the fence, not pytest's own
timeout thread (which cannot run while the GIL is held either), ends it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 3.0
FENCE_S = 90  # the child's whole life: imports, spawning the reward workers, and the two scorings

# The training rollout's scoring step (GroupWorkflow.score) on one group of GSM8K answers, then the next
# group. Texts reach it as decoded responses: a tokenizer stub decodes id i to TEXTS[i].
SCRIPT = r"""
import asyncio, json, sys, time
from collections import Counter
from types import SimpleNamespace

from megatron_a3po.rollout.tasks import get_task
from megatron_a3po.rollout.types import Sample
from megatron_a3po.rollout.workflow import GroupWorkflow

TEXTS = ["so \\boxed{9^{9^{9^{9}}}}", "the answer is \\boxed{\\frac{1}{3}}", "#### 0.5", "\\boxed{2/6}"]


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return TEXTS[ids[0]]


def group(ids):
    return [Sample(group_id=0, prompt_index=0, sample_index=j, prompt_ids=[0], response_ids=[i],
                   behave_logprobs=[0.0], versions=[0], finish_reason="stop") for j, i in enumerate(ids)]


async def main():
    counters = Counter()
    wf = GroupWorkflow(None, get_task("gsm8k"), Tok(), n_samples=2, max_new_tokens=8, sampling={},
                       sampling_seed=None, reward_timeout_s=float(sys.argv[1]), adv_norm="mean", adv_eps=1e-6,
                       counters=counters, gate=None, too_stale=None)
    prompt = SimpleNamespace(index=0, record={"question": "?", "answer": "#### 1/3"})
    await wf.score(group([1]), prompt)  # the workers are up (and the task imported) before the clock starts
    alone = group([0])
    t0 = time.monotonic()
    await wf.score(alone, prompt)
    elapsed = time.monotonic() - t0
    mixed = group([0, 1])  # in a group with a right answer: each is scored on its own once the group timed out
    await wf.score(mixed, prompt)
    nxt = group([2, 3])
    await wf.score(nxt, prompt)
    print(json.dumps({"elapsed": elapsed, "alone": [s.reward for s in alone], "mixed": [s.reward for s in mixed],
                      "next": [s.reward for s in nxt], "timeouts": counters["reward_timeouts"],
                      "errors": counters["reward_errors"]}), flush=True)
    getattr(wf, "close", lambda: None)()


asyncio.run(main())
"""


def test_stuck_reward_scores_zero_within_its_timeout_and_the_next_is_right():
    try:
        r = subprocess.run([sys.executable, "-c", SCRIPT, str(TIMEOUT_S)], cwd=REPO, env=subprocess_env(),
                           capture_output=True, text=True, timeout=FENCE_S)
    except subprocess.TimeoutExpired as e:  # the child is killed by subprocess.run
        raise AssertionError(f"the scoring did not return within {FENCE_S} s (a reward timeout of {TIMEOUT_S} s "
                             f"never fired); stderr tail:\n{(e.stderr or b'')[-2000:]!r}") from None
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # \boxed{9^{9^{9^{9}}}} is not 1/3 (and is never computed): 0, within the timeout (the acceptance bound)
    assert out["alone"] == [0.0], out
    assert out["elapsed"] <= TIMEOUT_S + 2.0, out
    # beside a right answer (\frac{1}{3}), which keeps its reward
    assert out["mixed"] == [0.0, 1.0], out
    assert out["timeouts"] == 2 and out["errors"] == 0, out
    # the next group is scored normally: 0.5 != 1/3, 2/6 == 1/3 (math-verify)
    assert out["next"] == [0.0, 1.0], out


def test_a_reward_that_raises_scores_zero_and_is_counted():
    import asyncio
    from collections import Counter

    from megatron_a3po.rollout.rewards import RewardScorer
    from megatron_a3po.rollout.tasks import Task
    from rollout_util import picky_reward

    scorer = RewardScorer(Task("picky", (), None, picky_reward), timeout_s=30, workers=1)
    counters = Counter()
    try:
        first = asyncio.run(scorer.score(["ok", "boom", "fine"], {}, counters))
        second = asyncio.run(scorer.score(["ok"], {}, counters))
    finally:
        scorer.close()
    assert (first, second) == ([1.0, 0.0, 1.0], [1.0])
    assert counters == Counter(reward_errors=1)
