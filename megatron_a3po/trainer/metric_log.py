"""One metric-logger protocol; the run's outputs are its backends.

Every step the training recipe (trainer/loop.py) hands one ``StepLog`` to a ``MetricLoggers`` fan-out, and
each backend writes what it is for:

    StepsJsonl      <run_dir>/steps.jsonl: one record per step (versions, prompts, audit, eval, stats);
                    records after the step a run resumes from are dropped at open (one history)
    TensorBoard     <run_dir>/tb: ``train/<stat>`` at the 0-based step, the staleness histogram, ``eval/...``
                    at the evaluated version; events of a killed run's later steps are purged at open
    Terminal        the progress bar (on a terminal) and one log line per step and per evaluation
    RunSummary      <run_dir>/summary.json at close: rewards first/last, proximal time, staleness, eval
    Wandb           optional (recipe ``logging.wandb``): the steps.jsonl stats and the eval metrics, at
                    the step, to a Weights & Biases run (``mode: offline`` writes under <run_dir>/wandb)

A backend is any object with ``log_step(StepLog)`` and ``close()``. Only the rank that logs (global rank
0) builds them: the recipe decides once.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from megatron_a3po import metrics as M

log = logging.getLogger("megatron_a3po.trainer")


@dataclass
class StepLog:
    """What one training step reports. ``stats`` holds every statistic, the private ``_``-prefixed ones
    (e.g. ``_staleness_values``, the histogram's input) included; ``record`` the step's other fields of
    steps.jsonl; ``evals`` the evaluations that finished during the step (``eval_entry``)."""

    step: int  # 1-based: the number of optimizer steps done
    record: dict[str, Any]
    stats: dict[str, Any]
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def public_stats(self) -> dict[str, Any]:
        return {k: v for k, v in self.stats.items() if not k.startswith("_")}


class MetricLogger(Protocol):
    def log_step(self, entry: StepLog) -> None: ...

    def close(self) -> None: ...


class MetricLoggers:
    """The fan-out: every backend gets every step, in order; ``close`` closes them all (in order)."""

    def __init__(self, backends: list[MetricLogger]):
        self.backends = list(backends)

    def log_step(self, entry: StepLog) -> None:
        for b in self.backends:
            b.log_step(entry)

    def close(self) -> None:
        for b in self.backends:
            b.close()


def eval_logged(entry: dict) -> dict[str, float]:
    """The ``eval/...`` metrics of an evaluation entry (its other fields: version, seconds, generations)."""
    return {k: v for k, v in entry.items() if k.startswith("eval/")}


def eval_entry(run_dir: Path, res) -> dict:
    """An evaluation result (``rollout.evaluate.EvalResult``) as steps.jsonl's entry; its generations are
    written to ``eval/v<version>.jsonl`` first (atomically)."""
    from megatron_a3po.io import atomic_write_text

    path = run_dir / "eval" / f"v{res.version}.jsonl"
    atomic_write_text(path, "".join(json.dumps(s) + "\n" for s in res.samples))
    return {"version": res.version, **res.metrics, "seconds": res.seconds, "generations": str(path)}


# ---------------------------------------------------------------------------------------------- backends
class StepsJsonl:
    """steps.jsonl: one JSON record per step, fsynced (a kill loses at most the step it cut short)."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        cut_history(path, start_step)

    def log_step(self, entry: StepLog) -> None:
        rec = dict(entry.record)
        if entry.evals:
            rec["eval"] = entry.evals
        rec["stats"] = entry.public_stats
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        pass


def cut_history(path: Path, last_step: int) -> None:
    """Keep the records of steps 1..``last_step`` of ``path`` (atomic rewrite); a line a kill cut short
    is dropped."""
    from megatron_a3po.io import atomic_write_text

    if not path.exists():
        return
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= last_step:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        log.info("%s: starting at step %d, dropped %d later or unreadable record(s)", path, last_step + 1, dropped)
        atomic_write_text(path, "".join(x + "\n" for x in keep))


class TensorBoard:
    """Scalars ``train/<stat>`` at the 0-based step index, ``train/staleness/hist``, ``eval/...`` at the
    evaluated version. Events of steps >= ``start_step`` left by an earlier (killed) run are purged."""

    def __init__(self, log_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step)

    def log_step(self, entry: StepLog) -> None:
        import torch

        w = self.writer
        for ev in entry.evals:
            for k, v in eval_logged(ev).items():
                w.add_scalar(k, v, ev["version"])
        for k, v in entry.public_stats.items():
            if isinstance(v, (int, float)):
                w.add_scalar(M.PREFIX + k, v, entry.step - 1)
        hist = entry.stats.get("_staleness_values")
        if hist:
            w.add_histogram(M.PREFIX + M.STALENESS_HIST, torch.tensor(hist, dtype=torch.float32), entry.step - 1)
        w.flush()

    def close(self) -> None:
        self.writer.close()


class Terminal:
    """The progress bar (on a terminal only) and the log lines: one per evaluation, one per step."""

    def __init__(self, start_step: int, steps: int):
        from megatron_a3po.trainer.terminal import Progress

        self.bar = Progress(start_step, steps)

    def log_step(self, entry: StepLog) -> None:
        for ev in entry.evals:
            extra = "".join(f" {k.split('/', 1)[1]} {v:.3f}" for k, v in eval_logged(ev).items() if "pass@" in k)
            log.info("eval v%d: accuracy %.3f%s on %d prompts (%.1fs)", ev["version"], ev[M.EVAL_ACCURACY], extra,
                     ev["eval/n_prompts"], ev["seconds"])
        s = entry.stats
        r = s.get(M.REWARD_MEAN, float("nan"))
        self.bar.update(reward=f"{r:.3f}", stale=f"{s.get(M.STALENESS_MEAN, 0):.2f}",
                        prox_ms=f"{1e3 * s.get(M.TIME_PROX, 0):.2f}")
        log.info("step %d v%d reward %.3f entropy %.3f clip %.3f stale %.2f/%d grad %.3f | wait %.2fs prox %.2fms "
                 "fwdbwd %.2fs opt %.2fs sync %.2fs", entry.step, s.get(M.POLICY_VERSION, 0), r,
                 s.get(M.ENTROPY, 0), s.get(M.CLIP_FRAC, 0), s.get(M.STALENESS_MEAN, 0),
                 int(s.get(M.STALENESS_MAX, 0)), s.get(M.GRAD_NORM, 0), s.get(M.TIME_WAIT, 0),
                 1e3 * s.get(M.TIME_PROX, 0), s.get(M.TIME_FWD_BWD, 0), s.get(M.TIME_OPT, 0), s.get(M.TIME_SYNC, 0))

    def close(self) -> None:
        self.bar.close()


class RunSummary:
    """summary.json, written at close; ``summary`` is then the dict (the end-of-run table prints it).
    ``rollout_metrics``: the rollout side's counters at the end (``RolloutSide.metrics``)."""

    def __init__(self, recipe, run_dir: Path, rollout_metrics: Callable[[], dict], t_start: float):
        self.recipe, self.run_dir, self.rollout_metrics = recipe, run_dir, rollout_metrics
        self.t_start = t_start
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.summary: dict | None = None

    def log_step(self, entry: StepLog) -> None:
        self.history.append(entry.stats)
        self.evals += entry.evals

    def close(self) -> None:
        from megatron_a3po.io import write_json_atomic

        self.summary = summarize(self.recipe, self.history, self.run_dir, time.perf_counter() - self.t_start,
                                 self.rollout_metrics(), self.evals)
        write_json_atomic(self.run_dir / "summary.json", self.summary)


def summarize(recipe, history: list[dict], run_dir: Path, elapsed: float, rollout: dict, evals=()) -> dict:
    """The run summary of the steps' stats and the evaluations."""
    rewards = [h.get(M.REWARD_MEAN, 0.0) for h in history]
    k = min(20, max(1, len(rewards) // 2))
    prox = [h.get(M.TIME_PROX, 0.0) for h in history]
    stale = [h.get(M.STALENESS_MEAN, 0.0) for h in history]
    out = {
        "recipe": recipe.name,
        "mode": recipe.trainer.mode,
        "steps": len(history),
        "first_reward": statistics.mean(rewards[:k]) if rewards else float("nan"),
        "last_reward": statistics.mean(rewards[-k:]) if rewards else float("nan"),
        "window": k,
        "prox_time_total_s": sum(prox),
        "prox_time_mean_ms": 1e3 * statistics.mean(prox) if prox else 0.0,
        "staleness_mean": statistics.mean(stale) if stale else 0.0,
        "elapsed_s": elapsed,
        "steps_per_s": len(history) / elapsed if elapsed else 0.0,
        "tensorboard": str(run_dir / "tb"),
        "rollout": rollout,
    }
    if evals:
        acc = [(e["version"], e[M.EVAL_ACCURACY]) for e in evals]
        out["eval"] = {"first": acc[0][1], "last": acc[-1][1], "best": max(a for _, a in acc),
                       "first_version": acc[0][0], "last_version": acc[-1][0], "history": acc,
                       "n_prompts": evals[-1]["eval/n_prompts"]}
    return out


class Wandb:
    """A Weights & Biases run (recipe ``logging.wandb``): per step, the stats steps.jsonl records (same
    keys) and the eval metrics of the evaluations that finished in the step, at ``step``. The whole
    recipe is the run's config. ``mode: offline`` writes the run under ``<run_dir>/wandb`` for ``wandb
    sync``; a resumed run continues the same run id (kept in ``<run_dir>/wandb_run_id``)."""

    def __init__(self, cfg, recipe, run_dir: Path):
        try:
            import wandb
        except ImportError:
            from megatron_a3po.trainer.preflight import WANDB_HINT

            raise ImportError(f"logging.wandb is set but wandb is not installed: {WANDB_HINT}") from None
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(6)
        # silent, no console capture: the job's output stays its own log lines (one line here says where)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags),
                              name=cfg.name or f"{recipe.name}-{run_dir.name}", mode=cfg.mode, dir=str(run_dir),
                              id=run_id, resume="allow", config=recipe.model_dump(mode="json"),
                              settings=wandb.Settings(silent=True, console="off"))
        if not id_file.exists():
            from megatron_a3po.io import atomic_write_text

            atomic_write_text(id_file, run_id + "\n")
        where = self.run.url if cfg.mode == "online" else self.run.dir  # .url warns in an offline run
        log.info("wandb run %s (%s): %s", run_id, cfg.mode, where)

    def log_step(self, entry: StepLog) -> None:
        data = dict(entry.public_stats)
        for ev in entry.evals:
            data.update(eval_logged(ev))
            data["eval/version"] = ev["version"]
        self.run.log(data, step=entry.step)

    def close(self) -> None:
        self.run.finish()


def build_loggers(recipe, run_dir: Path, start_step: int, rollout_metrics: Callable[[], dict],
                  t_start: float) -> MetricLoggers:
    """The run's backends (rank 0): steps.jsonl, TensorBoard, the terminal, wandb if configured, and the
    summary last (``loggers.backends[-1].summary`` after close; ``t_start``: the run's start,
    perf_counter)."""
    backends: list[MetricLogger] = [StepsJsonl(run_dir / "steps.jsonl", start_step),
                                    TensorBoard(run_dir / "tb", start_step),
                                    Terminal(start_step, recipe.trainer.steps)]
    if recipe.logging.wandb is not None:
        backends.append(Wandb(recipe.logging.wandb, recipe, run_dir))
    backends.append(RunSummary(recipe, run_dir, rollout_metrics, t_start))
    return MetricLoggers(backends)
