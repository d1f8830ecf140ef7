"""Read the TensorBoard event files of 2+ runs and write the comparison figures and a headline table.

Figures (PNG, one per comparison, every run on the same axes; x = training step):
  prox_logp_time.png   proximal log-prob time per step     train/time/prox_logp
  total_time.png       wall-clock time since start          train/time/elapsed
  entropy.png          policy entropy                       train/entropy/mean
  importance_weight.png  importance weight max and min      train/ratio/max, train/ratio/min
  clipped_tokens.png   clipped tokens per step              train/clip/count
  reward.png           mean reward                          train/reward/mean
  staleness.png        mean staleness of trained tokens     train/staleness/mean
Table (summary.md, also summary.json): per run, the mean proximal time per step, the total training
time (last train/time/elapsed), the final reward (value at the last logged step), and the means over all
logged steps of entropy, max / min importance weight and clipped tokens. A tag a run did not log shows
as "n/a" in the table, with a note naming the tag; in a figure that run is simply absent (and a figure
no run has data for says so).

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
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from megatron_a3po import metrics as M


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
}

# column -> (tag, reduction)
HEADLINES = {
    "mean prox time (s/step)": (TAG_PROX, "mean"),
    "total time (s)": (TAG_ELAPSED, "last"),
    "final reward": (TAG_REWARD, "last"),
    "mean entropy": (TAG_ENTROPY, "mean"),
    "mean max IW": (TAG_RMAX, "mean"),
    "mean min IW": (TAG_RMIN, "mean"),
    "mean clipped tokens": (TAG_CLIP, "mean"),
}


class ReportError(ValueError):
    pass


@dataclass
class RunData:
    name: str
    logdir: Path
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tag -> sorted (step, value)

    def series(self, tag):
        return self.scalars.get(tag, [])

    def headline(self, tag: str, how: str) -> float | None:
        s = self.series(tag)
        if not s:
            return None
        if how == "last":
            return s[-1][1]
        return math.fsum(v for _, v in s) / len(s)


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
    out, seen = [], set()
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise ReportError(f"--runs {it!r}: expected NAME=LOGDIR")
        if name in seen:
            raise ReportError(f"--runs: run name {name!r} given twice")
        seen.add(name)
        out.append((name, path))
    if len(out) < 2:
        raise ReportError(f"--runs: give at least 2 runs to compare (got {len(out)})")
    return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6g}"


def summary_rows(runs: list[RunData]) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    for r in runs:
        row = {"run": r.name, "steps": max((len(s) for s in r.scalars.values()), default=0)}
        missing = []
        for col, (tag, how) in HEADLINES.items():
            row[col] = r.headline(tag, how)
            if row[col] is None:
                missing.append(tag)
        for tag in (TAG_STALE,):
            if not r.series(tag):
                missing.append(tag)
        if missing:
            notes.append(f"{r.name}: no data for {', '.join(dict.fromkeys(missing))}")
        rows.append(row)
    return rows, notes


def summary_markdown(runs: list[RunData], rows, notes) -> str:
    cols = ["run", *HEADLINES, "steps"]
    lines = ["# Run comparison", "",
             "Means are over all logged steps; total time is the last `train/time/elapsed`; final reward is "
             "`train/reward/mean` at the last logged step. IW = importance weight pi_theta / pi_prox.", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        cells = [row["run"]] + [_fmt(row[c]) for c in HEADLINES] + [str(row["steps"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Runs:", ""] + [f"- {r.name}: `{r.logdir}`" for r in runs]
    if notes:
        lines += ["", "Missing tags (n/a above):", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(path: Path, title: str, ylabel: str, series, runs: list[RunData]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    drawn, missing = 0, []
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        for tag, suffix in series:
            s = r.series(tag)
            if not s:
                missing.append(f"{r.name}{suffix}")
                continue
            steps, vals = zip(*s)
            ax.plot(steps, vals, color=color, linestyle="--" if suffix.strip() == "min" else "-",
                    label=f"{r.name}{suffix}", linewidth=1.4)
            drawn += 1
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no run logged " + ", ".join(t for t, _ in series), ha="center", va="center",
                transform=ax.transAxes)
    if missing and drawn:
        ax.text(0.01, 0.01, "missing: " + ", ".join(missing), fontsize=7, transform=ax.transAxes, color="gray")
    ax.set_title(title)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_report(runs: list[RunData], out) -> list[Path]:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    rows, notes = summary_rows(runs)
    tmp = Path(tempfile.mkdtemp(prefix=".report-tmp-", dir=out))
    try:
        for fname, (title, ylabel, series) in COMPARISONS.items():
            plot(tmp / fname, title, ylabel, series, runs)
        (tmp / "summary.md").write_text(summary_markdown(runs, rows, notes))
        (tmp / "summary.json").write_text(json.dumps({"runs": rows, "notes": notes}, indent=2))
        written = []
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
            written.append(out / f.name)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, metavar="NAME=LOGDIR")
    ap.add_argument("--out", required=True, help="output directory (figures, summary.md, summary.json)")
    args = ap.parse_args(argv)
    try:
        runs = [load_run(n, p) for n, p in parse_runs(args.runs)]
        written = build_report(runs, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in written:
        print(w)
    return 0
