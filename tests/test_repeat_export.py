"""bench.repeat_export: how the speed-ups of consecutive runs are judged."""

import pytest

from bench.repeat_export import agreement


def _runs(*medians: float) -> list[dict]:
    return [{"speed": {"llama.cpp q4_1 pp512": {"measured": m, "ideal": 1.36}}} for m in medians]


def test_runs_within_five_percent_of_their_mean_agree():
    (row,) = agreement(_runs(1.30, 1.36, 1.33), 0.05).values()
    assert row["within_tolerance"] and not row["below_one"]
    assert row["max_deviation_from_mean"] == pytest.approx(0.0226, abs=1e-4)
    assert row["spread"] == pytest.approx(1.36 / 1.30 - 1, abs=1e-4)


def test_a_run_outside_the_tolerance_or_slower_than_the_original_is_flagged():
    (wide,) = agreement(_runs(1.20, 1.40, 1.30), 0.05).values()
    assert not wide["within_tolerance"]
    (slow,) = agreement(_runs(0.99, 1.01, 1.00), 0.05).values()
    assert slow["within_tolerance"] and slow["below_one"]
