"""Rewards in worker processes that are killed at a bound.

A task's reward (``Task.reward(text, record)``) is user code run on model output: math-verify on an
answer such as ``\\boxed{9^{9^{9^{9}}}}`` computes a huge integer power in C while holding the GIL, and then
no thread-based timeout (``Future.result(timeout)``, ``asyncio.wait_for``) can fire in that process. So
every reward of every task runs in a pool of worker processes (pebble's ``ProcessPool``, spawned, so no
trainer state is forked):

* a group's responses are one task with a bound (``timeout_s``, counted from the moment a worker takes it);
  a worker still busy at the bound is killed (SIGTERM at its default action, which needs no GIL; SIGKILL
  3 s later if that failed) and replaced, and each response of that group is then scored on its own with
  the same bound: a response that hits it again scores 0 (``reward_timeouts``), the others their reward;
* a reward that raises scores 0 (``reward_errors``, logged with the worker's traceback);
* the other responses, and the next ones, are scored normally by the other workers.

The workers are started once, ahead of the first batch (``start``), and die with the process that
started them (``PR_SET_PDEATHSIG``). ``Task.reward`` must therefore be picklable: a module-level function.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from concurrent.futures import TimeoutError as FutureTimeout

log = logging.getLogger("megatron_a3po.rollout.rewards")

# the bound of ONE response's reward, in seconds (rollout/controller.py ControllerConfig.reward_timeout_s,
# also used by evaluations)
REWARD_TIMEOUT_S = 30.0


def _worker_init(reward) -> None:
    """In each worker: SIGTERM kills at once (pebble's own handler is Python code, which cannot run while a
    C call holds the GIL), and the worker gets SIGKILL when the process that started the pool dies (Linux
    PR_SET_PDEATHSIG; not platform.procs.die_with_parent, whose package imports torch: a worker imports
    only the task's module). ``reward`` arrives here, before any task's clock starts, so unpickling it
    imports the task's module (and what that imports) outside the bound: a worker that replaces a killed one
    on a loaded machine does not spend a reward's seconds on imports."""
    del reward
    import ctypes

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the worker exits when its pipe to the pool closes
        pass


def _ready() -> int:
    return os.getpid()


def _score_texts(reward, texts: list[str], record: dict) -> list[tuple[bool, float | str]]:
    """In a worker: ``(True, reward)`` or ``(False, traceback)`` per text."""
    import traceback

    out = []
    for t in texts:
        try:
            out.append((True, float(reward(t, record))))
        except Exception:  # noqa: BLE001 - reported (and scored 0) by the scorer
            out.append((False, traceback.format_exc()))
    return out


def default_workers() -> int:
    return max(2, min(4, os.cpu_count() or 2))


class RewardScorer:
    """Scores responses with ``task.reward`` in a process pool; one per rollout (its owner closes it)."""

    def __init__(self, task, *, timeout_s: float = REWARD_TIMEOUT_S, workers: int | None = None):
        if timeout_s <= 0:
            raise ValueError(f"reward timeout must be > 0 s, got {timeout_s}")
        self.task, self.timeout_s = task, float(timeout_s)
        self.workers = workers or default_workers()
        self._pool = None

    def start(self) -> None:
        """Start the workers now (they take a second to spawn and import the task), so the first batch's
        rewards do not wait for them. Call it from a thread that lives as long as the pool (the workers'
        parent-death signal is tied to the thread that spawned them)."""
        if self._pool is not None:
            return
        from pebble import ProcessPool

        self._pool = ProcessPool(max_workers=self.workers, initializer=_worker_init, initargs=(self.task.reward,),
                                 context=multiprocessing.get_context("spawn"))
        for _ in range(self.workers):
            self._pool.schedule(_ready)

    async def score(self, texts: list[str], record: dict, counters=None) -> list[float]:
        """The reward of each text for ``record``; a timed-out or failing reward is 0.0 and is counted in
        ``counters`` (``reward_timeouts`` / ``reward_errors``).

        The texts go to one worker together (one task per group: a demo step has hundreds of trivial
        rewards); if that task hits the bound, each text is scored again on its own, each with the bound,
        so only the stuck one scores 0."""
        try:
            results = await self._run(texts, record)
        except FutureTimeout:
            if len(texts) == 1:
                results = [None]
            else:
                results = list(await asyncio.gather(*(self._run_one(t, record) for t in texts)))
        except Exception as e:  # noqa: BLE001 - e.g. the reward does not pickle: every text failed
            results = [(False, f"{type(e).__name__}: {e}")] * len(texts)
        out = []
        for r in results:
            if r is None:
                log.warning("reward of task %s timed out after %.1f s (scored 0)", self.task.name, self.timeout_s)
                kind, value = "reward_timeouts", 0.0
            elif not r[0]:
                log.error("reward of task %s failed (scored 0): %s", self.task.name, r[1])
                kind, value = "reward_errors", 0.0
            else:
                kind, value = None, r[1]
            if kind and counters is not None:
                counters[kind] += 1
            out.append(value)
        return out

    async def _run(self, texts: list[str], record: dict):
        self.start()
        try:
            fut = self._pool.schedule(_score_texts, args=(self.task.reward, texts, record), timeout=self.timeout_s)
        except RuntimeError:  # the pool broke (its workers could not start or died): a new one, once
            log.warning("reward worker pool broken; starting a new one")
            self.close()
            self.start()
            fut = self._pool.schedule(_score_texts, args=(self.task.reward, texts, record), timeout=self.timeout_s)
        return await asyncio.wrap_future(fut)

    async def _run_one(self, text: str, record: dict):
        try:
            return (await self._run([text], record))[0]
        except FutureTimeout:
            return None
        except Exception as e:  # noqa: BLE001
            return (False, f"{type(e).__name__}: {e}")

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.stop()
            pool.join(timeout=10)
