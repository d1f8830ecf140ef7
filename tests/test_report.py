"""tools.report: synthetic TensorBoard runs in, figures + a headline table whose numbers match means
computed here from the values written."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tools.report import main as report_main

TAGS = ["train/time/prox_logp", "train/time/elapsed", "train/entropy/mean", "train/ratio/max", "train/ratio/min",
        "train/clip/count", "train/reward/mean", "train/staleness/mean", "eval/accuracy"]
FIGS = ["prox_logp_time.png", "total_time.png", "entropy.png", "importance_weight.png", "clipped_tokens.png",
        "reward.png", "staleness.png", "eval_accuracy.png"]
COLS = {"mean prox time (s/step)": ("train/time/prox_logp", "mean"), "total time (s)": ("train/time/elapsed", "last"),
        "final reward": ("train/reward/mean", "last20"), "mean reward": ("train/reward/mean", "mean"),
        "mean entropy": ("train/entropy/mean", "mean"),
        "mean max IW": ("train/ratio/max", "mean"), "mean min IW": ("train/ratio/min", "mean"),
        "mean clipped tokens": ("train/clip/count", "mean"), "final eval accuracy": ("eval/accuracy", "last"),
        "best eval accuracy": ("eval/accuracy", "max")}


def _values(rng, tag, n):
    if tag == "train/time/elapsed":
        return np.cumsum(rng.uniform(1, 3, n))
    if tag == "train/clip/count":
        return rng.integers(0, 500, n).astype(float)
    return rng.uniform(0, 2, n)


def _write(logdir, data, steps):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(logdir))
    for tag, vals in data.items():
        for s, v in zip(steps, vals):
            w.add_scalar(tag, float(v), s)
    w.close()


def _f32(x):
    return float(np.float32(x))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(7)
    expected = {}
    # run a: 10 steps of every tag
    a = {t: _values(rng, t, 10) for t in TAGS}
    _write(root / "a", a, range(10))
    expected["a"] = {t: [(s, _f32(v)) for s, v in enumerate(a[t])] for t in TAGS}
    # run b: resumed at step 5: steps 0..5 in one event dir, 5..7 in a later one (step 5 rewritten)
    b1 = {t: _values(rng, t, 6) for t in TAGS}
    b2 = {t: _values(rng, t, 3) for t in TAGS}
    _write(root / "b", b1, range(6))
    _write(root / "b" / "resume", b2, range(5, 8))
    expected["b"] = {t: [(s, _f32(v)) for s, v in enumerate(b1[t][:5])] + [(5 + i, _f32(v)) for i, v in enumerate(b2[t])]
                     for t in TAGS}
    # run c: never logged clipped tokens or staleness
    c_tags = [t for t in TAGS if t not in ("train/clip/count", "train/staleness/mean", "eval/accuracy")]
    c = {t: _values(rng, t, 4) for t in c_tags}
    _write(root / "c" / "tb", c, range(4))
    expected["c"] = {t: [(s, _f32(v)) for s, v in enumerate(c[t])] for t in c_tags}
    return root, expected


def _table(md):
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_report_numbers_and_figures(runs, tmp_path, capsys):
    root, expected = runs
    out = tmp_path / "report"
    rc = report_main(["--runs", f"a={root / 'a'}", f"b={root / 'b'}", f"c={root / 'c'}", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    for f in FIGS:
        p = out / f
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
    rows = _table((out / "summary.md").read_text())
    assert set(rows) == {"a", "b", "c"}
    for run, series in expected.items():
        for col, (tag, how) in COLS.items():
            cell = rows[run][col]
            if tag not in series:
                assert cell == "n/a"
                continue
            vals = [v for _, v in series[tag]]
            vals = vals[-20:] if how == "last20" else vals
            want = vals[-1] if how == "last" else max(vals) if how == "max" else sum(vals) / len(vals)
            assert float(cell) == pytest.approx(want, rel=1e-5, abs=1e-9), (run, col)
    md = (out / "summary.md").read_text()
    note = next(ln for ln in md.splitlines() if ln.startswith("- c: no data for"))
    assert "train/clip/count" in note and "train/staleness/mean" in note
    assert not any(ln.startswith("- a: no data") or ln.startswith("- b: no data") for ln in md.splitlines())
    # b's step 5 comes from the resumed log: the last reward is the resumed run's last value
    assert float(rows["b"]["total time (s)"]) == pytest.approx(expected["b"]["train/time/elapsed"][-1][1], rel=1e-5)


def test_report_bad_input_writes_nothing(runs, tmp_path, capsys):
    root, _ = runs
    out = tmp_path / "r"
    assert report_main(["--runs", f"a={root / 'a'}", "--out", str(out)]) == 2
    assert "at least 2 runs" in capsys.readouterr().err
    assert report_main(["--runs", f"a={root / 'a'}", f"x={tmp_path / 'nope'}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'x'" in err and str(tmp_path / "nope") in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report_main(["--runs", f"a={root / 'a'}", f"e={empty}", "--out", str(out)]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    assert report_main(["--runs", f"a={root / 'a'}", "b", "--out", str(out)]) == 2
    assert "NAME=LOGDIR" in capsys.readouterr().err
    assert not out.exists()


def test_without_matplotlib_the_error_names_the_extra(monkeypatch):
    """matplotlib is the ``report`` extra: without it, drawing exits with a message saying how to install it."""
    from tools.report.report import pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match=r"megatron-a3po\[report\]"):
        pyplot()
