"""Evaluation: metrics from the saved generations, pass@k, and no effect on the training controller."""

import asyncio
import math

import pytest

from megatron_a3po.rollout.controller import Controller, ControllerConfig
from megatron_a3po.rollout.evaluate import EvalConfig, eval_metrics, evaluate
from rollout_util import tokenizer, toy_prompts, toy_task


class _FakeFleet:
    """Answers prompt p's sample j with the digits of p + j, at one version; the first request of
    prompt 12 comes back aborted after one token (as after a pause) and must be continued."""

    def __init__(self, tok, version):
        self.tok, self.version, self.calls, self.prompt_len = tok, version, [], {}

    def comebacks(self):  # the controller's weight sync listens; no server of this fleet ever comes back
        return asyncio.Queue()

    async def generate(self, payload, rid_base):
        self.calls.append(rid_base)
        p = int(rid_base.split("-p")[1].split("-")[0])
        batch = isinstance(payload["input_ids"][0], list)  # a group request: the prompt n times
        n = len(payload["input_ids"]) if batch else 1
        ids_in = payload["input_ids"][0] if batch else payload["input_ids"]
        self.prompt_len.setdefault(p, len(ids_in))
        done = len(ids_in) - self.prompt_len[p]  # tokens already generated (a continuation)
        j0 = int(rid_base.split("-s")[1].split("-")[0]) if "-s" in rid_base else 0
        out = []
        for j in range(j0, j0 + n):
            ids = self.tok(str(p + j), add_special_tokens=False)["input_ids"][done:]
            fr = "stop"
            if p == 12 and done == 0:
                ids, fr = ids[:1], "abort"
            out.append({"output_ids": ids, "meta_info": {"weight_version": str(self.version),
                                                        "finish_reason": {"type": fr},
                                                        "output_token_logprobs": [[0.0, t] for t in ids]}})
        await asyncio.sleep(0)
        return (out if batch else out[0]), rid_base + ".0", "http://fake"


def test_eval_metrics_accuracy_and_pass_at_k():
    m = eval_metrics([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    assert m["eval/accuracy"] == pytest.approx(5 / 12)
    assert m["eval/pass@3"] == pytest.approx(3 / 4)
    assert "eval/pass@1" not in eval_metrics([[1.0], [0.0]]) and eval_metrics([[1.0], [0.0]])["eval/accuracy"] == 0.5


@pytest.mark.parametrize("n", [1, 3])
def test_evaluate_scores_with_the_task_and_leaves_the_controller_alone(n):
    tok = tokenizer()
    prompts = toy_prompts(30)
    task = toy_task()  # reward 1 iff the response contains the record's sum
    fleet = _FakeFleet(tok, version=5)
    ctl = Controller(fleet, prompts, task, tok, ControllerConfig(n_samples=4, batch_groups=2, seed=3))
    before = (ctl.state_dict(), dict(ctl.counters), ctl.served_version, ctl.trainer_version, list(ctl.ready))
    cfg = EvalConfig(n_samples=n, temperature=0.0 if n == 1 else 1.0, max_new_tokens=8)
    # as RolloutManager.start_eval runs it: on the controller's own fleet, task, tokenizer and reward workers
    try:
        res = asyncio.run(evaluate(ctl.fleet, prompts[5:15], ctl.task, ctl.tokenizer, cfg, version=5,
                                   scorer=ctl.workflow.scorer))
    finally:
        ctl.workflow.close()  # the controller's reward workers, which the evaluation started
    # the training controller saw nothing: cursor, counters, versions, ready groups
    assert (ctl.state_dict(), dict(ctl.counters), ctl.served_version, ctl.trainer_version, list(ctl.ready)) == before
    assert len(res.samples) == 10 * n and res.metrics["eval/mixed_version_samples"] == 0
    # recomputed from the samples, independently of evaluate(): the answer is the prompt index (+ j)
    by_prompt = {}
    for s in res.samples:
        ok = float(prompts[s["prompt_index"]].record["sum"] in s["text"])
        assert s["reward"] == ok
        by_prompt.setdefault(s["prompt_index"], []).append(ok)
    acc = sum(sum(v) for v in by_prompt.values()) / (10 * n)
    assert res.metrics["eval/accuracy"] == pytest.approx(acc)
    if n > 1:
        assert res.metrics[f"eval/pass@{n}"] == pytest.approx(sum(any(v) for v in by_prompt.values()) / 10)
    assert not math.isnan(acc)
    assert any("-p12-s0-c1" in rid for rid in fleet.calls)  # the aborted request was continued
    assert [s["response_ids"] for s in res.samples if s["prompt_index"] == 12][0] == \
        tok("12", add_special_tokens=False)["input_ids"]
    assert 0 < acc < 1
