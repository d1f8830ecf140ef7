"""``python -m megatron_a3po.trainer --recipe NAME_OR_PATH [key.path=value ...]``

Under torchrun (WORLD_SIZE set) every rank runs the loop. Started directly, it spawns the
TP x PP x DP ranks itself (``parallel.dp``, default 1; gloo on CPU), so the CPU demo and tests need
no launcher. Exit code 2: a bad recipe, a failed preflight check or a damaged/foreign checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from functools import partial


SUMMARY_KEYS = ("mode", "window", "first_reward", "last_reward", "prox_time_total_s", "prox_time_mean_ms",
                "staleness_mean", "steps_per_s", "elapsed_s")  # what print_summary reads of a run


def _sibling_summaries(summary: dict, run_dir: str) -> list[dict]:
    """Summaries of the same recipe in other modes, in sibling run dirs (newest per mode). A sibling
    ``summary.json`` that is not one of ours (a run dir under /tmp has strangers for siblings) is skipped."""
    import json
    from pathlib import Path

    found = {}
    for p in sorted(Path(run_dir).resolve().parent.glob("*/summary.json"), key=lambda p: p.stat().st_mtime):
        try:
            other = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(other, dict) and all(k in other for k in SUMMARY_KEYS)
                and other.get("recipe") == summary.get("recipe") and other["mode"] != summary["mode"]):
            found[other["mode"]] = other
    return list(found.values())


def _eval_cell(key: str, run: dict) -> str:
    """``first`` / ``last`` (with the evaluated version) / ``best`` eval accuracy of a run's summary."""
    ev = run.get("eval")
    if not ev:
        return "n/a"
    at = f" (v{ev[key + '_version']})" if key + "_version" in ev else ""
    return f"{ev[key]:.3f}{at}"


def print_summary(summary: dict, run_dir: str | None = None) -> None:
    """The end-of-run table; runs of the same recipe in other modes beside it appear side by side
    (e.g. ``--run-dir runs/demo_cpu_recompute trainer.mode=recompute``)."""
    from rich.console import Console
    from rich.table import Table

    runs = [summary] + (_sibling_summaries(summary, run_dir) if run_dir else [])
    c = Console()
    t = Table(title=f"A-3PO run ({summary['mode']}, {summary['steps']} steps)")
    t.add_column("metric")
    for r in runs:
        t.add_column(r["mode"] + (" (this run)" if r is summary else ""), justify="right")
    w = summary["window"]
    rows = [
        (f"reward, first {w} steps (mean)", lambda r: f"{r['first_reward']:.3f}"),
        (f"reward, last {w} steps (mean)", lambda r: f"{r['last_reward']:.3f}"),
        ("proximal log-prob time, total", lambda r: f"{r['prox_time_total_s'] * 1e3:.2f} ms"),
        ("proximal log-prob time, per step", lambda r: f"{r['prox_time_mean_ms']:.3f} ms"),
        ("mean staleness of trained tokens", lambda r: f"{r['staleness_mean']:.2f}"),
        ("steps/s", lambda r: f"{r['steps_per_s']:.3f}"),
    ]
    if any(r.get("eval") for r in runs):
        rows += [(f"eval accuracy, {key}", partial(_eval_cell, key)) for key in ("first", "last", "best")]
    rows += [
        ("wall time", lambda r: f"{r['elapsed_s']:.1f} s"),
    ]
    for name, fmt in rows:
        t.add_row(name, *[fmt(r) for r in runs])
    c.print(t)
    c.print(f"TensorBoard logs: [bold]{summary['tensorboard']}[/bold]  "
            f"(tensorboard --logdir {summary['tensorboard']})")


def check_resume(recipe, run_dir) -> None:
    """With trainer.resume, the checkpoint to resume from is checked before any rank starts: its files
    (missing or truncated shards, pickles) and that it holds this recipe's model."""
    from pathlib import Path

    from megatron_a3po.trainer.checkpoint import latest_checkpoint, verify_checkpoint
    from megatron_a3po.trainer.preflight import _arch

    tc = recipe.trainer
    if not tc.resume:
        return
    ck = latest_checkpoint(Path(tc.save_dir) if tc.save_dir else Path(run_dir) / "checkpoints")
    if ck is not None:
        verify_checkpoint(ck, _arch(recipe))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_a3po.trainer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="recipe name under recipes/ or a .yaml path")
    ap.add_argument("--run-dir", default=None, help="output dir (default: trainer.log_dir)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.mode=recompute")
    args = ap.parse_args(argv)
    from megatron_a3po.trainer.terminal import install_warning_filter

    install_warning_filter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    for noisy in ("httpx", "httpcore", "megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from megatron_a3po.config import load_recipe
    from megatron_a3po.errors import A3POError
    from megatron_a3po.trainer.preflight import preflight

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        preflight(recipe)
        return _train(recipe, args)
    except A3POError as e:  # the message says what is wrong and what to do: no traceback wall
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code  # 2: a recipe, file or checkpoint to fix; 1: the run failed (every engine gone, ...)


def _train(recipe, args) -> int:
    run_dir = args.run_dir or recipe.trainer.log_dir
    world = recipe.parallel.tp * recipe.parallel.pp * (recipe.parallel.dp or 1)
    check_resume(recipe, run_dir)  # a CheckpointError: exit 2, naming the file
    if "WORLD_SIZE" in os.environ:  # torchrun / srun
        from megatron_a3po.trainer.loop import run

        summary = run(recipe, run_dir=run_dir)
    elif world == 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        from megatron_a3po.platform.procs import free_port

        os.environ.setdefault("MASTER_PORT", str(free_port()))
        from megatron_a3po.trainer.loop import run

        summary = run(recipe, run_dir=run_dir)
    else:
        from megatron_a3po.platform.procs import run_distributed
        from megatron_a3po.trainer.loop import run_worker

        from megatron_a3po.config import timeouts

        summary = run_distributed(run_worker, world, recipe.model_dump(), run_dir, timeout=24 * 3600,
                                  pg_timeout_s=timeouts(recipe.rollout).pg_timeout_s)[0]
    if summary:
        print_summary(summary, run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
