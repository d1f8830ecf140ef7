"""Run a grid of recipe overrides x seeds, resumably, and write a small summary per run.

    python -m tools.sweep --grid tools/sweep/grids/fidelity.yaml --seeds 0,1,2 --out runs/fidelity \\
        --parallel 2 [--export docs/fidelity/runs] [--list]

Grid file (YAML; every key is checked, errors name the file and the key)::

    recipe: demo_cpu                  # a recipe name or .yaml path, as the trainer's --recipe
    overrides: {trainer.steps: 150}   # dotted overrides for every run
    blocks:                           # each block is the cartesian product of its axes
      - axes:
          trainer.mode: [loglinear, recompute]
          loss.eps_clip: [0.1, 0.2]
          regime:                     # an axis whose values are mappings sets several keys at once
            - {rollout.max_staleness: 1, rollout.max_inflight_groups: 64}
        seeds: 1                      # optional: only the first N of --seeds for this block
        overrides:                    # optional: more overrides for this block's runs (not in the group name)
          replay.schedule: runs/paired/record/max_staleness=2/seed{seed}/schedule.jsonl

``{seed}`` in an override's value is the run's seed (a replay names the schedule its seed's recorded run
wrote: run the recording grid first, then the replaying one; docs/benchmarks.md, "Paired").

Each run's recipe (the grid's recipe with the grid-wide overrides, the point's and the seed, values as
typed in the grid file) is validated when the grid is read and written into the run directory
(``recipe.yaml``, ``config.recipe_yaml``, as the launcher does); the trainer reads that file.

A grid point is a *group*: its runs differ only in ``trainer.seed`` (the run's one seed: model init,
data and data order, engine sampling; see megatron_a3po/config.py). Runs go to ``OUT/<group>/seed<k>/``, where
``<group>`` is the point's ``key=value`` pairs (last key component, the full key if that is ambiguous)
joined by commas. tools/report groups runs by it.

Finished. A run is finished when ``run_summary.json`` is in its directory: it is written (temp file +
rename) only after the trainer exited 0 and its steps.jsonl holds every step. A later invocation skips
finished runs whose recorded recipe and overrides equal the grid's (and stops with an error naming the
directory if they differ, rather than mixing two grids), and deletes and reruns any other run directory
(a crash, a kill, a failed run). A failed run does not stop the others; the command exits 1 listing them.
Ctrl-C or SIGTERM stops the runs in progress (SIGTERM to each trainer; its engines die with it) and exits
130; the same command later continues.

Why a plain subprocess loop, not nemo-run's LocalExecutor: every run is one local command (the trainer
starts its own engine), the limit of concurrent runs is a thread pool's size, and skip/resume is
decided here from the run directory in any case. nemo-run would add an experiment directory per
launch and, as an optional extra, a ~0.5 GB install (the `launch` extra) for no extra function here.

Run summary (``run_summary.json``, schema ``a3po.sweep.run/1``): group, seed, recipe, overrides, a few
resolved config values (mode, eps_clip, max_staleness, ...), the headline numbers of tools/report
(final reward = mean reward over the last 20 steps, mean reward, stability, clipped tokens, max / min
importance weight, entropy, proximal time, staleness), the trainer's own summary numbers, and the
per-step curves tools/report draws (6 significant digits). ``--export DIR`` copies each finished run's
summary to ``DIR/<group>/seed<k>/run_summary.json``: small enough to commit, and all that
``python -m tools.report --sweep DIR`` needs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from megatron_a3po import metrics as M
from megatron_a3po.config import recipe_yaml
from megatron_a3po.io import atomic_write_text, write_json_atomic
from tools.report import COMPARISONS, HEADLINES, SUMMARY_FILE, SUMMARY_SCHEMA, RunData
from megatron_a3po.errors import A3POError

ROOT = Path(__file__).resolve().parents[2]
RECIPE_FILE = "recipe.yaml"  # the run's validated recipe in its directory: the trainer's --recipe
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# resolved recipe values recorded in each summary (tools/report reads mode, eps_clip, max_staleness)
CONFIG_KEYS = {"mode": "trainer.mode", "eps_clip": "loss.eps_clip", "max_staleness": "rollout.max_staleness",
               "max_inflight_groups": "rollout.max_inflight_groups", "batch_prompts": "rollout.batch_prompts",
               "n_samples": "rollout.n_samples", "steps": "trainer.steps", "lr": "trainer.lr",
               "ppo_n_minibatches": "trainer.ppo_n_minibatches", "entropy_coef": "loss.entropy_coef",
               "behave_weight_cap": "loss.behave_weight_cap", "replay_record": "replay.record",
               "replay_schedule": "replay.schedule"}


class SweepError(A3POError, ValueError):
    pass


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid")
    axes: dict[str, list]
    seeds: int | None = Field(None, ge=1)
    overrides: dict[str, object] = {}


class _Grid(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe: str
    overrides: dict[str, object] = {}
    blocks: list[_Block] = Field(min_length=1)


@dataclass
class RunSpec:
    group: str
    seed: int
    recipe: str
    overrides: dict[str, str]  # every override of the run (grid-wide + point + trainer.seed), as text
    point: dict[str, str]  # the grid point's own overrides (what names the group)
    config: dict = field(default_factory=dict)
    recipe_obj: Any = None  # the run's validated Recipe, written into its directory for the trainer

    @property
    def rel(self) -> str:
        return f"{self.group}/seed{self.seed}"

    def argv(self, run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "megatron_a3po.trainer", "--recipe", str(run_dir / RECIPE_FILE),
                "--run-dir", str(run_dir)]


def _text(v) -> str:
    """How an override value is shown (group names, the run summary); the trainer gets the typed value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _points(block: _Block, where: str) -> list[dict[str, Any]]:
    """The block's grid points: dicts of dotted key -> value (as typed in the grid file)."""
    choices = []
    for name, values in block.axes.items():
        if not values:
            raise SweepError(f"{where}.axes.{name}: no values")
        opts = []
        for v in values:
            if isinstance(v, dict):  # a bundle: several keys at once
                if not v or not all(isinstance(k, str) and "." in k for k in v):
                    raise SweepError(f"{where}.axes.{name}: a mapping value needs dotted keys, got {v!r}")
                opts.append(dict(v))
            else:
                if "." not in name:
                    raise SweepError(f"{where}.axes.{name}: not a dotted recipe key (a.b), and its value "
                                     f"{v!r} is not a mapping of dotted keys")
                opts.append({name: v})
        choices.append(opts)
    out = []
    for combo in itertools.product(*choices):
        pt: dict[str, Any] = {}
        for part in combo:
            for k in part:
                if k in pt:
                    raise SweepError(f"{where}: key {k} is set by two axes")
            pt.update(part)
        out.append(pt)
    return out


def _group_name(point: dict[str, str], ambiguous: set[str]) -> str:
    parts = []
    for k, v in point.items():
        short = k.rsplit(".", 1)[-1]
        parts.append(f"{k if short in ambiguous else short}={v}")
    name = ",".join(parts) or "base"
    bad = sorted({c for c in name if not (c.isalnum() or c in "._=,+-")})
    if bad:
        raise SweepError(f"group name {name!r} has characters not allowed in a directory name: {bad}")
    return name


def _nested(dotted: dict[str, Any]) -> dict:
    """``{"a.b": v}`` -> ``{"a": {"b": v}}``: overrides as a recipe layer (typed values, no text encoding)."""
    out: dict = {}
    for k, v in dotted.items():
        *parents, last = k.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SweepError(f"override {k}: {p} is set to a value and used as a section")
        node[last] = v
    return out


def load_grid(path, seeds: list[int]) -> list[RunSpec]:
    """The grid file's runs, each validated as a recipe now (a typo fails before any run starts)."""
    from megatron_a3po.config import RecipeError, load_recipe

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SweepError(f"--grid {path}: cannot read: {e}") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: cannot parse YAML: {e}") from None
    try:
        grid = _Grid.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()]
        raise SweepError(f"{path}: invalid grid\n" + "\n".join(lines)) from None
    if not seeds:
        raise SweepError("--seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds: a seed given twice: {seeds}")
    recipe = grid.recipe
    rp = Path(recipe)
    if rp.suffix in (".yaml", ".yml"):  # a path: relative to the grid file if not found from here
        if not rp.is_absolute() and not rp.exists() and (path.parent / rp).exists():
            rp = path.parent / rp
        recipe = str(rp.resolve())  # the trainer runs in the repository root
    common = dict(grid.overrides)
    if "trainer.seed" in common:
        raise SweepError(f"{path}: overrides.trainer.seed: seeds come from --seeds")
    blocks = []
    for i, b in enumerate(grid.blocks):
        pts = _points(b, f"{path}: blocks.{i}")
        for pt in pts:
            if "trainer.seed" in pt or "trainer.seed" in b.overrides:
                raise SweepError(f"{path}: blocks.{i}: trainer.seed is an axis; seeds come from --seeds")
        blocks.append((b, pts))
    keys = list(dict.fromkeys(k for _, pts in blocks for pt in pts for k in pt))
    shorts = [k.rsplit(".", 1)[-1] for k in keys]
    ambiguous = {s for s in shorts if shorts.count(s) > 1}
    runs, seen = [], {}
    for i, (b, pts) in enumerate(blocks):
        for pt in pts:
            shown = {k: _text(v) for k, v in pt.items()}
            group = _group_name(shown, ambiguous)
            if group in seen and seen[group] != shown:
                raise SweepError(f"{path}: two grid points are both named {group!r}")
            seen[group] = shown
            for seed in seeds[: b.seeds or len(seeds)]:
                extra = {k: v.replace("{seed}", str(seed)) if isinstance(v, str) else v for k, v in b.overrides.items()}
                ov = {**common, **extra, **pt, "trainer.seed": seed}
                if any(r.group == group and r.seed == seed for r in runs):
                    continue  # the same point in two blocks: one run
                try:
                    rec = load_recipe(recipe, layers=[_nested(ov)])
                except RecipeError as e:
                    raise SweepError(f"{path}: run {group}/seed{seed}: {e}") from None
                d = rec.model_dump()
                cfg = {}
                for name, dotted in CONFIG_KEYS.items():
                    x = d
                    for part in dotted.split("."):
                        x = x[part]
                    cfg[name] = x
                runs.append(RunSpec(group, seed, grid.recipe, {k: _text(v) for k, v in ov.items()}, shown, cfg,
                                    recipe_obj=rec))
    return runs


# ------------------------------------------------------------------ one run's summary
def read_steps(path: Path) -> dict[int, dict]:
    """steps.jsonl -> {step: stats}; a step logged twice (a resumed run) keeps its last record."""
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out[int(rec["step"])] = rec["stats"]
        except (ValueError, KeyError, TypeError) as e:
            raise SweepError(f"{path}:{n}: not a step record: {e}") from None
    return dict(sorted(out.items()))


# kept per step besides what tools/report draws: what a later look at a run's end (an entropy collapse,
# the behaviour-weight cap, the trust region) needs
EXTRA_TAGS = [M.PREFIX + k for k in (M.CLIP_FRAC, M.BEHAVE_W_MAX, M.BEHAVE_W_CAPPED_FRAC, M.APPROX_KL,
                                     M.GRAD_NORM)]


def curve_tags(stats_keys) -> list[str]:
    """The tags a summary keeps per step: what tools/report draws and tabulates, EXTRA_TAGS, and metrics
    mode's approximation errors."""
    tags = [t for _, _, series in COMPARISONS.values() for t, _ in series] + [t for t, _ in HEADLINES.values()]
    tags += EXTRA_TAGS
    tags += sorted(M.PREFIX + k for k in stats_keys if k.startswith("approx_err/"))
    return list(dict.fromkeys(tags))


def run_data(name: str, run_dir: Path, steps: dict[int, dict], group: str | None = None) -> RunData:
    """steps.jsonl records as tools/report's RunData: tag = train/<key>, step = record step - 1 (the
    0-based step the trainer gives TensorBoard)."""
    keys = {k for st in steps.values() for k, v in st.items() if isinstance(v, (int, float))}
    scalars = {}
    for tag in curve_tags(keys):
        key = tag[len(M.PREFIX):]
        pts = [(s - 1, float(st[key])) for s, st in steps.items()
               if isinstance(st.get(key), (int, float)) and not isinstance(st.get(key), bool)]
        if pts:
            scalars[tag] = pts
    return RunData(name, run_dir, scalars, group=group)


def _sig(x: float) -> float:
    return float(f"{x:.6g}")


def build_summary(spec: RunSpec, run_dir: Path, elapsed_s: float) -> dict:
    steps = read_steps(run_dir / "steps.jsonl")
    want = int(spec.config.get("steps", 0))
    if sorted(steps) != list(range(1, want + 1)):
        raise SweepError(f"{run_dir}/steps.jsonl: steps {min(steps, default=None)}..{max(steps, default=None)} "
                         f"({len(steps)} records), expected 1..{want}")
    rd = run_data(spec.rel, run_dir, steps, group=spec.group)
    all_steps = sorted(s - 1 for s in steps)
    series = {}
    for tag, pts in rd.scalars.items():
        by = dict(pts)
        series[tag] = [(_sig(by[s]) if s in by else None) for s in all_steps]
    trainer = {}
    tp = run_dir / "summary.json"
    if tp.exists():
        t = json.loads(tp.read_text())
        trainer = {k: v for k, v in t.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        trainer["rollout"] = {k: v for k, v in (t.get("rollout") or {}).items() if isinstance(v, (int, float))}
    return {"schema": SUMMARY_SCHEMA, "group": spec.group, "seed": spec.seed, "recipe": spec.recipe,
            "overrides": spec.overrides, "point": spec.point, "config": spec.config,
            "headline": rd.headlines(), "trainer_summary": trainer, "wall_s": elapsed_s,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "curves": {"steps": all_steps, "series": series}}


# ------------------------------------------------------------------ the loop
def finished(spec: RunSpec, run_dir: Path) -> bool:
    """True if ``run_dir`` holds this run's summary; an error if it holds another run's."""
    p = run_dir / SUMMARY_FILE
    if not p.is_file():
        return False
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return False  # not ours / unreadable: rerun
    if (d.get("recipe"), d.get("overrides")) != (spec.recipe, spec.overrides):
        raise SweepError(f"{run_dir} finished with other settings (recipe {d.get('recipe')!r}, overrides "
                         f"{d.get('overrides')}); this grid wants {spec.recipe!r}, {spec.overrides}. Remove "
                         "the directory or use another --out.")
    return True


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(A3PO_NO_PROGRESS="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Sweep:
    def __init__(self, runs: list[RunSpec], out, *, parallel: int = 1, timeout_s: float | None = None,
                 log=print):
        self.runs, self.out, self.parallel, self.timeout_s, self.log = runs, Path(out), parallel, timeout_s, log
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stop = False

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / spec.group / f"seed{spec.seed}"

    def _one(self, spec: RunSpec) -> dict:
        try:
            return self._run_one(spec)
        except Exception as e:  # noqa: BLE001 - one run's trouble (a full disk, ...) must not stop the others
            return {"run": spec.rel, "status": "failed", "rc": None, "error": f"{type(e).__name__}: {e}"}

    def _run_one(self, spec: RunSpec) -> dict:
        d = self.run_dir(spec)
        if d.exists():
            shutil.rmtree(d)  # an unfinished run (finished ones never get here): start it over
        d.mkdir(parents=True)
        atomic_write_text(d / RECIPE_FILE, recipe_yaml(spec.recipe_obj, f"tools.sweep: run {spec.rel} of {spec.recipe}"))
        t0 = time.perf_counter()
        with open(d / "train.log", "w") as logf:
            with self._lock:
                if self._stop:
                    return {"run": spec.rel, "status": "cancelled"}
                # same process group: a Ctrl-C reaches the runs too (and the handler in run() stops them)
                proc = subprocess.Popen(spec.argv(d), cwd=ROOT, env=child_env(), stdout=logf,
                                        stderr=subprocess.STDOUT)
                self._procs.add(proc)
            try:
                rc = proc.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                _terminate(proc)
                rc = "timeout"
            finally:
                with self._lock:
                    self._procs.discard(proc)
        wall = time.perf_counter() - t0
        if rc != 0:
            tail = (d / "train.log").read_text(errors="replace")[-1500:]
            return {"run": spec.rel, "status": "failed", "rc": rc, "wall_s": wall, "log_tail": tail}
        try:
            summary = build_summary(spec, d, wall)
        except (SweepError, OSError, ValueError) as e:
            return {"run": spec.rel, "status": "failed", "rc": 0, "wall_s": wall, "error": str(e)}
        atomic_write_text(d / SUMMARY_FILE, json.dumps(summary))  # the finished marker (compact: committed)
        return {"run": spec.rel, "status": "done", "wall_s": wall,
                "final_reward": summary["headline"]["final reward"]}

    def run(self) -> list[dict]:
        todo, results = [], []
        for spec in self.runs:
            if finished(spec, self.run_dir(spec)):
                results.append({"run": spec.rel, "status": "skipped (finished)"})
            else:
                todo.append(spec)
        self.log(f"sweep: {len(self.runs)} runs, {len(results)} finished already, {len(todo)} to run, "
                 f"{self.parallel} at a time -> {self.out}")
        t0 = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=self.parallel)
        futs = [(s, pool.submit(self._one, s)) for s in todo]
        try:
            for i, (spec, f) in enumerate(futs, 1):
                r = f.result()
                results.append(r)
                extra = (f", final reward {r['final_reward']:.3f}" if r.get("final_reward") is not None else
                         f", rc {r.get('rc')} {r.get('error', '')}" if r["status"] == "failed" else "")
                self.log(f"[{i}/{len(todo)}] {spec.rel}: {r['status']} ({r.get('wall_s', 0):.0f} s{extra})")
        except KeyboardInterrupt:
            with self._lock:
                self._stop = True
                procs = list(self._procs)
            for p in procs:
                _terminate(p)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        write_json_atomic(self.out / "sweep.json", {"runs": results, "wall_s": time.perf_counter() - t0})
        return results


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM the run (its engines die with it: PR_SET_PDEATHSIG), SIGKILL if it lingers."""
    from megatron_a3po.platform.procs import stop_process

    stop_process(proc, timeout=30)


def export(runs: list[RunSpec], out: Path, dest: Path) -> int:
    """Copy the finished runs' summaries to DEST/<group>/seed<k>/run_summary.json; returns how many."""
    n = 0
    for spec in runs:
        src = out / spec.group / f"seed{spec.seed}" / SUMMARY_FILE
        if src.is_file():
            atomic_write_text(dest / spec.group / f"seed{spec.seed}" / SUMMARY_FILE, src.read_text())
            n += 1
    return n


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SweepError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.sweep", description=__doc__.splitlines()[0],
                                 epilog="See the module docstring (tools/sweep/sweep.py) for the grid format.")
    ap.add_argument("--grid", required=True, help="grid YAML file")
    ap.add_argument("--seeds", required=True, help="comma-separated trainer.seed values, e.g. 0,1,2")
    ap.add_argument("--out", required=True, help="root of the run directories")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time (2 on a 2-core machine)")
    ap.add_argument("--run-timeout", type=float, default=None, help="seconds before a run is killed")
    ap.add_argument("--export", default=None, help="copy finished runs' summaries here (to commit)")
    ap.add_argument("--list", action="store_true", help="print the runs and their commands; run nothing")
    args = ap.parse_args(argv)
    try:
        if args.parallel < 1:
            raise SweepError(f"--parallel must be >= 1, got {args.parallel}")
        runs = load_grid(args.grid, _seeds(args.seeds))
        out = Path(args.out)
        if args.list:
            for s in runs:
                print(f"{s.rel}: {' '.join(s.argv(out / s.rel)[1:])}")
            print(f"{len(runs)} runs in {len({s.group for s in runs})} groups")
            return 0
        signal.signal(signal.SIGTERM, _interrupt)  # kill / a job scheduler: stop the runs, like Ctrl-C
        signal.signal(signal.SIGINT, _interrupt)  # also when started in the background (SIGINT ignored)
        try:
            results = Sweep(runs, out, parallel=args.parallel, timeout_s=args.run_timeout).run()
        except KeyboardInterrupt:
            print("sweep: interrupted; its runs were stopped (rerun the same command to continue)", file=sys.stderr)
            return 130
        if args.export:
            print(f"exported {export(runs, out, Path(args.export))} run summaries to {args.export}")
    except A3POError as e:  # a SweepError, or any other error of ours on the way
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    failed = [r for r in results if r["status"] == "failed"]
    for r in failed:
        print(f"FAILED {r['run']} (rc {r.get('rc')}): {r.get('error') or r.get('log_tail', '')[-600:]}",
              file=sys.stderr)
    return 1 if failed else 0
