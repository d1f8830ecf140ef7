"""Replay of a recorded schedule (schedule.py; docs/algorithm.md, "Record and replay").

``ReplayController`` replaces the controller's timing-driven parts by the schedule: it admits the
schedule's groups (its group ids and prompts, in its order) as soon as the weight version their first
request needs is served; ``ReplayWorkflow`` generates every segment of every sample at the versions the
schedule names, cut where the schedule says it was interrupted, with the sampling seed of the same
(group, sample, segment); ``get_batch`` hands the trainer exactly the groups the schedule's step trained.
The engines (CPU engine, ``--enable-deterministic-inference --keep-weight-versions K``, engine/replay.py)
keep the versions the bound allows and serve each request at the versions it names, so nothing depends
on when a weight update lands.

Same mode as the recorded run: the same samples, hence bit-identical step records. Another mode: the
same groups, prompts, token versions, cut points and seeds (common random numbers); a sample may end
earlier (its later segments are then skipped) or later (its last segment runs to the end, at that
segment's last version) than the recorded one.
"""

from __future__ import annotations

import asyncio
import logging
import time

from megatron_a3po.rollout.controller import Controller
from megatron_a3po.rollout.schedule import Schedule
from megatron_a3po.rollout.types import Batch, Sample
from megatron_a3po.rollout.workflow import GroupWorkflow, RolloutError, token_versions

log = logging.getLogger("megatron_a3po.rollout.replay")

__all__ = ["ReplayController", "ReplayWorkflow"]

_MAX_REISSUES = 20  # an aborted segment is generated again from the start (same input, version and seed)


class ReplayWorkflow(GroupWorkflow):
    """A group's requests as the schedule recorded them (see the module docstring)."""

    plan: dict = {}  # gid -> GroupPlan (set by the controller)

    async def wait_version(self, v: int) -> None:  # set by the controller
        raise NotImplementedError

    @staticmethod
    def _pinned(spans: list, cut: int | None) -> dict:
        entry = {"versions": [[str(v), n] for v, n in spans]}
        if cut is not None:
            entry["max_new_tokens"] = cut
        return entry

    async def _generate(self, body: dict, rid: str, versions: list[int]):
        """One request, after its versions are served; generated again from the start if aborted."""
        if versions:
            await self.wait_version(max(versions))
        for _ in range(_MAX_REISSUES):
            await self.gate()
            resp, rid_out, _url = await self.fleet.generate(body, rid_base=rid)
            resps = resp if isinstance(resp, list) else [resp]
            if all((r["meta_info"].get("finish_reason") or {}).get("type") != "abort" for r in resps):
                return resps
            self.counters["replay_segments_reissued"] += 1
        raise RolloutError(f"replay request {rid}: aborted {_MAX_REISSUES} times")

    async def run(self, gid: int, prompt) -> list[Sample]:
        plan = self.plan[gid]
        if plan.prompt_index != prompt.index:
            raise RolloutError(f"replay: group {gid} is prompt {plan.prompt_index} in the schedule, got {prompt.index}")
        # segment 0: the group's request, all n samples at once (the seed of (gid, group, 0))
        body = self.request(gid, prompt, [], -1, 0, n=self.n)
        entries, vs = [], []
        for sp in plan.samples:
            if sp.segments and sp.segments[0][0] == 0 and sp.tokens(0):
                spans = sp.segments[0][1]
                entries.append(self._pinned(spans, sp.tokens(0) if len(sp.segments) > 1 else None))
                vs += [v for v, n in spans if n]
            else:  # no tokens from this request in the recorded run (interrupted at once, or thrown away)
                entries.append({"versions": [], "max_new_tokens": 0})
        body["replay"] = {"samples": entries}
        first = await self._generate(body, self.rid(gid, -1, 0), vs)
        if len(first) != self.n:
            raise RolloutError(f"replay request of group {gid}: asked for n={self.n} samples, got {len(first)}")
        samples = list(await asyncio.gather(*(self._sample(gid, prompt, j, plan.samples[j], first[j])
                                              for j in range(self.n))))
        await self.score(samples, prompt)
        return samples

    async def _sample(self, gid: int, prompt, j: int, sp, first: dict) -> Sample:
        out: list[int] = []
        lps: list[float] = []
        vers: list[int] = []
        segs: list[tuple[int, int]] = []
        fr = None
        todo = list(sp.segments)
        if todo and todo[0][0] == 0:
            todo.pop(0)
            fr = self._take(first, out, lps, vers, segs, 0)
        for k, (idx, spans) in enumerate(todo):
            if fr == "stop" or len(out) >= self.max_new_tokens:
                break  # this sample ended earlier than the recorded one (another mode)
            n = sum(c for _, c in spans)
            if n == 0:
                continue  # interrupted before it produced a token: nothing to generate
            last = k == len(todo) - 1
            body = self.request(gid, prompt, out, j, idx)
            body["replay"] = {"samples": [self._pinned(spans, None if last else n)]}
            resp = (await self._generate(body, self.rid(gid, j, idx), [v for v, c in spans if c]))[0]
            fr = self._take(resp, out, lps, vers, segs, idx)
        return Sample(group_id=gid, prompt_index=prompt.index, sample_index=j, prompt_ids=list(prompt.prompt_ids),
                      response_ids=out, behave_logprobs=lps, versions=vers,
                      finish_reason="stop" if fr == "stop" else "length", segments=segs)

    def _take(self, resp: dict, out, lps, vers, segs, idx: int) -> str:
        meta = resp["meta_info"]
        toks = list(resp.get("output_ids") or [])
        lp = meta.get("output_token_logprobs") or []
        if len(lp) != len(toks) or any(int(e[1]) != t for e, t in zip(lp, toks)):
            raise RolloutError("replay: output_token_logprobs do not match output_ids")
        out += toks
        lps += [float(e[0]) for e in lp]
        vers += token_versions(meta, len(toks))
        segs.append((idx, len(toks)))
        self.gen_tokens += len(toks)
        return (meta.get("finish_reason") or {}).get("type")


class ReplayController(Controller):
    """The controller, with admission, generation and batches taken from a schedule (module docstring)."""

    workflow_class = ReplayWorkflow

    def __init__(self, fleet, prompts, task, tokenizer, cfg, *, schedule: Schedule, transport=None,
                 initial_version: int = 0, fleet_synced: bool = True):
        h = schedule.header
        if (h["n_samples"], h["max_new_tokens"], h["sampling_seed"]) != (cfg.n_samples, cfg.max_new_tokens,
                                                                          cfg.sampling_seed):
            raise RolloutError(
                f"replay.schedule={schedule.path}: recorded with n_samples={h['n_samples']}, max_new_tokens="
                f"{h['max_new_tokens']}, sampling seed {h['sampling_seed']}; this run has {cfg.n_samples}, "
                f"{cfg.max_new_tokens}, {cfg.sampling_seed} (trainer.seed)")
        bad = [g.prompt_index for g in schedule.groups.values() if not 0 <= g.prompt_index < len(prompts)]
        if bad:
            raise RolloutError(f"replay.schedule={schedule.path}: prompt index {bad[0]} is not in this run's "
                               f"{len(prompts)} prompts (another data set or seed?)")
        super().__init__(fleet, prompts, task, tokenizer, cfg, transport=transport, initial_version=initial_version,
                         fleet_synced=fleet_synced)
        self.schedule = schedule
        self.workflow.plan = schedule.groups
        self.workflow.wait_version = self._wait_version
        self._queue = [(g.gid, g.prompt_index) for _, gs in schedule.steps for g in gs]
        self._next = 0
        self._step = 0
        self._done: dict[int, list[Sample]] = {}
        self._served_ev: asyncio.Event | None = None

    async def start(self):
        self._served_ev = asyncio.Event()
        await super().start()

    def set_max_staleness(self, n: int) -> int:
        return self.cfg.max_staleness  # the schedule fixes every token's version

    async def _wait_version(self, v: int) -> None:
        keep = self.schedule.header["max_staleness"] + 1
        while self.served_version < v:
            self._served_ev.clear()
            await self._served_ev.wait()
        if v <= self.served_version - keep:
            raise RolloutError(f"replay: version {v} is needed after version {self.served_version} was pushed; "
                               f"the engines keep {keep} (the schedule's max_staleness + 1)")

    async def update_weights(self, version: int, **payload):
        await super().update_weights(version, **payload)
        self._served_ev.set()

    async def _admit_loop(self):
        groups = self.schedule.groups
        while not self._stopping:
            while (self._next < len(self._queue) and len(self.inflight) < self.cfg.max_inflight_groups
                   and not (self.sync.broken or self._fatal)):
                gid, idx = self._queue[self._next]
                if groups[gid].first_version() > self.served_version:
                    break
                self._next += 1
                self.counters["groups_admitted"] += 1
                self.inflight[gid] = (idx, asyncio.create_task(self._run_group(gid, idx)))
            await self._wait_tick(0.5)

    async def _run_group(self, gid: int, idx: int):
        try:
            self._done[gid] = await self.workflow.run(gid, self.prompts[idx])
            self.counters["groups_completed"] += 1
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a replay cannot regenerate a group differently: stop
            if self._fatal is None:
                log.error("replay of group %d failed: %s", gid, e)
            self._fail(e)
        finally:
            self.inflight.pop(gid, None)
            self._tick()

    async def get_batch(self, num_groups: int, current_version: int, timeout: float | None = None) -> Batch:
        if self._step >= len(self.schedule.steps):
            raise RolloutError(f"replay.schedule={self.schedule.path} has {len(self.schedule.steps)} steps; "
                               "the run asks for more (trainer.steps)")
        V, plans = self.schedule.steps[self._step]
        if V != current_version or len(plans) != num_groups:
            raise RolloutError(f"replay: step {self._step + 1} of the schedule trained version {V} with {len(plans)} "
                               f"groups; the trainer asks for version {current_version} with {num_groups}")
        self.set_version(current_version)
        deadline = None if timeout is None else time.monotonic() + timeout
        t0 = time.monotonic()
        while not all(g.gid in self._done for g in plans):
            if self._fatal:
                raise RolloutError(f"rollout failed: {self._fatal}") from self._fatal
            if self.sync.broken:
                raise self.sync.broken
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"replay get_batch (step {self._step + 1}) timed out after {timeout}s")
            await self._wait_tick(min(0.5, remaining) if remaining is not None else 0.5)
        self._step += 1
        return self._deliver([self._done.pop(g.gid) for g in plans], current_version, t0)
