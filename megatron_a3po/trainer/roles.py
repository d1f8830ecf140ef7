"""The two halves of every exchange between the trainer ranks and the rollout side.

Global rank 0 (``Lead``) owns the rollout side (trainer/rollout_side.py ``RolloutSide``), the staleness bound, the
evaluation schedule and the metric loggers; every other rank holds a ``Follower``. The training recipe
(trainer/loop.py) picks one of the two once, at setup, and calls the same method on every rank at the
same point: where the exchange is collective (a batch, a weight push, a checkpoint's rollout state),
the two classes' methods are its two halves. An error on rank 0 inside one of them reaches every rank
(``platform.ranks.on_rank0``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from megatron_a3po import metrics as M
from megatron_a3po.platform.ranks import broadcast_object, on_rank0, wait_for_rank0

log = logging.getLogger("megatron_a3po.trainer")


def drain(named) -> None:
    """Run a streamed weight export to its end (its collectives, with the other ranks), dropping it."""
    for _ in named:
        pass


class Lead:
    """Global rank 0: ``side`` (a ``RolloutSide``), ``bound`` (a ``StalenessBound`` or None), ``loggers``
    (``metric_log.MetricLoggers``, from ``ready`` on). The run's clock (``time/elapsed``, the summary's
    wall time) starts when the rollout side is built."""

    def __init__(self, recipe, side, *, run_dir: Path, start_step: int):
        from megatron_a3po.rollout.staleness import StalenessBound

        self.recipe, self.side, self.run_dir = recipe, side, run_dir
        self.start_step = start_step
        self.bound = StalenessBound.from_recipe(recipe, side.set_max_staleness)
        self.t_start = time.perf_counter()
        self.loggers = None
        self.eval_every = recipe.trainer.eval_every
        self.steps = recipe.trainer.steps

    def info(self, msg: str, *args) -> None:
        log.info(msg, *args)

    # ------------------------------------------------------------------ collective halves
    def start(self, *, weights_dir: Path | None, version: int, state: dict | None) -> None:
        on_rank0(self.side.start, weights_dir=weights_dir, version=version, state=state)

    def batch(self, version: int):
        """(groups, rollout stats) for training ``version``."""
        def get():
            groups = self.side.get_batch(version)
            return groups, self.side.stats(version, groups)

        return on_rank0(get)

    def wait_eval(self) -> None:
        """The running evaluation ends before the weights move."""
        on_rank0(self.side.wait_eval)

    def push(self, version: int, weights_dir: Path) -> None:
        on_rank0(self.side.update_weights, version, weights_dir)

    def push_stream(self, version: int, named) -> None:
        def push():
            try:
                self.side.update_weights(version, named_tensors=named)
            finally:  # after a failed push: the rest of the export's collectives, with the other ranks
                if not callable(named):  # a callable export is a one-rank run's: nothing to drain
                    drain(named)

        on_rank0(push)

    def warm_start_samples(self, n: int, seed: int):
        return broadcast_object(on_rank0(self.side.warm_start_samples, n, seed=seed))

    def shared(self, obj):
        """Rank 0's ``obj`` on every rank (the checkpoint's state: rank 0's RNG and rollout state)."""
        return broadcast_object(obj)

    # ------------------------------------------------------------------ rank 0's own
    def rollout_state(self) -> dict:
        return self.side.state_dict()

    def check_digests(self, mine: str) -> dict:
        """Each engine's served weights against the trainer's export digest ``mine``; raises on a mismatch."""
        theirs = self.side.engine_digests()
        bad = {u: d for u, d in theirs.items() if d != mine}
        if bad:
            raise RuntimeError(f"weight sync check failed: trainer digest {mine[:12]}, engines {bad}")
        return {"weights_digest": mine, "engine_digests": theirs}

    def ready(self, version: int) -> None:
        """The fleet serves ``version``: the metric loggers open (steps.jsonl's records after the start step
        dropped, TensorBoard's purged), the known library warnings so far in one line, and with an eval set
        the first evaluation (at step 0, or on resume at an eval step), which runs while the first step
        trains (the next weight push waits for it)."""
        from megatron_a3po.trainer import terminal
        from megatron_a3po.trainer.metric_log import build_loggers

        self.loggers = build_loggers(self.recipe, self.run_dir, self.start_step, self.side.metrics, self.t_start)
        if line := terminal.known_warnings_line():
            log.info(line)
        s0 = self.start_step
        if self.side.has_eval and (s0 == 0 or (self.eval_every and s0 % self.eval_every == 0)):
            self.side.start_eval(version)

    def _evals(self, step: int, version: int) -> tuple[list, float]:
        """Evaluations finished by ``step`` (1-based) and the seconds this step waited for evaluations;
        starts the next one when it is due (after the last step: waits for it, nothing left to overlap)."""
        side = self.side
        if not side.has_eval:
            return [], 0.0
        t1 = time.perf_counter()
        done = side.take_eval_results()  # those the weight push waited for, or already done
        last = step == self.steps
        if last or (self.eval_every and step % self.eval_every == 0):
            side.start_eval(version)
            if last:
                side.wait_eval()
                done += side.take_eval_results()
        waited = side.take_eval_wait_s() + (time.perf_counter() - t1 if last else 0.0)
        return done, waited

    def report(self, step: int, version: int, record: dict, stats: dict, rollout_stats: dict, times: dict, *,
               t_step: float) -> None:
        """After step ``step`` (1-based) left the weights at ``version``: the audit's actions and the
        staleness bound, the evaluations, the step's stats to every metric logger."""
        from megatron_a3po.loss import finalize_bucket_means
        from megatron_a3po.trainer.audit import after_step
        from megatron_a3po.trainer.metric_log import StepLog, eval_entry

        stats = finalize_bucket_means(stats)  # metrics mode: per-staleness shares -> bucket means
        fields, extra = after_step(self.bound, step, stats)  # the audit's actions, the staleness bound
        record = {**record, **fields}
        stats = {**stats, **extra, **rollout_stats, **times}
        done, waited = self._evals(step, version)
        if self.side.has_eval:
            stats[M.TIME_EVAL_WAIT] = waited
        evals = [eval_entry(self.run_dir, r) for r in done]
        now = time.perf_counter()
        stats[M.TIME_STEP] = now - t_step
        stats[M.TIME_TOTAL] = now - self.t_start
        stats[M.POLICY_VERSION] = version
        stats[M.TRAIN_TOK_S] = stats["_tokens_trained"] / max(stats["time/train"], 1e-9)
        self.loggers.log_step(StepLog(step, record, stats, evals))

    def finish(self) -> dict:
        """Closes the loggers; the run's summary."""
        self.loggers.close()
        return self.loggers.backends[-1].summary

    def close(self) -> None:
        self.side.close()


class Follower:
    """Every rank but global rank 0: its half of each collective exchange; nothing of its own."""

    def start(self, **_) -> None:
        wait_for_rank0()

    def batch(self, version: int):
        wait_for_rank0()
        return None, None

    def wait_eval(self) -> None:
        wait_for_rank0()

    def push(self, version: int, weights_dir: Path) -> None:
        wait_for_rank0()

    def push_stream(self, version: int, named) -> None:
        drain(named)  # the export's collectives, while rank 0 pushes its buckets
        wait_for_rank0()

    def warm_start_samples(self, n: int, seed: int):
        wait_for_rank0()
        return broadcast_object(None)

    def shared(self, obj):
        return broadcast_object(None)

    def rollout_state(self) -> None:
        return None

    def check_digests(self, mine: str) -> dict:
        return {}

    def info(self, msg: str, *args) -> None:
        pass

    def ready(self, version: int) -> None:
        pass

    def report(self, *args, **kwargs) -> None:
        pass

    def finish(self) -> None:
        return None

    def close(self) -> None:
        pass
