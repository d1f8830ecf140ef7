"""Read 2+ runs (TensorBoard event files, or a sweep's per-run summaries) and write the comparison
figures and a headline table, one curve / one row per group of runs.

Groups. Runs with the same overrides and different seeds are one group: with ``--runs`` the runs given
the same NAME (``--runs a3po=runs/s0 a3po=runs/s1``), with ``--sweep`` the runs of one grid point (their
``group``, see tools/sweep). A figure draws each group's mean over its runs at every step (over the runs
that logged that step) and, for a group of 2+ runs, a band from the minimum to the maximum of those
runs. The table gives each headline number of a group as mean +- std over its runs (sample std,
ddof 1; a group of one run shows the plain value).

Figures (PNG, one per comparison, every group on the same axes; x = training step, 0-based as logged):
  prox_logp_time.png   proximal log-prob time per step     train/time/prox_logp
  total_time.png       wall-clock time since start          train/time/elapsed
  entropy.png          policy entropy                       train/entropy/mean
  importance_weight.png  importance weight max and min      train/ratio/max, train/ratio/min
  clipped_tokens.png   clipped tokens per step              train/clip/count
  reward.png           mean reward                          train/reward/mean
  staleness.png        mean staleness of trained tokens     train/staleness/mean
  eval_accuracy.png    held-out eval accuracy (x = the evaluated version)       eval/accuracy
  final_reward_vs_staleness.png  (only when the runs carry their config, i.e. --sweep) a group's final
                       reward (mean, min-max bar) against rollout.max_staleness, a line per mode and
                       eps_clip
Table (summary.md, also summary.json with every run's numbers): per group, the mean proximal time per
step, the total training time (last train/time/elapsed), the final reward (mean train/reward/mean over
the last 20 logged steps, all of them if fewer), the mean reward over all logged steps, the stability
(see ``max_drop``), and the means over all logged steps of entropy, max / min importance weight,
clipped tokens and staleness, and the final and best held-out eval accuracy (eval/accuracy). A tag a run
did not log shows as "n/a" in the table, with a note naming the tag; in a figure that run is simply absent
(and a figure no run has data for says so).

When a tag has several values for one step (a resumed run), the one written last wins.
Nothing is written unless every run loads: files go to a temp directory first and are then moved
into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from megatron_a3po import metrics as M
from megatron_a3po.errors import A3POError


def _t(name: str) -> str:
    return M.PREFIX + name


TAG_PROX = _t(M.TIME_PROX)
TAG_ELAPSED = _t(M.TIME_TOTAL)
TAG_ENTROPY = _t(M.ENTROPY)
TAG_RMAX = _t(M.RATIO_MAX)
TAG_RMIN = _t(M.RATIO_MIN)
TAG_CLIP = _t(M.CLIP_COUNT)
TAG_REWARD = _t(M.REWARD_MEAN)
TAG_STALE = _t(M.STALENESS_MEAN)
TAG_EVAL = M.EVAL_ACCURACY  # written without the train/ prefix, at step = the evaluated version

# file -> (title, y label, [(tag, line label suffix)])
COMPARISONS = {
    "prox_logp_time.png": ("Proximal log-prob time per step", "seconds", [(TAG_PROX, "")]),
    "total_time.png": ("Total training time", "seconds since start", [(TAG_ELAPSED, "")]),
    "entropy.png": ("Policy entropy", "nats / token", [(TAG_ENTROPY, "")]),
    "importance_weight.png": ("Importance weight pi_theta / pi_prox", "ratio",
                              [(TAG_RMAX, " max"), (TAG_RMIN, " min")]),
    "clipped_tokens.png": ("Clipped tokens per step", "tokens", [(TAG_CLIP, "")]),
    "reward.png": ("Mean reward", "reward", [(TAG_REWARD, "")]),
    "staleness.png": ("Mean staleness of trained tokens", "policy versions", [(TAG_STALE, "")]),
    "eval_accuracy.png": ("Held-out eval accuracy", "accuracy", [(TAG_EVAL, "")]),
}

WINDOW = 20  # steps: the final-reward window and the stability smoothing window

# column -> (tag, reduction); reductions: see reduce_series
HEADLINES = {
    "mean prox time (s/step)": (TAG_PROX, "mean"),
    "total time (s)": (TAG_ELAPSED, "last"),
    "final reward": (TAG_REWARD, "last_window"),
    "mean reward": (TAG_REWARD, "mean"),
    "stability (max drop)": (TAG_REWARD, "max_drop"),
    "mean entropy": (TAG_ENTROPY, "mean"),
    "mean max IW": (TAG_RMAX, "mean"),
    "mean min IW": (TAG_RMIN, "mean"),
    "mean clipped tokens": (TAG_CLIP, "mean"),
    "mean staleness": (TAG_STALE, "mean"),
    "final eval accuracy": (TAG_EVAL, "last"),
    "best eval accuracy": (TAG_EVAL, "max"),
}


class ReportError(A3POError, ValueError):
    pass


def max_drop(values, window: int = WINDOW) -> float:
    """Stability of a reward curve: the largest drop from the running best of its smoothed value.

    With r_1..r_n the per-step rewards and w = min(window, n), the smoothed reward at step t >= w is the
    trailing mean m_t = (r_{t-w+1} + ... + r_t) / w; the running best is B_t = max(m_w, ..., m_t); the
    stability is max over t of (B_t - m_t): 0 for a curve whose 20-step mean never falls, otherwise how
    far (in reward) it fell below the best it had reached, at its worst. Lower is more stable.
    """
    vals = list(values)
    if not vals:
        raise ValueError("max_drop of an empty series")
    w = min(window, len(vals))
    best, worst = -math.inf, 0.0
    for t in range(w, len(vals) + 1):
        m = math.fsum(vals[t - w:t]) / w
        best = max(best, m)
        worst = max(worst, best - m)
    return worst


def reduce_series(values: list[float], how: str) -> float:
    """mean (all values), last (the last value), last_window (mean of the last WINDOW values, all if
    fewer), max (the largest value), max_drop (see ``max_drop``)."""
    if how == "last":
        return values[-1]
    if how == "max":
        return max(values)
    if how == "last_window":
        values = values[-WINDOW:]
    elif how == "max_drop":
        return max_drop(values)
    elif how != "mean":
        raise ValueError(f"unknown reduction {how!r}")
    return math.fsum(values) / len(values)


@dataclass
class RunData:
    name: str
    logdir: Path
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tag -> sorted (step, value)
    group: str | None = None  # runs with the same group form one curve / one table row (None: the name)
    config: dict = field(default_factory=dict)  # e.g. mode, eps_clip, max_staleness, seed (sweep runs)

    def __post_init__(self):
        if self.group is None:
            self.group = self.name

    def series(self, tag):
        return self.scalars.get(tag, [])

    def headline(self, tag: str, how: str) -> float | None:
        s = self.series(tag)
        return reduce_series([v for _, v in s], how) if s else None

    def headlines(self) -> dict[str, float | None]:
        return {col: self.headline(tag, how) for col, (tag, how) in HEADLINES.items()}


@dataclass
class Group:
    name: str
    runs: list[RunData]

    @property
    def config(self) -> dict:
        """The config keys every run of the group shares (the seed is not one of them)."""
        keys = set.intersection(*(set(r.config) for r in self.runs))
        return {k: self.runs[0].config[k] for k in sorted(keys)
                if all(r.config[k] == self.runs[0].config[k] for r in self.runs)}

    def stat(self, col: str) -> dict | None:
        """mean, std (sample, 0 for one run), min, max and the values of a headline column over the
        runs that have it; None if none has."""
        vals = [v for v in (r.headlines()[col] for r in self.runs) if v is not None]
        if not vals:
            return None
        return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "min": min(vals), "max": max(vals), "n": len(vals), "values": vals}

    def band(self, tag: str) -> list[tuple[int, float, float, float]] | None:
        """(step, mean, min, max) over the runs that logged ``tag`` at that step; None if none did."""
        per_step: dict[int, list[float]] = {}
        for r in self.runs:
            for step, v in r.series(tag):
                per_step.setdefault(step, []).append(v)
        if not per_step:
            return None
        return [(s, statistics.fmean(v), min(v), max(v)) for s, v in sorted(per_step.items())]


def group_runs(runs: list[RunData]) -> list[Group]:
    """Runs grouped by ``RunData.group``, groups in the order of their first run."""
    groups: dict[str, Group] = {}
    for r in runs:
        groups.setdefault(r.group, Group(r.group, [])).runs.append(r)
    return list(groups.values())


def load_run(name: str, logdir) -> RunData:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = Path(logdir)
    if not logdir.is_dir():
        raise ReportError(f"run {name!r}: log directory {logdir} not found")
    dirs = sorted({p.parent for p in logdir.rglob("events.out.tfevents.*") if p.is_file()})
    if not dirs:
        raise ReportError(f"run {name!r}: no TensorBoard event files (events.out.tfevents.*) under {logdir}")
    merged: dict[str, dict[int, tuple[float, float]]] = {}
    for d in dirs:
        try:
            acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
            acc.Reload()
            tags = acc.Tags().get("scalars", [])
        except Exception as e:  # noqa: BLE001 - corrupt event file
            raise ReportError(f"run {name!r}: cannot read TensorBoard events in {d}: {e}") from None
        for tag in tags:
            per_step = merged.setdefault(tag, {})
            for ev in acc.Scalars(tag):
                old = per_step.get(ev.step)
                if old is None or ev.wall_time >= old[0]:
                    per_step[ev.step] = (ev.wall_time, float(ev.value))
    scalars = {tag: sorted((s, v) for s, (_, v) in d.items()) for tag, d in merged.items()}
    return RunData(name, logdir, scalars)


def parse_runs(items: list[str]) -> list[tuple[str, str]]:
    """NAME=LOGDIR items; a NAME given more than once is a group (e.g. seeds), a LOGDIR only once."""
    out, seen = [], set()
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise ReportError(f"--runs {it!r}: expected NAME=LOGDIR")
        key = str(Path(path).resolve())
        if key in seen:
            raise ReportError(f"--runs: log directory {path} given twice")
        seen.add(key)
        out.append((name, path))
    return out


SUMMARY_FILE = "run_summary.json"  # tools/sweep's per-run summary: the sweep's finished marker too
SUMMARY_SCHEMA = "a3po.sweep.run/1"


def load_sweep(root) -> list[RunData]:
    """Every ``run_summary.json`` under ``root`` (a sweep's --out, or its --export copy), as runs."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"--sweep {root}: not a directory")
    files = sorted(root.rglob(SUMMARY_FILE))
    if not files:
        raise ReportError(f"--sweep {root}: no {SUMMARY_FILE} under it (run python -m tools.sweep first)")
    runs = []
    for f in files:
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ReportError(f"{f}: cannot read: {e}") from None
        if not isinstance(d, dict) or d.get("schema") != SUMMARY_SCHEMA:
            raise ReportError(f"{f}: not a sweep run summary (schema {SUMMARY_SCHEMA!r})")
        try:
            steps, series = d["curves"]["steps"], d["curves"]["series"]
            scalars = {tag: [(int(s), float(v)) for s, v in zip(steps, vals, strict=True) if v is not None]
                       for tag, vals in series.items()}
            runs.append(RunData(f"{d['group']}/seed{d['seed']}", f.parent, scalars, group=d["group"],
                                config=dict(d.get("config") or {}, seed=d["seed"])))
        except (KeyError, TypeError, ValueError) as e:
            raise ReportError(f"{f}: malformed run summary: {type(e).__name__}: {e}") from None
    return runs


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6g}"


def _fmt_stat(st: dict | None) -> str:
    if st is None:
        return "n/a"
    return _fmt(st["mean"]) if st["n"] == 1 else f"{st['mean']:.4g} ± {st['std']:.2g}"


def summary_rows(runs: list[RunData]) -> tuple[list[dict], list[str]]:
    """Per run: its headline numbers (None: tag not logged), and notes naming the missing tags."""
    rows, notes = [], []
    for r in runs:
        row = {"run": r.name, "group": r.group, "steps": max((len(s) for s in r.scalars.values()), default=0)}
        row.update(r.headlines())
        if r.config:
            row["config"] = r.config
        missing = [tag for col, (tag, _) in HEADLINES.items() if row[col] is None]
        if missing:
            notes.append(f"{r.name}: no data for {', '.join(dict.fromkeys(missing))}")
        rows.append(row)
    return rows, notes


def group_rows(groups: list[Group]) -> list[dict]:
    """Per group: its runs, its shared config and, per headline column, mean/std/min/max/values."""
    return [{"group": g.name, "runs": [r.name for r in g.runs], "config": g.config,
             "steps": max((len(s) for r in g.runs for s in r.scalars.values()), default=0),
             **{col: g.stat(col) for col in HEADLINES}} for g in groups]


def summary_markdown(groups: list[Group], notes) -> str:
    cols = ["group", "runs", *HEADLINES, "steps"]
    lines = ["# Run comparison", "",
             "One row per group of runs (the same overrides, different seeds): mean ± std over its runs "
             "(sample std). Means are over all logged steps; total time is the last `train/time/elapsed`; "
             f"final reward is the mean `train/reward/mean` over the last {WINDOW} logged steps; stability "
             f"is the largest drop of the {WINDOW}-step mean reward below its running best (lower is "
             "steadier); final / best eval accuracy are the last / highest `eval/accuracy` (held-out set). "
             "IW = importance weight pi_theta / pi_prox. Figures: each group's mean over its runs, with a "
             "min-max band.", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for g, row in zip(groups, group_rows(groups)):
        cells = [g.name, str(len(g.runs))] + [_fmt_stat(row[c]) for c in HEADLINES] + [str(row["steps"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Runs:", ""] + [f"- {r.name}: `{r.logdir}`" for g in groups for r in g.runs]
    if notes:
        lines += ["", "Missing tags (n/a above):", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot (headless); without matplotlib, exits naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: tools.report draws its figures with matplotlib, which is not installed: "
                         "pip install 'megatron-a3po[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axes():
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    return plt, fig, ax


def _save(plt, fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot(path: Path, title: str, ylabel: str, series, groups: list[Group]) -> None:
    """One comparison: per group and tag, the mean over its runs, and a min-max band for 2+ runs."""
    plt, fig, ax = _axes()
    drawn, missing = 0, []
    for i, g in enumerate(groups):
        color = f"C{i % 10}"
        for tag, suffix in series:
            b = g.band(tag)
            if b is None:
                missing.append(f"{g.name}{suffix}")
                continue
            steps, mean, lo, hi = zip(*b)
            n = len(g.runs)
            ax.plot(steps, mean, color=color, linestyle="--" if suffix.strip() == "min" else "-",
                    label=f"{g.name}{suffix}" + (f" (mean of {n}, min-max band)" if n > 1 else ""), linewidth=1.4)
            if n > 1:
                ax.fill_between(steps, lo, hi, color=color, alpha=0.18, linewidth=0)
            drawn += 1
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no run logged " + ", ".join(t for t, _ in series), ha="center", va="center",
                transform=ax.transAxes)
    if missing and drawn:
        ax.text(0.01, 0.01, "missing: " + ", ".join(missing), fontsize=7, transform=ax.transAxes, color="gray")
    _save(plt, fig, ax, path, title, "training step", ylabel)


def final_reward_points(groups: list[Group]) -> dict[tuple[str, object], list[tuple[int, dict]]]:
    """(mode, eps_clip) -> [(max_staleness, final-reward stat)] for the groups whose runs carry a mode
    and a max_staleness in their config, sorted by staleness."""
    lines: dict[tuple[str, object], list[tuple[int, dict]]] = {}
    for g in groups:
        c = g.config
        st = g.stat("final reward")
        if "mode" in c and "max_staleness" in c and st is not None:
            lines.setdefault((c["mode"], c.get("eps_clip")), []).append((int(c["max_staleness"]), st))
    return {k: sorted(v, key=lambda x: x[0]) for k, v in sorted(lines.items(), key=lambda kv: str(kv[0]))}


def plot_final_vs_staleness(path: Path, groups: list[Group]) -> bool:
    """Final reward (mean over the group's runs, min-max bar) vs max_staleness; False if no run has the
    config to place it (then nothing is written)."""
    lines = final_reward_points(groups)
    if not lines:
        return False
    plt, fig, ax = _axes()
    modes = list(dict.fromkeys(m for m, _ in lines))
    clips = list(dict.fromkeys(e for _, e in lines))
    for (mode, eps), pts in lines.items():
        xs = [x for x, _ in pts]
        mean = [st["mean"] for _, st in pts]
        err = [[st["mean"] - st["min"] for _, st in pts], [st["max"] - st["mean"] for _, st in pts]]
        ax.errorbar(xs, mean, yerr=err, color=f"C{modes.index(mode) % 10}", capsize=3, marker="o",
                    linestyle=["-", "--", ":", "-."][clips.index(eps) % 4],
                    label=mode + ("" if eps is None else f", eps_clip {eps}"))
    ax.set_xticks(sorted({x for pts in lines.values() for x, _ in pts}))
    ax.legend(fontsize=8)
    _save(plt, fig, ax, path, f"Final reward (last {WINDOW} steps) vs staleness: mean over seeds, min-max",
          "rollout.max_staleness", "reward")
    return True


def build_report(runs: list[RunData], out) -> list[Path]:
    out = Path(out)
    if len(runs) < 2:
        raise ReportError(f"give at least 2 runs to compare (got {len(runs)})")
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    rows, notes = summary_rows(runs)
    groups = group_runs(runs)
    tmp = Path(tempfile.mkdtemp(prefix=".report-tmp-", dir=out))
    try:
        for fname, (title, ylabel, series) in COMPARISONS.items():
            plot(tmp / fname, title, ylabel, series, groups)
        plot_final_vs_staleness(tmp / "final_reward_vs_staleness.png", groups)
        (tmp / "summary.md").write_text(summary_markdown(groups, notes))
        (tmp / "summary.json").write_text(json.dumps({"groups": group_rows(groups), "runs": rows, "notes": notes},
                                                     indent=2))
        written = []
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
            written.append(out / f.name)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=[], metavar="NAME=LOGDIR",
                    help="TensorBoard runs; the same NAME twice or more = one group (e.g. seeds)")
    ap.add_argument("--sweep", nargs="+", default=[], metavar="DIR",
                    help="directories holding tools/sweep run summaries (run_summary.json, searched recursively)")
    ap.add_argument("--out", required=True, help="output directory (figures, summary.md, summary.json)")
    args = ap.parse_args(argv)
    try:
        runs = [load_run(n, p) for n, p in parse_runs(args.runs)]
        for d in args.sweep:
            runs += load_sweep(d)
        written = build_report(runs, args.out)
    except A3POError as e:  # a ReportError, or any other error of ours on the way
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for w in written:
        print(w)
    return 0
