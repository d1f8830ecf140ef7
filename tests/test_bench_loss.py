"""Smoke test of bench/loss.py's per-variant runner (tiny sizes; no timing asserts)."""

import pytest

from bench.loss import run_variant


@pytest.mark.parametrize("variant", ["ours", "naive"])
def test_run_variant_reports_time_and_memory(variant):
    row = run_variant(variant, tokens=8, vocab=300, reps=1, chunk=4)
    assert row["variant"] == variant and row["seconds"] > 0 and row["tokens"] == 8
    assert isinstance(row["peak_extra_bytes"], int)


def test_run_paired_times_both_and_reports_per_pair_ratios():
    from bench.loss import run_paired

    res = run_paired("ours", "naive", tokens=8, vocab=300, reps=2, chunk=4)
    assert set(res["all_seconds"]) == {"ours", "naive"} and len(res["ratios"]) == 2
    assert res["ratio_median"] in res["ratios"]
