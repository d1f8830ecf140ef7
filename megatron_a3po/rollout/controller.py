"""Asynchronous rollout controller (asyncio): admits prompt groups to the fleet under the staleness
bound, hands the trainer batches that respect it, and applies weight updates safely.

Versions. The trainer's version ``k`` is the number of optimizer steps behind its current weights; the
engines serve version ``served_version`` (what the last successful ``update_weights`` pushed). Every
output token carries the version that sampled it (``meta_info.weight_versions`` spans, else
``meta_info.weight_version``). A batch requested at trainer version ``k`` may only contain samples whose
oldest token has version ``>= k - max_staleness``.

Staleness control, two layers:

1. Admission. A new group is started only while the version it is predicted to be consumed at is at
   most ``max_staleness`` ahead of the served version: with ``ahead`` groups already in flight or
   waiting, and ``c0`` the trainer version of the next batch, the group lands in batch
   ``c0 + ahead // batch_groups``; admit iff that minus ``served_version`` <= ``max_staleness`` (and
   fewer than ``max_inflight_groups`` groups are generating).
2. Final filter. ``get_batch(n, k)`` drops any ready group with a sample whose oldest token is more
   than ``max_staleness`` behind ``k`` (counted in ``groups_dropped_stale``); its prompt is re-queued
   and regenerated, so no prompt is lost. A request aborted by a weight update whose partial output is
   already too old to ever be used is restarted from scratch (``samples_restarted_stale``).

Weight updates (``update_weights``) belong to ``WeightSync`` (sync.py, ``self.sync``): close the gate,
``/pause_generation`` on every server with ``pause_mode`` ("abort": in-flight requests come back with
their partial output; "in_place": they wait), push the weights with the transport to every server (each
call retried), check every server reports the new version, then ``/continue_generation`` everywhere and
reopen the gate. Aborted requests are resubmitted as prompt + partial output with ``max_new_tokens``
reduced; their new tokens carry the new version. If the push fails on any server after retries, every
server stays paused (none serves mixed weights) and ``WeightUpdateError`` is raised (also from later
``get_batch`` calls) until an ``update_weights`` succeeds. A streaming push given as a callable (a fresh
export per call) is the exception: servers that die or hang during it leave the fleet and the others get
the weights again from a new export (``WeightSync._push``).

The controller keeps admission and the staleness bound; it reads the served version and the gate from
``self.sync``. Its two helpers: the prompt cursor (cursor.py: which prompt comes next, in a seeded
per-epoch order, prompts given back first) and the per-group workflow (workflow.py: one /generate with
SGLang's ``n`` per group, aborted samples resumed as prompt + partial, rewards and group advantages).
With ``adv_batch_norm`` the advantages are normalised once more over each delivered batch, here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from megatron_a3po.rollout.cursor import PromptCursor
from megatron_a3po.rollout.filters import DynamicSampler, shape_rewards
from megatron_a3po.rollout.fleet import BadRequestError, Fleet, NoServersError
from megatron_a3po.rollout.sync import WeightSync, WeightUpdateError
from megatron_a3po.rollout.types import ADV_EPS, Batch, Sample, batch_normalise
from megatron_a3po.rollout.workflow import GroupWorkflow, RolloutError, token_versions

__all__ = ["Controller", "ControllerConfig", "RolloutError", "WeightUpdateError", "token_versions"]

log = logging.getLogger("megatron_a3po.rollout.controller")


@dataclass
class ControllerConfig:
    n_samples: int = 4
    max_inflight_groups: int = 64
    batch_groups: int = 8  # groups per trainer batch (the admission unit)
    max_staleness: int = 4
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    extra_sampling: dict = field(default_factory=dict)  # e.g. {"stop_token_ids": [...]}
    shuffle: bool = True
    seed: int = 0
    # not None: every request carries a ``sampling_seed`` derived from (this, group id, sample, segment),
    # so what a sample draws does not depend on which other requests the engine batches it with (a group
    # request is a batch of n prompts, each with its own seed). trainer/rollout_side.py:controller_config sets it
    # for the CPU backend.
    sampling_seed: int | None = None
    epochs: int | None = None  # None: cycle over the data forever
    reward_timeout_s: float = 30.0
    update_retries: int = 2
    # ordered: batches follow admission order (group ids), so a run and its resume see the same batches;
    # False: first complete, first served (a little less waiting for stragglers, batches not reproducible)
    ordered: bool = True
    # how servers pause for a weight update (sync.py): "abort" (in-flight requests return their partial
    # output and are resubmitted as prompt + partial) or "in_place" (they wait and continue under the new
    # weights; their later tokens carry the new version). Either way no token is generated from mixed weights.
    pause_mode: str = "abort"
    # advantages (recipe loss.adv_norm / adv_eps / adv_batch_norm; see types.group_advantages)
    adv_norm: str = "mean_std"
    adv_eps: float = ADV_EPS
    adv_batch_norm: bool = False
    # dynamic sampling and DAPO's overlong penalty (rollout/filters.py; recipe rollout.dynamic_sampling*,
    # rollout.overlong_*): off by default
    dynamic_sampling: str = "off"
    ds_max_drops: int | None = None
    ds_min_groups: int = 1
    overlong_buffer: int = 0
    overlong_penalty_factor: float = 1.0


class Controller:
    workflow_class = GroupWorkflow  # replay.py replaces it

    def __init__(self, fleet: Fleet, prompts: list, task, tokenizer, cfg: ControllerConfig,
                 transport=None, initial_version: int = 0, fleet_synced: bool = True):
        if not prompts:
            raise ValueError("no prompts to roll out")
        self.fleet, self.prompts, self.task, self.tokenizer, self.cfg = fleet, prompts, task, tokenizer, cfg
        # versions: the trainer's and the newest a batch was consumed at (the served one: ``self.sync``)
        self.trainer_version = initial_version
        self.last_consumed_version = initial_version - 1
        self.counters: Counter = Counter()
        self.timings: Counter = Counter()
        # the served weights, the versions this trainer produced (tokens of any other version are never
        # used) and every weight update: sync.py
        self.sync = WeightSync(fleet, transport, pause_mode=cfg.pause_mode, retries=cfg.update_retries,
                               initial_version=initial_version, fleet_synced=fleet_synced,
                               counters=self.counters, timings=self.timings)
        self.max_staleness_limit = cfg.max_staleness  # the recipe's bound: set_max_staleness never exceeds it
        self.ready: list[list[Sample]] = []
        self.inflight: dict[int, tuple[int, asyncio.Task]] = {}
        self.next_gid = 0
        self.cursor = PromptCursor(len(prompts), shuffle=cfg.shuffle, seed=cfg.seed, epochs=cfg.epochs)
        self.workflow = self.workflow_class(
            fleet, task, tokenizer, n_samples=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
            sampling={"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k, **cfg.extra_sampling},
            sampling_seed=cfg.sampling_seed, reward_timeout_s=cfg.reward_timeout_s, adv_norm=cfg.adv_norm,
            adv_eps=cfg.adv_eps, counters=self.counters, gate=self.sync.gate, too_stale=self._too_stale,
            reward_shaping=self._reward_shaping(), known_version=self.sync.produced.__contains__)
        self.sampler = None if cfg.dynamic_sampling == "off" else DynamicSampler(
            cfg.dynamic_sampling, cfg.batch_groups, max_drops=cfg.ds_max_drops, min_groups=cfg.ds_min_groups,
            counters=self.counters)
        self._fatal: BaseException | None = None
        self._stopping = False
        self.delivered_log: list[tuple[int, int]] = []  # (group_id, prompt_index) for tests/debug
        self._t_start = time.monotonic()

    @property
    def served_version(self) -> int:
        """The version the servers serve (what the last successful update pushed)."""
        return self.sync.served_version

    @served_version.setter
    def served_version(self, v: int):  # tests without engines stand in for an update
        self.sync.served_version = v

    def _fail(self, e: BaseException):
        """The rollout cannot go on (``e``): every later get_batch raises; no server is brought back."""
        self._fatal = self._fatal or e
        self.sync.halt()

    def _reward_shaping(self):
        """The overlong penalty on a group's rewards (rollout/filters.py), or None when off."""
        c = self.cfg
        if c.overlong_buffer <= 0:
            return None
        return partial(shape_rewards, max_new_tokens=c.max_new_tokens, buffer=c.overlong_buffer,
                       factor=c.overlong_penalty_factor, counters=self.counters)

    def state_dict(self) -> dict:
        """Cursor + prompts admitted but not yet handed to the trainer (they are regenerated on load)."""
        # admission order (group id) first, then prompts waiting to be re-admitted: the order in which an
        # uninterrupted run would have delivered them
        admitted = sorted([(gid, idx) for gid, (idx, _) in self.inflight.items()]
                          + [(g[0].group_id, g[0].prompt_index) for g in self.ready])
        return {**self.cursor.state_dict([idx for _, idx in admitted]), "next_gid": self.next_gid,
                "groups_delivered": self.counters["groups_delivered"]}

    def load_state_dict(self, sd: dict):
        if self.inflight or self.ready:
            raise RuntimeError("load_state_dict must be called before start()")
        self.cursor.load_state_dict(sd)
        self.next_gid = sd["next_gid"]
        # groups in flight or ready at save time are not trusted after a crash: regenerated, and counted
        self.counters["groups_regenerated_on_resume"] = len(sd["pending"])
        self.counters["groups_delivered"] = sd.get("groups_delivered", 0)

    # ---- lifecycle
    async def start(self):
        self._tick_ev = asyncio.Event()
        await self.sync.start()
        self._admit_task = asyncio.create_task(self._admit_loop())

    async def stop(self):
        self._stopping = True
        self._tick()
        tasks = [t for t in [t for _, t in self.inflight.values()] + [self._admit_task] if t is not None]
        self.sync.halt(close_gate=True)  # aborted samples must not be resubmitted: they wait there until cancelled
        if self.inflight:  # end the servers' side first: a cancelled HTTP request can wait on its reply
            try:
                await asyncio.wait_for(self.fleet.call_all("/abort_request", {"abort_all": True}, retries=0,
                                                            timeout=5.0), 6.0)
            except Exception as e:  # noqa: BLE001 - best effort; the cancellation below still runs
                log.debug("abort_all on stop failed: %s", e)
        for t in tasks:
            t.cancel()
        if tasks:  # a request stuck inside the HTTP client must not hang the shutdown of a finished run
            _, pending = await asyncio.wait(tasks, timeout=10.0)
            if pending:
                where = "; ".join(_where(t) for t in list(pending)[:3])
                log.warning("%d rollout task(s) did not stop within 10 s of being cancelled; abandoned (%s)",
                            len(pending), where)
        await self.sync.close()

    def _tick(self):
        self._tick_ev.set()

    async def _wait_tick(self, timeout: float | None):
        self._tick_ev.clear()
        try:
            await asyncio.wait_for(self._tick_ev.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    # ---- admission
    def _can_admit(self) -> bool:
        if self._stopping or self.sync.broken or self._fatal or not self.sync.open.is_set():
            return False
        if len(self.inflight) >= self.cfg.max_inflight_groups:
            return False
        ahead = len(self.inflight) + len(self.ready)
        c0 = max(self.trainer_version, self.last_consumed_version + 1)
        return c0 + ahead // self.cfg.batch_groups - self.served_version <= self.cfg.max_staleness

    async def _admit_loop(self):
        while not self._stopping:
            while self._can_admit():
                idx = self.cursor.next()
                if idx is None:
                    break
                gid = self.next_gid
                self.next_gid += 1
                self.counters["groups_admitted"] += 1
                self.inflight[gid] = (idx, asyncio.create_task(self._run_group(gid, idx)))
            await self._wait_tick(0.5)

    # ---- generation (the per-group workflow, workflow.py), under the weight sync's gate and the bound
    def _too_stale(self, versions: list[int]) -> bool:
        """Whether a sample holding tokens of these versions is past the bound at the earliest trainer
        version it could be consumed at (then it could never be delivered)."""
        c0 = max(self.trainer_version, self.last_consumed_version + 1)
        return c0 - min(versions) > self.cfg.max_staleness

    async def _run_group(self, gid: int, idx: int):
        prompt = self.prompts[idx]
        try:
            samples = await self.workflow.run(gid, prompt)
            # not before the await: get_batch rebinds self.ready meanwhile. A group with all-equal rewards
            # is dropped here under dynamic sampling (admission then starts another one)
            if self.sampler is None or self.sampler.keep(samples):
                self.ready.append(samples)
            self.counters["groups_completed"] += 1
        except asyncio.CancelledError:
            raise
        except (NoServersError, BadRequestError, RolloutError) as e:
            if self._fatal is None:  # every in-flight group fails with it: say it once
                log.error("rollout stopped: %s", e)
            self._fail(e)
            self.cursor.give_back(idx, first=True)
        except Exception as e:  # any other failure: retry the prompt
            self.counters["groups_failed"] += 1
            self.cursor.give_back(idx)
            log.exception("group %d (prompt %d) failed, re-queued: %s", gid, idx, e)
        finally:
            self.inflight.pop(gid, None)
            self._tick()

    # ---- trainer side
    def set_max_staleness(self, n: int) -> int:
        """Move the admission bound (rollout/staleness.py decides), clamped to [0, the configured bound];
        returns the bound in force. Ready groups past a lowered bound are dropped at the next get_batch."""
        self.cfg.max_staleness = max(0, min(int(n), self.max_staleness_limit))
        self._tick()
        return self.cfg.max_staleness

    def set_version(self, version: int):
        if version > self.trainer_version:
            self.trainer_version = version
            self._tick()

    def _filter_stale(self, version: int):
        keep = []
        for g in self.ready:
            if any(s.staleness(version) > self.cfg.max_staleness for s in g):
                self.counters["groups_dropped_stale"] += 1
                self.counters["samples_dropped_stale"] += len(g)
                self.cursor.give_back(g[0].prompt_index)
            else:
                keep.append(g)
        if len(keep) != len(self.ready):
            self.ready = keep
            self._tick()

    def _take_ready(self, n: int):
        """The next ``n`` complete groups, or None. Ordered mode: the ``n`` oldest admitted groups, and
        only once no older group is still in flight."""
        if len(self.ready) < n:
            return None
        if self.cfg.ordered:
            self.ready.sort(key=lambda g: g[0].group_id)
            newest = self.ready[n - 1][0].group_id
            if any(gid < newest for gid in self.inflight):
                return None
        groups, self.ready = self.ready[:n], self.ready[n:]
        return groups

    async def get_batch(self, num_groups: int, current_version: int, timeout: float | None = None) -> Batch:
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.set_version(current_version)
        deadline = None if timeout is None else time.monotonic() + timeout
        t0 = time.monotonic()
        while True:
            if self._fatal:
                raise RolloutError(f"rollout failed: {self._fatal}") from self._fatal
            if self.sync.broken:
                raise self.sync.broken
            self._filter_stale(current_version)
            groups = self._take_ready(num_groups if self.sampler is None else self.sampler.groups_needed(num_groups))
            if groups is not None:
                if self.sampler is not None:
                    self.sampler.delivered()
                for g in groups:
                    assert all(s.staleness(current_version) <= self.cfg.max_staleness for s in g)
                return self._deliver(groups, current_version, t0)
            if not self.inflight and self.cursor.exhausted():
                raise RolloutError(f"data exhausted: {len(self.ready)} groups ready, {num_groups} requested")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"get_batch({num_groups}) timed out after {timeout}s: {len(self.ready)} ready, "
                                   f"{len(self.inflight)} in flight, trainer v{self.trainer_version}, served "
                                   f"v{self.served_version}, fleet {self.fleet.snapshot()['servers']}")
            await self._wait_tick(min(0.5, remaining) if remaining is not None else 0.5)

    def _deliver(self, groups: list[list[Sample]], current_version: int, t0: float) -> Batch:
        """Hand ``groups`` to the trainer as the batch of ``current_version`` (``t0``: when it was asked for)."""
        for g in groups:
            self.delivered_log.append((g[0].group_id, g[0].prompt_index))
        self.counters["groups_delivered"] += len(groups)
        if self.cfg.adv_batch_norm:
            ss = [s for g in groups for s in g]
            for s, a in zip(ss, batch_normalise([s.advantage for s in ss],
                                                [len(s.response_ids) for s in ss], self.cfg.adv_eps)):
                s.advantage = a
        self.last_consumed_version = max(self.last_consumed_version, current_version)
        self.timings["last_wait_s"] = time.monotonic() - t0
        self.timings["wait_s"] += self.timings["last_wait_s"]
        self._tick()
        return Batch(groups=groups, version=current_version)

    async def update_weights(self, version: int, **payload):
        """Pause (``pause_mode``) -> push via the transport -> verify -> continue, on every server
        (``WeightSync.update``); then generation is tagged with ``version``."""
        try:
            await self.sync.update(version, payload)
        except NoServersError as e:  # e.g. the last engines died during this update
            self._fail(e)
            raise RolloutError(f"rollout failed: {e}") from e
        finally:
            self._tick()
        self.set_version(version)

    def metrics(self) -> dict[str, Any]:
        el = max(time.monotonic() - self._t_start, 1e-9)
        m = {f"rollout/{k}": v for k, v in self.counters.items()}
        m.update({f"rollout/{k}": v for k, v in self.fleet.counters.items()})
        m.update({
            "rollout/groups_ready": len(self.ready), "rollout/groups_inflight": len(self.inflight),
            "rollout/trainer_version": self.trainer_version, "rollout/served_version": self.served_version,
            "rollout/servers_live": len(self.fleet.live()), "rollout/gen_tokens": self.workflow.gen_tokens,
            "rollout/gen_tokens_per_s": self.workflow.gen_tokens / el,
            "rollout/wait_s_total": self.timings["wait_s"], "rollout/weight_sync_s_total": self.timings["weight_sync_s"],
            # the last get_batch wait and weight sync (metrics.TIME_WAIT / metrics.TIME_SYNC for this step)
            "rollout/last_wait_s": self.timings["last_wait_s"],
            "rollout/last_weight_sync_s": self.timings["last_weight_sync_s"],
        })
        if self.sampler is not None:  # dynamic sampling's extra generation: dropped groups' share of all tokens
            m["rollout/ds_extra_gen_frac"] = self.counters["ds_tokens_dropped"] / max(1, self.workflow.gen_tokens)
        return m


def _where(task: asyncio.Task) -> str:
    """The chain of coroutines a task is suspended in, with line numbers (for a shutdown that hangs)."""
    parts, c = [], task.get_coro()
    while c is not None and len(parts) < 12:
        f = getattr(c, "cr_frame", None) or getattr(c, "gi_frame", None)
        if f is None:
            parts.append(type(c).__name__)
            break
        parts.append(f"{getattr(c, '__qualname__', type(c).__name__)}:{f.f_lineno}")
        c = getattr(c, "cr_await", None) or getattr(c, "gi_yieldfrom", None)
    return " > ".join(parts)
