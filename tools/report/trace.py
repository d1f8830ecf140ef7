"""Figures of one run's audit and staleness-bound trace, from its steps.jsonl (docs/benchmarks.md, "Audit").

    python -m tools.report.trace RUN_DIR --out docs/figures/audit --name fallback_lr1e-2 \\
        [--threshold 0.25] [--band 0.002,0.02]

``<name>_audit.png``: the audit's error per staleness bucket at every step it was measured (audit steps,
and every step of a recompute fallback), the threshold, the steps trained with recomputed log-probs
(shaded), and the reward. ``<name>_staleness.png``: the admission bound in force after every step, the
smoothed drift signal with the controller's band, and the mean staleness of the trained tokens.
``<name>_actions.md``: every action of the run's records (step, source, bucket, error, what was done).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_a3po import metrics as M
from tools.report.report import pyplot

BUCKET_COLORS = {"d1": "tab:gray", "d2": "tab:blue", "d3": "tab:orange", "d4+": "tab:red"}


def load(run_dir) -> list[dict]:
    p = Path(run_dir) / "steps.jsonl"
    if not p.is_file():
        raise SystemExit(f"error: {p}: no such file")
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def audit_figure(recs: list[dict], path: Path, threshold: float | None, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for b, color in BUCKET_COLORS.items():
        key = M.AUDIT_ERR_BUCKET.format(bucket=b)
        pts = [(r["step"], r["stats"][key]) for r in recs if key in r["stats"]]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3, lw=1, color=color, label=f"audit error, {b}")
    fb = [r["step"] for r in recs if r["stats"].get(M.AUDIT_FALLBACK)]
    for s in fb:
        ax.axvspan(s - 0.5, s + 0.5, color="tab:red", alpha=0.12, lw=0)
    if fb:
        ax.plot([], [], color="tab:red", alpha=0.3, lw=6, label="trained with recomputed log-probs")
    if threshold is not None:
        ax.axhline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:g}")
    for r in recs:
        for a in r.get("actions", []):
            if a.get("source") == "audit" and "error" in a:
                ax.annotate(a["action"], (a["step"], a["error"]), fontsize=7, rotation=60,
                            xytext=(2, 6), textcoords="offset points")
    ax.set_xlabel("step")
    ax.set_ylabel("mean |log pi_prox approx - log pi_prox|")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in recs], [r["stats"].get(M.REWARD_MEAN) for r in recs], color="tab:green", lw=0.8,
             alpha=0.6, label="reward")
    ax2.set_ylabel("reward", color="tab:green")
    ax2.set_ylim(0, 1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def staleness_figure(recs: list[dict], path: Path, band: tuple[float, float] | None, title: str) -> None:
    plt = pyplot()
    fig, (ax, ax3) = plt.subplots(2, 1, figsize=(8, 5.2), dpi=110, sharex=True, height_ratios=[1, 1.3])
    steps = [r["step"] for r in recs]
    ax.step(steps, [r["stats"].get(M.STALENESS_BOUND) for r in recs], where="post", color="black",
            label="admission bound (staleness/bound)")
    ax.plot(steps, [r["stats"].get(M.STALENESS_MEAN) for r in recs], color="tab:purple", lw=0.8,
            label="mean staleness of trained tokens")
    ax.set_ylabel("versions")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax3.plot(steps, [r["stats"].get(M.DRIFT_KL) for r in recs], color="tab:blue", lw=0.6, alpha=0.5,
             label="drift/kl (per step)")
    ax3.plot(steps, [r["stats"].get(M.STALENESS_DRIFT) for r in recs], color="tab:blue", lw=1.6,
             label="smoothed (the controller's signal)")
    if band is not None:
        for y, name in zip(band, ("low", "high")):
            ax3.axhline(y, color="black", ls="--", lw=0.8)
            ax3.annotate(name, (steps[0], y), fontsize=7, xytext=(2, 2), textcoords="offset points")
    ax3.set_yscale("log")
    ax3.set_xlabel("step")
    ax3.set_ylabel("KL(pi_behave || pi_theta)")
    ax3.legend(fontsize=7, loc="upper right")
    ax3.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def actions_markdown(recs: list[dict]) -> str:
    lines = ["| step | source | action | bucket | measure | error | threshold | detail |", "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        for a in r.get("actions", []):
            detail = {k: v for k, v in a.items() if k not in ("step", "source", "action", "bucket", "measure", "error",
                                                                "threshold", "policy")}
            err = a.get("error", a.get("smoothed"))
            lines.append(f"| {a['step']} | {a.get('source')} | {a['action']} | {a.get('bucket', '')} | "
                         f"{a.get('measure', a.get('signal', ''))} | {'' if err is None else f'{err:.4f}'} | "
                         f"{a.get('threshold', '')} | {json.dumps(detail) if detail else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.report.trace", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", required=True, help="file name prefix")
    ap.add_argument("--threshold", type=float, default=None, help="the audit threshold to draw")
    ap.add_argument("--band", default=None, help="low,high of the adaptive staleness controller")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    recs = load(args.run_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = args.title or args.name
    if any(M.AUDIT_ERR in r["stats"] for r in recs):
        audit_figure(recs, out / f"{args.name}_audit.png", args.threshold, title)
    if any(M.STALENESS_BOUND in r["stats"] for r in recs):
        band = tuple(float(x) for x in args.band.split(",")) if args.band else None
        staleness_figure(recs, out / f"{args.name}_staleness.png", band, title)
    (out / f"{args.name}_actions.md").write_text(actions_markdown(recs))
    print(f"wrote {args.name}_* under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
