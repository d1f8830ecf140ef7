"""Paired comparison of two modes run on the same schedules (docs/benchmarks.md, "Paired").

    python -m tools.report.paired --sweep docs/fidelity/paired --a mode=loglinear --b mode=recompute \\
        --out docs/figures/paired

The runs are tools/sweep summaries (``run_summary.json``). A run belongs to side A or B by the
``key=value`` pairs of its group name (``--a`` / ``--b``); an A run and a B run with the same
``max_staleness`` and seed are a pair (in the study, B replayed the schedule A recorded: the same groups,
prompts, token versions and sampling seeds). Per max_staleness and headline metric (final reward: mean
over the last 20 steps; mean reward: over all steps), with n pairs and d = A - B per pair:

* the means of A and B, the mean difference, its standard error from the pairs, ``sd(d) / sqrt(n)``
  (paired), and the one independent runs with the same spreads would give, ``sqrt(sd(A)^2/n +
  sd(B)^2/n)`` (unpaired), their ratio, and the correlation of A and B over the pairs;
* the 95% interval of the difference (Student t with n - 1 degrees of freedom) and whether it excludes 0;
* the number of pairs (and of independent runs per side) that would resolve 2% of B's mean with a
  two-sided 5% test at 80% power: ``n = ((1.96 + 0.84) * s / (0.02 * mean B))^2`` with s = sd(d) paired,
  ``sqrt(sd(A)^2 + sd(B)^2)`` unpaired (per side).

Writes ``summary.md``, ``summary.json`` and ``paired_final_reward.png`` (each pair's final rewards, A
against B, per max_staleness) under --out (temp dir, then moved).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from megatron_a3po.errors import A3POError
from tools.report.report import ReportError, load_sweep, pyplot

METRICS = ("final reward", "mean reward")
Z_ALPHA, Z_POWER = 1.959964, 0.841621  # two-sided 5%, 80% power
REL = 0.02  # the paper's claim: A-3PO within 2% of recompute's reward
# Student t, 97.5% quantile, by degrees of freedom (1..30); above 30 the normal's 1.96 is within 2%
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def _match(group: str, want: dict[str, str]) -> bool:
    kv = dict(p.split("=", 1) for p in group.split(",") if "=" in p)
    return all(kv.get(k) == v for k, v in want.items())


def _sel(text: str) -> dict[str, str]:
    try:
        return dict(p.split("=", 1) for p in text.split(","))
    except ValueError:
        raise ReportError(f"{text!r}: expected key=value[,key=value]") from None


def pairs(runs, a: dict, b: dict) -> dict[int, list[tuple]]:
    """max_staleness -> [(seed, run A, run B)] for every seed both sides have."""
    side = {}
    for r in runs:
        which = "a" if _match(r.group, a) else "b" if _match(r.group, b) else None
        if which is None:
            continue
        key = (r.config.get("max_staleness"), r.config["seed"])
        if (which, key) in side:
            raise ReportError(f"two {which.upper()} runs for max_staleness {key[0]}, seed {key[1]}: {r.logdir}")
        side[(which, key)] = r
    out: dict[int, list[tuple]] = {}
    for (which, key), r in sorted(side.items(), key=lambda x: (x[0][1], x[0][0])):
        if which == "a" and ("b", key) in side:
            out.setdefault(key[0], []).append((key[1], r, side[("b", key)]))
    if not out:
        raise ReportError("no pairs: no A run and B run share a max_staleness and a seed")
    return out


def _n_needed(s: float, target: float) -> int:
    return math.ceil(((Z_ALPHA + Z_POWER) * s / target) ** 2) if target > 0 else 0


def paired_stats(xa: list[float], xb: list[float]) -> dict:
    n = len(xa)
    d = [x - y for x, y in zip(xa, xb)]
    sa, sb, sd = (statistics.stdev(v) if n > 1 else float("nan") for v in (xa, xb, d))
    ma, mb, md = statistics.fmean(xa), statistics.fmean(xb), statistics.fmean(d)
    se_p, se_u = sd / math.sqrt(n), math.sqrt((sa * sa + sb * sb) / n)
    t = T975[n - 2] if 2 <= n <= 31 else 1.96
    corr = statistics.correlation(xa, xb) if n > 2 and sa > 0 and sb > 0 else float("nan")
    target = REL * abs(mb)
    return {"n": n, "mean_a": ma, "mean_b": mb, "sd_a": sa, "sd_b": sb, "diff_mean": md, "diff_sd": sd,
            "diff_rel": md / mb if mb else float("nan"), "se_paired": se_p, "se_unpaired": se_u,
            "se_ratio": se_p / se_u if se_u > 0 else float("nan"), "corr": corr,
            "ci95": [md - t * se_p, md + t * se_p], "significant": abs(md) > t * se_p,
            "n_for_2pct_paired": _n_needed(sd, target),
            "n_for_2pct_unpaired_per_side": _n_needed(math.sqrt(sa * sa + sb * sb), target),
            "pairs": [{"a": x, "b": y, "d": z} for x, y, z in zip(xa, xb, d)]}


def analyse(runs, a: dict, b: dict) -> dict:
    out = {}
    for ms, ps in sorted(pairs(runs, a, b).items()):
        row = {"seeds": [s for s, _, _ in ps]}
        for m in METRICS:
            xa = [ra.headlines()[m] for _, ra, _ in ps]
            xb = [rb.headlines()[m] for _, _, rb in ps]
            row[m] = paired_stats(xa, xb)
        out[ms] = row
    return out


def markdown(res: dict, a: dict, b: dict) -> str:
    an, bn = ",".join(f"{k}={v}" for k, v in a.items()), ",".join(f"{k}={v}" for k, v in b.items())
    lines = [f"A = {an}, B = {bn}; d = A - B per pair (same schedule, same seed)", "",
             "| max_staleness | metric | pairs | A | B | A - B (rel.) | paired SE | unpaired SE | SE ratio | corr(A, B) "
             "| 95% CI of A - B | pairs for 2% | runs per side for 2%, unpaired |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for ms, row in res.items():
        for m in METRICS:
            s = row[m]
            lines.append(f"| {ms} | {m} | {s['n']} | {s['mean_a']:.3f} ± {s['sd_a']:.3f} | {s['mean_b']:.3f} ± "
                         f"{s['sd_b']:.3f} | {s['diff_mean']:+.3f} ({100 * s['diff_rel']:+.1f}%) | {s['se_paired']:.3f} | "
                         f"{s['se_unpaired']:.3f} | {s['se_ratio']:.2f} | {s['corr']:.2f} | [{s['ci95'][0]:+.3f}, "
                         f"{s['ci95'][1]:+.3f}]{' *' if s['significant'] else ''} | {s['n_for_2pct_paired']} | "
                         f"{s['n_for_2pct_unpaired_per_side']} |")
    lines += ["", "A ± / B ±: mean ± sample std over the seeds. * : the 95% interval excludes 0. 'for 2%': pairs "
              "(runs per side) that resolve a difference of 2% of B's mean, two-sided 5% test, 80% power."]
    return "\n".join(lines) + "\n"


def plot(path: Path, res: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5), dpi=110)
    lo, hi = 1.0, 0.0
    for ms, row in res.items():
        ps = row["final reward"]["pairs"]
        ax.scatter([p["b"] for p in ps], [p["a"] for p in ps], label=f"max_staleness {ms}", s=28)
        lo = min([lo] + [min(p["a"], p["b"]) for p in ps])
        hi = max([hi] + [max(p["a"], p["b"]) for p in ps])
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--", label="A = B")
    ax.set_xlabel("recompute (B): final reward")
    ax.set_ylabel("A-3PO (A): final reward")
    ax.set_title("Paired runs (same schedule and seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.report.paired", description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", required=True, help="a directory of run_summary.json files (tools/sweep --export)")
    ap.add_argument("--a", default="mode=loglinear", help="group key=value pairs of side A")
    ap.add_argument("--b", default="mode=recompute", help="group key=value pairs of side B")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        a, b = _sel(args.a), _sel(args.b)
        res = analyse(load_sweep(args.sweep), a, b)
    except A3POError as e:  # a ReportError, or any other error of ours on the way
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".paired-", dir=out.parent))
    try:
        (tmp / "summary.md").write_text(markdown(res, a, b))
        (tmp / "summary.json").write_text(json.dumps({"a": a, "b": b, "by_max_staleness": res}, indent=1))
        plot(tmp / "paired_final_reward.png", res)
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
