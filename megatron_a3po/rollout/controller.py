"""Asynchronous rollout controller (asyncio): keeps prompt groups in flight on the fleet, bounds
staleness, tags token versions, scores and normalises groups, and applies weight updates safely.

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

Weight updates (``update_weights``): close the admission gate, ``/pause_generation {"mode":"abort"}``
on every server (in-flight requests come back with their partial output), push the weights with the
transport to every server (each call retried), check every server reports the new version, then
``/continue_generation`` everywhere and reopen the gate. Aborted requests are resubmitted as
prompt + partial output with ``max_new_tokens`` reduced; their new tokens carry the new version. If the
push fails on any server after retries, every server stays paused (none serves mixed weights) and
``WeightUpdateError`` is raised (also from later ``get_batch`` calls) until an ``update_weights``
succeeds.

Each group is ONE /generate with SGLang's ``n`` (an aborted sample is resumed on its own as prompt + partial);
rewards are computed off the event loop; advantages are GRPO-normalised per group when a group completes
(``adv_norm``, ``adv_eps``; see types.py) and, with ``adv_batch_norm``, once more over each delivered batch.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from megatron_a3po.rollout.fleet import BadRequestError, Fleet, FleetError, NoServersError
from megatron_a3po.rollout.types import ADV_EPS, Batch, Sample, batch_normalise, group_advantages

log = logging.getLogger("megatron_a3po.rollout.controller")


class WeightUpdateError(RuntimeError):
    pass


class RolloutError(RuntimeError):
    pass


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
    # so what a sample draws does not depend on which other requests the engine batches it with. The CPU
    # engine gives sample j of an ``n`` request the seed ``s * 1000003 + j``; SGLang would give all n the
    # same seed (identical samples), so RolloutManager.from_recipe sets this for the CPU backend only.
    sampling_seed: int | None = None
    epochs: int | None = None  # None: cycle over the data forever
    reward_timeout_s: float = 30.0
    update_retries: int = 2
    # ordered: batches follow admission order (group ids), so a run and its resume see the same batches;
    # False: first complete, first served (a little less waiting for stragglers, batches not reproducible)
    ordered: bool = True
    # how servers pause for a weight update: "abort" (in-flight requests return their partial output and
    # are resubmitted as prompt + partial) or "in_place" (they wait and continue under the new weights;
    # their later tokens carry the new version). Either way no token is generated from mixed weights.
    pause_mode: str = "abort"
    # advantages (recipe loss.adv_norm / adv_eps / adv_batch_norm; see types.group_advantages)
    adv_norm: str = "mean_std"
    adv_eps: float = ADV_EPS
    adv_batch_norm: bool = False


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
        raise RolloutError(f"weight version {v!r} is not an integer: start engines with --weight-version N "
                           "and update them with integer versions") from None


class Controller:
    def __init__(self, fleet: Fleet, prompts: list, task, tokenizer, cfg: ControllerConfig,
                 transport=None, initial_version: int = 0):
        if not prompts:
            raise ValueError("no prompts to roll out")
        self.fleet = fleet
        self.prompts = prompts
        self.task = task
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.transport = transport
        self.trainer_version = initial_version
        self.served_version = initial_version
        self.last_consumed_version = initial_version - 1
        self.counters: Counter = Counter()
        self.initial_version = initial_version
        self._last_payload: dict = {}  # the last successful push (hf_dir): resent to a server that rejoins
        if fleet is not None:
            fleet.on_rejoin = self._rejoin
        self.timings: Counter = Counter()
        self.ready: list[list[Sample]] = []
        self.inflight: dict[int, tuple[int, asyncio.Task]] = {}
        self.requeue: deque[int] = deque()
        self.epoch, self.pos, self.next_gid = 0, 0, 0
        self._order = self._epoch_order(0)
        self._broken: WeightUpdateError | None = None
        self._fatal: BaseException | None = None
        self._stopping = False
        self.delivered_log: list[tuple[int, int]] = []  # (group_id, prompt_index) for tests/debug
        self.gen_tokens = 0
        self._t_start = time.monotonic()

    # ---- data cursor
    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.cfg.shuffle:
            random.Random(self.cfg.seed * 100003 + epoch).shuffle(order)
        return order

    def _next_prompt(self) -> int | None:
        if self.requeue:
            return self.requeue.popleft()
        if self.cfg.epochs is not None and self.epoch >= self.cfg.epochs:
            return None
        idx = self._order[self.pos]
        self.pos += 1
        if self.pos == len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        return idx

    def state_dict(self) -> dict:
        """Cursor + prompts admitted but not yet handed to the trainer (they are regenerated on load)."""
        # admission order (group id) first, then prompts waiting to be re-admitted: the order in which an
        # uninterrupted run would have delivered them
        admitted = sorted([(gid, idx) for gid, (idx, _) in self.inflight.items()]
                          + [(g[0].group_id, g[0].prompt_index) for g in self.ready])
        pending = [idx for _, idx in admitted] + list(self.requeue)
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.cfg.seed, "shuffle": self.cfg.shuffle,
                "num_prompts": len(self.prompts), "pending": pending, "next_gid": self.next_gid,
                "groups_delivered": self.counters["groups_delivered"]}

    def load_state_dict(self, sd: dict):
        if sd["num_prompts"] != len(self.prompts):
            raise ValueError(f"rollout state is for a dataset of {sd['num_prompts']} prompts, this one has "
                             f"{len(self.prompts)}")
        if self.inflight or self.ready:
            raise RuntimeError("load_state_dict must be called before start()")
        self.cfg.seed, self.cfg.shuffle = sd["seed"], sd["shuffle"]
        self.epoch, self.pos, self.next_gid = sd["epoch"], sd["pos"], sd["next_gid"]
        self._order = self._epoch_order(self.epoch)
        self.requeue = deque(sd["pending"])
        # groups in flight or ready at save time are not trusted after a crash: regenerated, and counted
        self.counters["groups_regenerated_on_resume"] = len(sd["pending"])
        self.counters["groups_delivered"] = sd.get("groups_delivered", 0)

    # ---- lifecycle
    async def start(self):
        self._tick_ev = asyncio.Event()
        self._open = asyncio.Event()
        self._open.set()
        self._update_lock = asyncio.Lock()
        self._admit_task = asyncio.create_task(self._admit_loop())

    async def stop(self):
        self._stopping = True
        self._tick()
        tasks = [t for t in [t for _, t in self.inflight.values()] + [self._admit_task] if t is not None]
        self._open.clear()  # aborted samples must not be resubmitted: they wait here until cancelled
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
        if self._stopping or self._broken or self._fatal or not self._open.is_set():
            return False
        if len(self.inflight) >= self.cfg.max_inflight_groups:
            return False
        ahead = len(self.inflight) + len(self.ready)
        c0 = max(self.trainer_version, self.last_consumed_version + 1)
        return c0 + ahead // self.cfg.batch_groups - self.served_version <= self.cfg.max_staleness

    async def _admit_loop(self):
        while not self._stopping:
            while self._can_admit():
                idx = self._next_prompt()
                if idx is None:
                    break
                gid = self.next_gid
                self.next_gid += 1
                self.counters["groups_admitted"] += 1
                self.inflight[gid] = (idx, asyncio.create_task(self._run_group(gid, idx)))
            await self._wait_tick(0.5)

    # ---- generation
    async def _run_group(self, gid: int, idx: int):
        prompt = self.prompts[idx]
        try:
            first = await self._group_request(gid, prompt)
            samples = list(await asyncio.gather(*(self._run_sample(gid, prompt, j, first=first[j])
                                                  for j in range(self.cfg.n_samples))))
            await self._score(samples, prompt)
            self.ready.append(samples)
            self.counters["groups_completed"] += 1
        except asyncio.CancelledError:
            raise
        except (NoServersError, BadRequestError, RolloutError) as e:
            if self._fatal is None:  # every in-flight group fails with it: say it once
                log.error("rollout stopped: %s", e)
            self._fatal = self._fatal or e
            self.requeue.appendleft(idx)
        except Exception as e:  # noqa: BLE001 - retry the prompt
            self.counters["groups_failed"] += 1
            self.requeue.append(idx)
            log.exception("group %d (prompt %d) failed, re-queued: %s", gid, idx, e)
        finally:
            self.inflight.pop(gid, None)
            self._tick()

    def _sampling(self, remaining: int) -> dict:
        cfg = self.cfg
        return {"max_new_tokens": remaining, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "top_k": cfg.top_k, **cfg.extra_sampling}

    def _request_seed(self, gid: int, j: int, seg: int) -> int:
        """The sampling_seed of a request: a 31-bit hash of (run seed, group id, sample j + 1 or 0 for the
        group request, segment), the same in every run with this seed whatever the timing."""
        return zlib.crc32(f"{self.cfg.sampling_seed}/{gid}/{j}/{seg}".encode()) & 0x7FFFFFFF

    async def _group_request(self, gid: int, prompt) -> list[tuple[dict, str]]:
        """All n samples of a group in ONE /generate (SGLang's ``n``): n times fewer requests, which is
        what bounds throughput when responses are short. Returns (response, engine rid) per sample."""
        while not self._open.is_set():
            await self._open.wait()
        if self._broken:
            raise self._broken
        n = self.cfg.n_samples
        sp = dict(self._sampling(self.cfg.max_new_tokens), n=n) if n > 1 else self._sampling(self.cfg.max_new_tokens)
        if self.cfg.sampling_seed is not None:
            sp["sampling_seed"] = self._request_seed(gid, 0, 0)
        payload = {"input_ids": list(prompt.prompt_ids), "sampling_params": sp, "return_logprob": True}
        resp, rid, _url = await self.fleet.generate(payload, rid_base=f"g{gid}-n{n}")
        resps = resp if isinstance(resp, list) else [resp]
        if len(resps) != n:
            raise RolloutError(f"request {rid}: asked for n={n} samples, got {len(resps)}")
        # each sample has its own rid (meta_info.id): SGLang gives every one of the n a uuid4
        return [(r, str((r.get("meta_info") or {}).get("id") or rid)) for r in resps]

    async def _run_sample(self, gid: int, prompt, j: int, first: tuple[dict, str] | None = None) -> Sample:
        """Collect one sample; ``first`` is its part of the group request, later segments (after an
        abort) are resubmitted alone as prompt + partial output."""
        cfg = self.cfg
        out: list[int] = []
        lps: list[float] = []
        vers: list[int] = []
        rids: list[str] = []
        seg = idle_aborts = 0
        while True:
            if first is not None:
                (resp, rid), first = first, None
            else:
                while not self._open.is_set():
                    await self._open.wait()
                if self._broken:
                    raise self._broken
                sp = self._sampling(cfg.max_new_tokens - len(out))
                if cfg.sampling_seed is not None:
                    sp["sampling_seed"] = self._request_seed(gid, j + 1, seg)
                payload = {"input_ids": list(prompt.prompt_ids) + out, "sampling_params": sp, "return_logprob": True}
                resp, rid, _url = await self.fleet.generate(payload, rid_base=f"g{gid}-s{j}-p{seg}")
            seg += 1
            meta = resp["meta_info"]
            toks = list(resp.get("output_ids") or [])
            lp_entries = meta.get("output_token_logprobs") or []
            if len(lp_entries) != len(toks) or any(int(e[1]) != t for e, t in zip(lp_entries, toks)):
                raise RolloutError(f"request {rid}: output_token_logprobs do not match output_ids")
            out += toks
            lps += [float(e[0]) for e in lp_entries]
            vers += token_versions(meta, len(toks))
            rids.append(rid)
            self.gen_tokens += len(toks)
            fr = (meta.get("finish_reason") or {}).get("type")
            if fr == "abort":
                self.counters["requests_aborted_resumed"] += 1
                idle_aborts = 0 if toks else idle_aborts + 1
                if idle_aborts > 20:  # the server keeps aborting without progress: give the group up
                    raise RuntimeError(f"request {rid} aborted {idle_aborts} times without progress: "
                                       f"{meta.get('finish_reason')}")
                # the earliest version this sample can be consumed at; past the bound -> start over
                c0 = max(self.trainer_version, self.last_consumed_version + 1)
                if out and c0 - min(vers) > cfg.max_staleness:
                    self.counters["samples_restarted_stale"] += 1
                    out, lps, vers, rids = [], [], [], []
                if len(out) < cfg.max_new_tokens:
                    continue
                fr = "length"
            if fr not in ("stop", "length"):
                raise RolloutError(f"request {rid}: unexpected finish_reason {meta.get('finish_reason')!r}")
            return Sample(group_id=gid, prompt_index=prompt.index, sample_index=j, prompt_ids=list(prompt.prompt_ids),
                          response_ids=out, behave_logprobs=lps, versions=vers, finish_reason=fr, rids=rids)

    async def _score(self, samples: list[Sample], prompt):
        def score_all():
            rs = []
            for s in samples:
                s.text = self.tokenizer.decode(s.response_ids, skip_special_tokens=True) if self.tokenizer else ""
                try:
                    rs.append(float(self.task.reward(s.text, prompt.record)))
                except Exception:  # noqa: BLE001 - a reward bug must not stall the run: 0 and counted
                    log.exception("reward of task %s failed on prompt %d", getattr(self.task, "name", "?"),
                                  prompt.index)
                    self.counters["reward_errors"] += 1
                    rs.append(0.0)
            return rs

        try:
            rewards = await asyncio.wait_for(asyncio.to_thread(score_all), self.cfg.reward_timeout_s)
        except asyncio.TimeoutError:
            self.counters["reward_timeouts"] += 1
            rewards = [0.0] * len(samples)
        for s, r, a in zip(samples, rewards, group_advantages(rewards, self.cfg.adv_norm, self.cfg.adv_eps)):
            s.reward, s.advantage = r, a

    # ---- trainer side
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
                self.requeue.append(g[0].prompt_index)
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
            if self._broken:
                raise self._broken
            self._filter_stale(current_version)
            groups = self._take_ready(num_groups)
            if groups is not None:
                for g in groups:
                    self.delivered_log.append((g[0].group_id, g[0].prompt_index))
                    assert all(s.staleness(current_version) <= self.cfg.max_staleness for s in g)
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
            if not self.inflight and not self.requeue and self.cfg.epochs is not None and self.epoch >= self.cfg.epochs:
                raise RolloutError(f"data exhausted: {len(self.ready)} groups ready, {num_groups} requested")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"get_batch({num_groups}) timed out after {timeout}s: {len(self.ready)} ready, "
                                   f"{len(self.inflight)} in flight, trainer v{self.trainer_version}, served "
                                   f"v{self.served_version}, fleet {self.fleet.snapshot()['servers']}")
            await self._wait_tick(min(0.5, remaining) if remaining is not None else 0.5)

    async def update_weights(self, version: int, **payload):
        """Pause(abort) -> push via the transport -> verify -> continue, on every server."""
        if self.transport is None:
            raise WeightUpdateError("no weight transport configured")
        await self._wait_live()
        async with self._update_lock:
            t0 = time.monotonic()
            self._open.clear()
            try:
                await self.fleet.call_all("/pause_generation", {"mode": self.cfg.pause_mode},
                                          retries=self.cfg.update_retries)
                # requests paused in place still hold KV caches: SGLang fails a flush then
                await self.transport.push(self.fleet, version, retries=self.cfg.update_retries,
                                          flush_cache=self.cfg.pause_mode != "in_place", **payload)
                infos = await self.fleet.call_all("/model_info", None, method="GET", retries=self.cfg.update_retries)
                wrong = {u: i.get("weight_version") for u, i in infos.items() if str(i.get("weight_version")) != str(version)}
                if wrong:
                    raise FleetError(f"servers report other weight versions than {version}: {wrong}")
            except NoServersError as e:
                self._fatal = self._fatal or e
                self._tick()
                raise RolloutError(f"rollout failed: {e}") from e
            except Exception as e:  # noqa: BLE001 - any failure after the pause leaves the fleet paused
                self.counters["weight_update_failures"] += 1
                self._broken = WeightUpdateError(
                    f"weight update to version {version} failed: {e}. Every server is left paused, so none "
                    "serves mixed weights; call update_weights again to retry.")
                self._tick()
                raise self._broken from e
            await self.fleet.call_all("/continue_generation", {}, retries=self.cfg.update_retries)
            self._broken = None
            self.served_version = version
            self._last_payload = {k: v for k, v in payload.items() if k == "hf_dir"}
            self.set_version(version)
            self.counters["weight_updates"] += 1
            self.timings["last_weight_sync_s"] = time.monotonic() - t0
            self.timings["weight_sync_s"] += self.timings["last_weight_sync_s"]
            self._open.set()
            self._tick()

    async def _wait_live(self):
        """Wait (up to the fleet's hang timeout) until some server is in the fleet."""
        deadline = time.monotonic() + self.fleet.hang_timeout_s
        while not self.fleet.live():
            if time.monotonic() > deadline:
                e = self.fleet.no_servers_error()
                self._fatal = self._fatal or e
                raise RolloutError(f"rollout failed: {e}") from e
            await asyncio.sleep(0.2)

    async def _rejoin(self, s) -> bool:
        """Bring a server that was out of the fleet (hung, dead, restarted) to the served weights before it
        serves again: pause(abort) its leftovers, load the last pushed weights (disk transport), check
        its version, continue. False: it stays out (retried at its next liveness check)."""
        if self._stopping or self._broken is not None or self._fatal is not None:
            return False
        async with self._update_lock:
            try:
                if await self.fleet.call_one(s, "/pause_generation", {"mode": "abort"}, retries=0) is None:
                    return False
                if self._last_payload.get("hf_dir"):
                    await self.transport.push(self.fleet, self.served_version, servers=[s],
                                              retries=self.cfg.update_retries, **self._last_payload)
                elif self.served_version != self.initial_version:
                    log.error("server %s cannot be brought to version %d: the %s transport has no weights to "
                              "resend; it stays out of the fleet", s.url, self.served_version,
                              type(self.transport).__name__)
                    return False
                info = await self.fleet.call_one(s, "/model_info", None, method="GET", retries=0)
                if info is None or str(info.get("weight_version")) != str(self.served_version):
                    log.warning("server %s reports version %s after its resync, not %d", s.url,
                                None if info is None else info.get("weight_version"), self.served_version)
                    return False
                return await self.fleet.call_one(s, "/continue_generation", {}, retries=0) is not None
            except Exception as e:  # noqa: BLE001 - it stays out, retried later
                log.warning("resync of %s to version %d failed: %s", s.url, self.served_version, e)
                return False

    def metrics(self) -> dict[str, Any]:
        el = max(time.monotonic() - self._t_start, 1e-9)
        m = {f"rollout/{k}": v for k, v in self.counters.items()}
        m.update({f"rollout/{k}": v for k, v in self.fleet.counters.items()})
        m.update({
            "rollout/groups_ready": len(self.ready), "rollout/groups_inflight": len(self.inflight),
            "rollout/trainer_version": self.trainer_version, "rollout/served_version": self.served_version,
            "rollout/servers_live": len(self.fleet.live()), "rollout/gen_tokens": self.gen_tokens,
            "rollout/gen_tokens_per_s": self.gen_tokens / el,
            "rollout/wait_s_total": self.timings["wait_s"], "rollout/weight_sync_s_total": self.timings["weight_sync_s"],
            # the last get_batch wait and weight sync (metrics.TIME_WAIT / metrics.TIME_SYNC for this step)
            "rollout/last_wait_s": self.timings["last_wait_s"],
            "rollout/last_weight_sync_s": self.timings["last_weight_sync_s"],
        })
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
