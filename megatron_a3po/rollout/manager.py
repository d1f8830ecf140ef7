"""``RolloutManager``: the synchronous facade the (synchronous, torch) trainer uses.

It runs the asyncio rollout controller (controller.py) and the fleet client (fleet.py) in a background
thread with its own event loop; every method below is a blocking call from the trainer's thread.

Typical trainer loop (disk weight sync)::

    from megatron_a3po.rollout import RolloutManager

    rm = RolloutManager(urls, prompts, task, tok, ControllerConfig(...))   # see trainer/rollout_side.py
    rm.start()                                  # health-checks servers, starts generating at version 0
    if resume: rm.load_state_dict(saved["rollout"])          # (before start())
    for step in range(steps):
        batch = rm.get_batch(batch_prompts, current_version=step, timeout=600)
        ...train on batch (trainer/batch.py collate packs it; per-token versions in batch)...
        save_hf(model, d := f"{run}/hf/v{step + 1}")
        rm.update_weights(step + 1, hf_dir=d)   # pause -> load -> continue, on every server (sync.py)
        log(rm.metrics())
        saved["rollout"] = rm.state_dict()
    rm.close()

Versions are integers: servers the trainer starts get ``--weight-version <initial_version>``; a fleet it did
not start (``fleet_synced=False``) gets its version from the first push.
``get_batch(n, k)`` returns ``n`` complete groups (``n_samples`` samples each, rewards and GRPO
advantages filled) in which no token is more than ``max_staleness`` versions older than ``k``.
``update_weights`` raises ``WeightUpdateError`` if a server cannot be updated after retries; the fleet
is then left paused (no server serves mixed weights) and a later ``update_weights`` may retry.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future
from typing import Any

from megatron_a3po.rollout.controller import Controller, ControllerConfig
from megatron_a3po.rollout.fleet import Fleet
from megatron_a3po.rollout.types import Batch
from megatron_a3po.rollout.weights import DiskTransport

log = logging.getLogger("megatron_a3po.rollout.manager")


class RolloutManager:
    """Synchronous facade over the async controller. See the module docstring for the loop.

    Args:
        engine_urls: server base URLs (``http://127.0.0.1:30000``); weight updates go to all of them.
        prompts: list of ``data.Prompt`` (``data.load_prompts``).
        task: a ``tasks.Task`` (reward function) or its name.
        tokenizer: HF tokenizer (decodes responses for the reward).
        config: ``ControllerConfig`` (n_samples, max_inflight_groups, batch_groups, max_staleness,
            sampling params, shuffle/seed/epochs).
        router_url: send /generate through an sglang-router instead (control calls still go to
            ``engine_urls``).
        transport: ``DiskTransport()`` (default) or ``NcclTransport(...)``.
        initial_version: the version the servers start with.
        request_timeout: seconds before a /generate call is abandoned and re-issued elsewhere.
        hang_timeout_s: a server that does not answer ``GET /model_info`` within this is hung: it leaves
            the fleet (its requests are re-issued) and is synced to the current weights when it answers
            again; with no server for this long, the rollout fails with ``RolloutError``.
        log_hints: ``{url: log file}`` named in that error.
        fleet_synced: the servers were started from the trainer's ``initial_version`` weights (the trainer
            started them). False for a fleet the trainer did not start (it may serve "default", or an earlier
            run's version and weights): nothing is generated until the first ``update_weights`` has
            brought every server to the trainer's weights and version. Either way, tokens of a version
            this trainer did not produce are never used (``rollout/samples_dropped_foreign_version``).
        schedule: a recorded ``schedule.Schedule`` to replay (replay.py) instead of admitting by timing.
    """

    def __init__(self, engine_urls: list[str], prompts: list, task, tokenizer, config: ControllerConfig,
                 *, router_url: str | None = None, transport=None, initial_version: int = 0,
                 request_timeout: float = 600.0, connect_timeout: float = 5.0, health_interval_s: float = 0.5,
                 api_key: str | None = None, hang_timeout_s: float = 30.0, log_hints: dict[str, str] | None = None,
                 fleet_synced: bool = True, schedule=None):
        if isinstance(task, str):
            from megatron_a3po.rollout.tasks import get_task

            task = get_task(task)
        self.fleet = Fleet(list(engine_urls), router_url=router_url, request_timeout=request_timeout,
                           connect_timeout=connect_timeout, health_interval_s=health_interval_s, api_key=api_key,
                           hang_timeout_s=hang_timeout_s, log_hints=log_hints)
        if schedule is None:
            self.controller = Controller(self.fleet, prompts, task, tokenizer, config,
                                         transport=transport or DiskTransport(), initial_version=initial_version,
                                         fleet_synced=fleet_synced)
        else:  # replay.py: admission, generation and batches as the recorded schedule says
            from megatron_a3po.rollout.replay import ReplayController

            self.controller = ReplayController(self.fleet, prompts, task, tokenizer, config, schedule=schedule,
                                               transport=transport or DiskTransport(),
                                               initial_version=initial_version, fleet_synced=fleet_synced)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rollout-loop", daemon=True)
        self._started = False
        self._closed = False

    # ---- plumbing
    def _call(self, coro, timeout: float | None = None):
        if self._closed:
            coro.close()
            raise RuntimeError("RolloutManager is closed")
        fut: Future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout)

    async def _run(self, fn, *a, **kw):
        return fn(*a, **kw)

    # ---- public API
    def start(self, wait_s: float = 120.0):
        """Start the loop thread, health-check every server (up to ``wait_s``), start admitting work."""
        if self._started:
            return
        # the reward workers, from this (long-lived) thread: they die with it (rollout/rewards.py)
        self.controller.workflow.scorer.start()
        self._thread.start()
        self._started = True
        self._call(self.fleet.start(wait_s))
        self._call(self.controller.start())

    def get_batch(self, num_groups: int, current_version: int, timeout: float | None = None) -> Batch:
        """Block until ``num_groups`` complete groups within the staleness bound of
        ``current_version`` are ready; raises TimeoutError, WeightUpdateError or RolloutError."""
        return self._call(self.controller.get_batch(num_groups, current_version, timeout))

    def update_weights(self, new_version: int, hf_dir: str | None = None, named_tensors=None,
                       timeout: float | None = None):
        """Push new weights to every server (disk: ``hf_dir``; NCCL: ``named_tensors``, an iterator of
        ``(name, tensor)`` or a callable returning a fresh one: then a push that loses servers is made again
        over the others from a new export, see ``WeightSync._push``) and
        tag generation from now on with ``new_version``. Blocks until every server serves them, or raises
        TimeoutError after ``timeout`` seconds (the update may still be running then)."""
        payload: dict[str, Any] = {}
        if hf_dir is not None:
            payload["hf_dir"] = str(hf_dir)
        if named_tensors is not None:
            payload["named_tensors"] = named_tensors
        return self._call(self.controller.update_weights(int(new_version), **payload), timeout)

    def start_eval(self, prompts: list, config, version: int) -> Future:
        """Start evaluating ``prompts`` with the servers' current weights (``version``) in the background
        (rollout/evaluate.py); returns a Future of the ``EvalResult``. Eval requests bypass the controller:
        they count in neither its staleness accounting nor its data cursor."""
        from megatron_a3po.rollout.evaluate import evaluate

        if self._closed or not self._started:
            raise RuntimeError("RolloutManager is not running")
        return asyncio.run_coroutine_threadsafe(
            evaluate(self.fleet, prompts, self.controller.task, self.controller.tokenizer, config, int(version),
                     scorer=self.controller.workflow.scorer),
            self._loop)

    def init_weight_transport(self):
        """Make what the transport's pushes need: the NCCL update group with every server (call after
        start()); nothing for the others."""
        self._call(self.controller.sync.init_transport())

    def close_transport(self, timeout: float = 30.0):
        """Give up what ``init_weight_transport`` made: the NCCL update group, on the trainer and, best
        effort, on every server."""
        if self._started and not self._closed:
            try:
                self._call(self.controller.sync.close_transport(), timeout=timeout)
            except Exception as e:  # noqa: BLE001 - shutting down: the servers drop it with their process
                log.warning("destroying the weight-update group failed: %s", e)

    def set_max_staleness(self, n: int) -> int:
        """Move the controller's admission bound (never above the configured one); returns the bound."""
        return self._call(self._run(self.controller.set_max_staleness, int(n)))

    def metrics(self) -> dict[str, Any]:
        """Flat dict of counters and gauges (``rollout/...``): groups admitted/completed/delivered/
        dropped_stale, requests_aborted_resumed, samples_restarted_stale, weight_updates,
        weight_update_failures, fleet retries/timeouts/connection_errors/http_5xx/servers_dropped/
        servers_unavailable/servers_recovered, servers_live, gen_tokens(_per_s), wait_s_total,
        weight_sync_s_total, trainer/served versions."""
        return self._call(self._run(self.controller.metrics))

    def state_dict(self) -> dict:
        """Data cursor + prompts admitted but not yet delivered (regenerated after a resume)."""
        if not self._started:
            return self.controller.state_dict()
        return self._call(self._run(self.controller.state_dict))

    def load_state_dict(self, sd: dict):
        """Restore a ``state_dict()``; call before ``start()``."""
        if self._started:
            raise RuntimeError("load_state_dict must be called before start()")
        self.controller.load_state_dict(sd)

    def close(self):
        """Stop generating (in-flight requests are abandoned) and stop the loop thread."""
        if self._closed:
            return
        if self._started:
            try:
                for step in (self.controller.stop, self.fleet.close):
                    try:
                        self._call(step(), timeout=30)
                    except TimeoutError:  # shutting down anyway: the engines are stopped below
                        log.warning("rollout shutdown: %s did not finish within 30 s", step.__qualname__)
            finally:
                self._closed = True
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=30)
        self.controller.workflow.close()
        self._closed = True

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()
