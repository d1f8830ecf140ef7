"""tools.sweep + tools.report's groups: a 2 x 2 grid (lr x seed) of 3-step synchronous runs.

Independent reference: every number the report gives a group (mean +- std of the headline numbers,
per-step mean and min-max band) is recomputed here from the runs' steps.jsonl, read with plain json,
with numpy / statistics. The stability number is checked against a brute-force numpy definition."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

from tools.report import group_runs, load_sweep, main as report_main, max_drop
from tools.sweep import SweepError, load_grid, main as sweep_main
from tools.sweep.sweep import finished

# synchronous (max_staleness 0, in-flight cap = one batch): the engines generate a batch only after the
# trainer has pushed the weights that sample it
SMALL = {"trainer.steps": 3, "trainer.warm_start_steps": 0, "rollout.batch_prompts": 4, "rollout.n_samples": 4,
         "rollout.max_inflight_groups": 4, "rollout.max_staleness": 0, "trainer.ppo_n_minibatches": 2,
         "data.synthetic.num_prompts": 200}
GROUPS = ["lr=0.0005", "lr=0.005"]  # lr: the two groups' numbers differ from step 2 on (eps_clip barely would)


def _grid(tmp_path, **extra):
    g = {"recipe": "demo_cpu", "overrides": SMALL, "blocks": [{"axes": {"trainer.lr": [5e-4, 5e-3]}}], **extra}
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump(g))
    return p


def _steps(run_dir: Path) -> list[dict]:
    return [json.loads(ln)["stats"] for ln in (run_dir / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    grid, out = _grid(tmp), tmp / "out"
    rc = sweep_main(["--grid", str(grid), "--seeds", "0,1", "--out", str(out), "--parallel", "2"])
    assert rc == 0, json.dumps(json.loads((out / "sweep.json").read_text()), indent=1)[-4000:]
    return grid, out


@pytest.mark.slow
def test_group_means_and_bands_match_the_steps(sweep, tmp_path):
    grid, out = sweep
    rep = tmp_path / "report"
    assert report_main(["--sweep", str(out), "--out", str(rep)]) == 0
    table = {g["group"]: g for g in json.loads((rep / "summary.json").read_text())["groups"]}
    assert set(table) == set(GROUPS)
    groups = {g.name: g for g in group_runs(load_sweep(out))}
    for name in GROUPS:
        steps = [_steps(out / name / f"seed{s}") for s in (0, 1)]
        assert [len(s) for s in steps] == [3, 3]
        reward = np.array([[st["reward/mean"] for st in run] for run in steps])  # runs x steps
        per_run = {
            "final reward": reward[:, -20:].mean(axis=1),
            "mean reward": reward.mean(axis=1),
            "mean entropy": np.array([np.mean([st["entropy/mean"] for st in run]) for run in steps]),
            "mean clipped tokens": np.array([np.mean([st["clip/count"] for st in run]) for run in steps]),
            "mean max IW": np.array([np.mean([st["ratio/max"] for st in run]) for run in steps]),
            "mean min IW": np.array([np.mean([st["ratio/min"] for st in run]) for run in steps]),
            "mean prox time (s/step)": np.array([np.mean([st["time/prox_logp"] for st in run]) for run in steps]),
        }
        for col, vals in per_run.items():
            got = table[name][col]
            assert got["n"] == 2
            assert got["mean"] == pytest.approx(vals.mean(), rel=1e-4, abs=1e-9), (name, col)
            assert got["std"] == pytest.approx(statistics.stdev(vals.tolist()), rel=1e-3, abs=1e-7), (name, col)
        # the reward curve: mean and min-max band over the two seeds, step by step (0-based as in TB)
        band = groups[name].band("train/reward/mean")
        assert [b[0] for b in band] == [0, 1, 2]
        np.testing.assert_allclose([b[1] for b in band], reward.mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose([b[2] for b in band], reward.min(axis=0), rtol=1e-5)
        np.testing.assert_allclose([b[3] for b in band], reward.max(axis=0), rtol=1e-5)
        # trainer.seed reached the runs: two seeds, two different runs (init, data, sampling)
        # (the entropy too: with all rewards 0 - likely at step 1 without a warm start - reward and loss agree)
        assert any(steps[0][0][k] != steps[1][0][k] for k in ("reward/mean", "loss/pg", "entropy/mean"))
    # the groups are not each other's copies (a mix-up of runs between groups would show)
    assert table[GROUPS[0]]["mean entropy"]["values"] != table[GROUPS[1]]["mean entropy"]["values"]
    md = (rep / "summary.md").read_text()
    assert "±" in md and GROUPS[0] in md
    assert (rep / "final_reward_vs_staleness.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_resume_skips_finished_and_reruns_the_rest_identically(sweep, capsys):
    grid, out = sweep
    args = ["--grid", str(grid), "--seeds", "0,1", "--out", str(out), "--parallel", "2"]
    marks = {p: p.stat().st_mtime_ns for p in out.rglob("run_summary.json")}
    assert len(marks) == 4
    capsys.readouterr()
    assert sweep_main(args) == 0
    assert "4 finished already, 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("run_summary.json")} == marks
    # a run without its marker (killed, crashed) is started over; synchronous + same seed = same curve
    run = out / GROUPS[0] / "seed0"
    before = [st["reward/mean"] for st in _steps(run)]
    before_loss = [st["loss/pg"] for st in _steps(run)]
    (run / "run_summary.json").unlink()
    assert sweep_main(args) == 0
    assert "3 finished already, 1 to run" in capsys.readouterr().out
    assert [st["reward/mean"] for st in _steps(run)] == before
    assert [st["loss/pg"] for st in _steps(run)] == before_loss


def test_stability_is_the_largest_drop_of_the_20_step_mean():
    def brute(r, w=20):
        r = np.asarray(r, dtype=np.float64)
        w = min(w, len(r))
        m = np.convolve(r, np.ones(w) / w, mode="valid")  # trailing means at steps w..n
        return float(np.max(np.maximum.accumulate(m) - m))

    rng = np.random.default_rng(3)
    for n in (1, 5, 20, 21, 90):
        r = rng.uniform(0, 1, n)
        assert max_drop(r) == pytest.approx(brute(r), abs=1e-12)
    rise = np.linspace(0, 1, 60)
    assert max_drop(rise) == pytest.approx(0.0, abs=1e-12)
    # 40 steps at 0.9, then 20 at 0.5: the 20-step mean falls from 0.9 to 0.5
    assert max_drop([0.9] * 40 + [0.5] * 20) == pytest.approx(0.4)


def test_grid_errors_name_the_key(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text(yaml.safe_dump({"recipe": "demo_cpu", "blocks": [{"axes": {"loss.eps_clipp": [0.1]}}]}))
    with pytest.raises(SweepError, match="eps_clipp"):
        load_grid(p, [0])
    p.write_text(yaml.safe_dump({"recipe": "demo_cpu", "blocks": [{"axes": {"x": [1]}}], "extra": 1}))
    with pytest.raises(SweepError, match="extra"):
        load_grid(p, [0])
    p.write_text(yaml.safe_dump({"recipe": "demo_cpu", "blocks": [{"axes": {"trainer.seed": [1, 2]}}]}))
    with pytest.raises(SweepError, match="trainer.seed"):
        load_grid(p, [0])
    # bundle axes, per-block seeds, the committed study grid
    runs = load_grid(Path(__file__).resolve().parents[1] / "tools/sweep/grids/fidelity.yaml", [0, 1, 2])
    assert len(runs) == 3 * 2 * 3 * 3 + 3
    assert {r.config["max_inflight_groups"] == 32 * (r.config["max_staleness"] + 1) for r in runs} == {True}
    assert sorted(r.config["max_staleness"] for r in runs if r.config["mode"] == "metrics") == [1, 2, 4]


def test_a_marker_of_other_settings_is_an_error(tmp_path):
    grid = _grid(tmp_path)
    spec = load_grid(grid, [0])[0]
    d = tmp_path / "run"
    d.mkdir()
    assert not finished(spec, d)  # a directory alone is not a finished run
    (d / "run_summary.json").write_text(json.dumps({"recipe": spec.recipe, "overrides": spec.overrides}))
    assert finished(spec, d)
    (d / "run_summary.json").write_text(json.dumps({"recipe": spec.recipe, "overrides": {"trainer.steps": "9"}}))
    with pytest.raises(SweepError, match="other settings"):
        finished(spec, d)
