"""Smoke test of bench/loss.py's per-variant runner (tiny sizes; no timing asserts)."""

import pytest

from bench.loss import run_variant


@pytest.mark.parametrize("variant", ["ours", "naive"])
def test_run_variant_reports_time_and_memory(variant):
    row = run_variant(variant, tokens=8, vocab=300, reps=1, chunk=4)
    assert row["variant"] == variant and row["seconds"] > 0 and row["tokens"] == 8
    assert isinstance(row["peak_extra_bytes"], int)
