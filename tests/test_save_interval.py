"""How often to save: Young/Daly's interval, and save_every="auto" against the formula for an injected cost."""

import math

import pytest

import workbench as wb
from workbench import save_interval


@pytest.mark.parametrize(("text", "seconds"), [("4h", 14400.0), ("30m", 1800.0), ("90s", 90.0), ("1.5d", 129600.0),
                                               ("120", 120.0), (3600, 3600.0), (0.5, 0.5)])
def test_durations_read_as_seconds(text, seconds):
    assert save_interval.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["4 hours", "h", "-1h", "", 0, -3, float("nan"), float("inf"), True, None])
def test_a_bad_duration_is_refused_naming_the_units(bad):
    with pytest.raises(ValueError, match="mtbf"):
        save_interval.parse_duration(bad)


def test_youngs_interval_minimises_the_wasted_time():
    write, mtbf = 2.0, 4 * 3600.0
    optimal = save_interval.young_daly(write, mtbf)
    assert optimal == pytest.approx(math.sqrt(2 * write * mtbf))

    def waste(tau):
        return save_interval.overhead(tau, write) + save_interval.lost_work(tau, write, mtbf)

    # the minimum of C / tau + (tau + C) / 2M, found numerically on a fine grid, not by the formula
    grid = [optimal * (0.5 + i / 1000) for i in range(1001)]
    assert min(grid, key=waste) == pytest.approx(optimal, rel=2e-3)


@pytest.mark.parametrize(("write", "step", "mtbf", "eval_every", "steps"), [
    (0.5, 0.1, 4 * 3600.0, 10, 1200),   # sqrt(2 * 0.5 * 14400) = 120 s = 1200 steps: 120 intervals of 10
    (0.5, 0.1, 4 * 3600.0, 500, 1000),  # 1200 steps: the nearest multiple of 500 is 1000
    (0.01, 0.1, 60.0, 10, 10),          # sqrt(1.2) = 1.1 s = 11 steps: one interval of 10
    (0.001, 1.0, 60.0, 25, 25),         # 0.35 steps: raised to the evaluation interval
])
def test_the_plan_rounds_youngs_interval_to_evaluations(write, step, mtbf, eval_every, steps):
    plan = save_interval.plan(write, step, mtbf, eval_every)
    assert plan.steps == steps
    assert plan.optimal_seconds == pytest.approx(math.sqrt(2 * write * mtbf))
    assert plan.overhead == pytest.approx(write / (steps * step))
    assert plan.lost_work == pytest.approx((steps * step + write) / (2 * mtbf))
    assert ("raised" in plan.reason) == (plan.optimal_seconds / step < eval_every)


def test_auto_needs_an_mtbf_and_an_mtbf_needs_auto(tmp_path):
    with pytest.raises(ValueError, match="mtbf"):
        wb.Run("digits", "lora", 2, tmp_path / "a", steps=4, save_every="auto")
    with pytest.raises(ValueError, match="save_every='auto'"):
        wb.Run("digits", "lora", 2, tmp_path / "b", steps=4, mtbf="4h")
    with pytest.raises(ValueError, match="save_every"):
        wb.Run("digits", "lora", 2, tmp_path / "c", steps=4, save_every="often")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
