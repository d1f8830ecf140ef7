"""tools/report/paired.py: the paired and unpaired standard errors of a difference, recomputed here with
numpy from the same per-run reward curves."""

import json

import numpy as np
import pytest

from tools.report.paired import main as paired_main


def _write(root, group, seed, ms, rewards):
    d = root / group / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "run_summary.json").write_text(json.dumps({
        "schema": "a3po.sweep.run/1", "group": group, "seed": seed, "config": {"max_staleness": ms},
        "curves": {"steps": list(range(len(rewards))), "series": {"train/reward/mean": list(rewards)}}}))


def test_paired_and_unpaired_standard_errors(tmp_path):
    rng = np.random.default_rng(0)
    finals = {}
    for ms in (2, 4):
        for seed in range(5):
            base = rng.uniform(0.5, 0.9)  # the seed's own level: shared by both sides of a pair
            for mode, shift in (("loglinear", -0.01 * ms), ("recompute", 0.0)):
                r = np.clip(base + shift + 0.02 * rng.standard_normal(40), 0, 1)
                _write(tmp_path / "runs", f"mode={mode},max_staleness={ms}", seed, ms, r)
                finals[(ms, mode, seed)] = (r[-20:].mean(), r.mean())
    _write(tmp_path / "runs", "mode=recompute,max_staleness=4", 9, 4, [0.5] * 40)  # no partner: left out
    assert paired_main(["--sweep", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "summary.json").read_text())["by_max_staleness"]
    for ms in (2, 4):
        for k, metric in enumerate(("final reward", "mean reward")):
            a = np.array([finals[(ms, "loglinear", s)][k] for s in range(5)])
            b = np.array([finals[(ms, "recompute", s)][k] for s in range(5)])
            st = res[str(ms)][metric]
            assert st["n"] == 5 and res[str(ms)]["seeds"] == [0, 1, 2, 3, 4]
            assert st["diff_mean"] == pytest.approx((a - b).mean(), rel=1e-4)
            assert st["se_paired"] == pytest.approx((a - b).std(ddof=1) / np.sqrt(5), rel=1e-3)
            assert st["se_unpaired"] == pytest.approx(np.sqrt(a.var(ddof=1) / 5 + b.var(ddof=1) / 5), rel=1e-3)
            assert st["corr"] == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-3)
            assert st["se_paired"] < st["se_unpaired"]  # the shared seed level cancels in the pairs
            need = int(np.ceil(((1.959964 + 0.841621) * (a - b).std(ddof=1) / (0.02 * b.mean())) ** 2))
            assert st["n_for_2pct_paired"] == need
    assert (tmp_path / "out" / "paired_final_reward.png").read_bytes()[:4] == b"\x89PNG"
