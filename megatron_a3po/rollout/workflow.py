"""One prompt group's work, from request to scored samples: the per-group workflow the controller runs
for every group it admits.

1. Request: ONE ``/generate`` for the whole group (n times fewer requests, which is what bounds throughput
   when responses are short): a batch of the prompt n times with one rid, so SGLang names the samples
   ``<rid>_<i>`` (``meta_info.id``) and each can be aborted by its rid (SGLang's ``n > 1`` gives them
   fresh uuids that no abort can name). One ``sampling_params`` object for the batch (sglang-router 0.3.2
   rejects a list with 422); seeded, the CPU engine gives item i the seed ``s * 1000003 + i``.
2. Collect: each sample's tokens, behaviour log-probs and per-token versions. A sample that a weight
   update aborted comes back with its partial output and is resubmitted alone as prompt + partial, with
   ``max_new_tokens`` reduced; its new tokens carry the new version. Where the controller's staleness
   rule says a partial sample can no longer be used, it starts over.
3. Score: rewards in worker processes, each response killed at ``reward_timeout_s`` (rewards.py; a
   failing or timed-out reward is 0 and counted), then the group's advantages (``adv_norm``, ``adv_eps``; see types.group_advantages).

The workflow decides nothing about admission or staleness: ``gate`` (wait until requests may be sent)
and ``too_stale`` (may a partial with these token versions still be delivered?) are the controller's.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable

from megatron_a3po.rollout.fleet import Fleet
from megatron_a3po.rollout.rewards import RewardScorer
from megatron_a3po.rollout.types import Sample, group_advantages
from megatron_a3po.errors import RunFailure

log = logging.getLogger("megatron_a3po.rollout.workflow")


class RolloutError(RunFailure, RuntimeError):
    pass


class ForeignVersion(RolloutError):
    """A response carries a weight version that is not an integer (a server never pushed to reports
    "default"): weights this trainer did not produce."""


def token_versions(meta: dict, n: int) -> list[int]:
    """Per-output-token integer versions from a /generate meta_info (spans, else weight_version)."""
    spans = meta.get("weight_versions") or []
    if spans:
        out: list[int | None] = [None] * n
        for sp in spans:
            v = _int_version(sp["version"])
            for i in range(int(sp["start"]), int(sp["end"])):
                if not 0 <= i < n:
                    raise RolloutError(f"weight_versions span {sp} outside the {n} output tokens")
                out[i] = v
        if any(v is None for v in out):
            raise RolloutError(f"weight_versions spans {spans} do not cover all {n} output tokens")
        return out  # type: ignore[return-value]
    v = meta.get("weight_version")
    if v is None:
        raise RolloutError("response has neither weight_versions nor weight_version in meta_info")
    return [_int_version(v)] * n


def _int_version(v) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ForeignVersion(f"weight version {v!r} is not an integer: start engines with --weight-version N "
                             "and update them with integer versions") from None


def train_rid(gid: int, j: int, seg: int) -> str:
    """g<group> (the group request, all n samples) or g<group>-s<sample>-p<segment> (a resumed sample)."""
    return f"g{gid}" if j < 0 else f"g{gid}-s{j}-p{seg}"


class GroupWorkflow:
    def __init__(self, fleet: Fleet, task, tokenizer, *, n_samples: int, max_new_tokens: int, sampling: dict,
                 sampling_seed: int | None, reward_timeout_s: float, adv_norm: str, adv_eps: float,
                 counters: Counter, gate: Callable[[], Awaitable[None]], too_stale: Callable[[list[int]], bool],
                 rid: Callable[[int, int, int], str] | None = None,
                 reward_shaping: Callable[[list[Sample], list[float]], list[float]] | None = None,
                 scorer: RewardScorer | None = None, known_version: Callable[[int], bool] | None = None):
        self.fleet, self.task, self.tokenizer = fleet, task, tokenizer
        self.n, self.max_new_tokens = n_samples, max_new_tokens
        self.sampling = sampling  # temperature, top_p, top_k and any extra sampling keys
        self.sampling_seed = sampling_seed
        self.reward_timeout_s, self.adv_norm, self.adv_eps = reward_timeout_s, adv_norm, adv_eps
        self.counters, self.gate, self.too_stale = counters, gate, too_stale
        self.rid = rid or train_rid  # the request id base of (group, sample or -1 for the group, segment)
        self.reward_shaping = reward_shaping  # e.g. the overlong penalty (filters.py), before the advantages
        # whether a weight version is one the trainer produced (pushed, or the fleet started with): tokens
        # of any other version are never used (the sample starts over)
        self.known_version = known_version or (lambda v: True)
        self.gen_tokens = 0
        # rewards run in worker processes killed at reward_timeout_s (rewards.py); shared when given
        self._own_scorer = scorer is None
        self.scorer = scorer or RewardScorer(task, timeout_s=reward_timeout_s)
        for k in ("reward_timeouts", "reward_errors"):  # reported from the first step on, 0 or not
            self.counters[k] += 0

    async def run(self, gid: int, prompt) -> list[Sample]:
        first = await self.group_request(gid, prompt)
        samples = list(await asyncio.gather(*(self.collect(gid, prompt, j, first=first[j]) for j in range(self.n))))
        await self.score(samples, prompt)
        return samples

    # ---- 1. request
    def request(self, gid: int, prompt, partial: list[int], j: int, seg: int, n: int = 1) -> dict:
        """The /generate body for sample ``j`` at segment ``seg``, continuing ``partial``; ``j = -1``: the
        whole group, a batch of ``n`` copies of the prompt with one sampling_params object."""
        sp = {"max_new_tokens": self.max_new_tokens - len(partial), **self.sampling}
        if self.sampling_seed is not None:
            sp["sampling_seed"] = self.request_seed(gid, j + 1, seg)
        if j < 0:
            return {"input_ids": [list(prompt.prompt_ids)] * n, "sampling_params": sp, "return_logprob": True}
        return {"input_ids": list(prompt.prompt_ids) + partial, "sampling_params": sp, "return_logprob": True}

    def request_seed(self, gid: int, j: int, seg: int) -> int:
        """The sampling_seed of a request: a 31-bit hash of (run seed, group id, sample j + 1 or 0 for the
        group request, segment), the same in every run with this seed whatever the timing."""
        return zlib.crc32(f"{self.sampling_seed}/{gid}/{j}/{seg}".encode()) & 0x7FFFFFFF

    async def group_request(self, gid: int, prompt) -> list[tuple[dict, str]]:
        """All n samples of a group in one /generate (a batch). Returns (response, engine rid) per sample."""
        await self.gate()
        resp, rid, _url = await self.fleet.generate(self.request(gid, prompt, [], -1, 0, n=self.n),
                                                    rid_base=self.rid(gid, -1, 0))
        resps = resp if isinstance(resp, list) else [resp]
        if len(resps) != self.n:
            raise RolloutError(f"request {rid}: asked for n={self.n} samples, got {len(resps)}")
        # each sample has its own rid (meta_info.id): <rid>_<i>
        return [(r, str((r.get("meta_info") or {}).get("id") or rid)) for r in resps]

    # ---- 2. collect
    async def collect(self, gid: int, prompt, j: int, first: tuple[dict, str] | None = None) -> Sample:
        """Collect one sample; ``first`` is its part of the group request, later segments (after an
        abort) are resubmitted alone as prompt + partial output."""
        out: list[int] = []
        lps: list[float] = []
        vers: list[int] = []
        rids: list[str] = []
        segs: list[tuple[int, int]] = []
        seg = idle_aborts = foreign = 0
        while True:
            if first is not None:
                (resp, rid), first = first, None
            else:
                await self.gate()
                resp, rid, _url = await self.fleet.generate(self.request(gid, prompt, out, j, seg),
                                                            rid_base=self.rid(gid, j, seg))
            seg += 1
            meta = resp["meta_info"]
            toks = list(resp.get("output_ids") or [])
            lp_entries = meta.get("output_token_logprobs") or []
            if len(lp_entries) != len(toks) or any(int(e[1]) != t for e, t in zip(lp_entries, toks)):
                raise RolloutError(f"request {rid}: output_token_logprobs do not match output_ids")
            try:
                new_vers = token_versions(meta, len(toks))
            except ForeignVersion:
                new_vers = None
            if new_vers is None or not all(self.known_version(v) for v in new_vers):
                # weights this trainer did not produce (a server it has not synced, another run's version):
                # never trained on; the sample starts over
                self.counters["samples_dropped_foreign_version"] += 1
                foreign += 1
                log.warning("request %s: weight versions %s were not produced by this trainer; sample %d of "
                            "group %d starts over", rid, meta.get("weight_versions") or meta.get("weight_version"),
                            j, gid)
                if foreign > 20:
                    raise RuntimeError(f"request {rid}: the fleet keeps answering with weight versions this "
                                       f"trainer did not produce ({meta.get('weight_version')!r})")
                out, lps, vers, rids, segs = [], [], [], [], []
                await asyncio.sleep(min(0.1 * foreign, 2.0))
                continue
            out += toks
            lps += [float(e[0]) for e in lp_entries]
            vers += new_vers
            rids.append(rid)
            segs.append((seg - 1, len(toks)))
            self.gen_tokens += len(toks)
            fr = (meta.get("finish_reason") or {}).get("type")
            if fr == "abort":
                self.counters["requests_aborted_resumed"] += 1
                idle_aborts = 0 if toks else idle_aborts + 1
                if idle_aborts > 20:  # the server keeps aborting without progress: give the group up
                    raise RuntimeError(f"request {rid} aborted {idle_aborts} times without progress: "
                                       f"{meta.get('finish_reason')}")
                if out and self.too_stale(vers):  # it could never be delivered: start over
                    self.counters["samples_restarted_stale"] += 1
                    out, lps, vers, rids, segs = [], [], [], [], []
                if len(out) < self.max_new_tokens:
                    continue
                fr = "length"
            if fr not in ("stop", "length"):
                raise RolloutError(f"request {rid}: unexpected finish_reason {meta.get('finish_reason')!r}")
            return Sample(group_id=gid, prompt_index=prompt.index, sample_index=j, prompt_ids=list(prompt.prompt_ids),
                          response_ids=out, behave_logprobs=lps, versions=vers, finish_reason=fr, rids=rids,
                          segments=segs)

    # ---- 3. score
    async def score(self, samples: list[Sample], prompt) -> None:
        for s in samples:
            s.text = self.tokenizer.decode(s.response_ids, skip_special_tokens=True) if self.tokenizer else ""
        rewards = await self.scorer.score([s.text for s in samples], prompt.record, self.counters)
        if self.reward_shaping is not None:
            rewards = self.reward_shaping(samples, rewards)
        for s, r, a in zip(samples, rewards, group_advantages(rewards, self.adv_norm, self.adv_eps)):
            s.reward, s.advantage = r, a

    def close(self) -> None:
        """Stop the reward workers if this workflow started them (not a scorer it was given)."""
        if self._own_scorer:
            self.scorer.close()
