"""Intervals, summaries, Pareto fronts and the claims' verdicts, on tables written by hand.

Every expected number is computed here another way: scipy's own t distribution, numpy, brute force.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

import workbench as wb
from workbench.claims import CLAIMS, FAILS, HOLDS, INCONCLUSIVE, UNMEASURED, check_claims, verdict
from workbench.stats import interval, pareto_front, summarize


def test_interval_is_students_t_interval():
    sample = np.array([0.71, 0.74, 0.69, 0.77, 0.73])
    mean, std, low, high = interval(sample)
    half = scipy_stats.t.ppf(0.975, df=4) * sample.std(ddof=1) / math.sqrt(5)  # the textbook formula
    assert mean == pytest.approx(sample.mean()) and std == pytest.approx(sample.std(ddof=1))
    assert (low, high) == pytest.approx((sample.mean() - half, sample.mean() + half))
    assert interval([0.5, math.nan, 0.7])[0] == pytest.approx(0.6)  # NaN left out


def test_one_value_has_no_interval_and_none_has_no_mean():
    assert interval([0.7])[0] == 0.7 and all(math.isnan(v) for v in interval([0.7])[1:])
    assert all(math.isnan(v) for v in interval([]))


def _run(run: str, variant: str, seed: int, best: float, *, rank=4, lr=1e-3, options="", **more) -> dict:
    return {"run": run, "task": "t", "variant": variant, "rank": rank, "lr": lr, "options": options, "seed": seed,
            "monitor": "val_loss", "best_value": best, "status": more.pop("status", "finished"),
            "steps_done": 40, **more}


def test_summarize_groups_seeds_and_sorts_best_first():
    runs = pd.DataFrame([
        _run("a0", "lora", 0, 0.50, test_loss=0.52, trainable=100, wall_time=2.0),
        _run("a1", "lora", 1, 0.40, test_loss=0.41, trainable=100, wall_time=4.0),
        _run("a2", "lora", 2, 0.45, test_loss=0.47, trainable=100, wall_time=3.0, status="diverged"),
        _run("b0", "lora", 0, 0.30, lr=1e-2, test_loss=0.33, trainable=100, wall_time=1.0),
        _run("f0", "full", 0, 0.35, rank=None, test_loss=0.36, trainable=5000, wall_time=9.0),
    ])
    summary = summarize(runs)
    assert summary["variant"].tolist() == ["lora", "full", "lora"]  # by mean best validation loss
    row = summary.iloc[2]
    assert row["n"] == 3 and row["runs"] == "a0, a1, a2" and row["diverged"] == 1
    mean, std, low, high = interval([0.50, 0.40, 0.45])
    assert (row["best_mean"], row["best_std"], row["best_low"], row["best_high"]) == pytest.approx(
        (mean, std, low, high))
    assert row["test_metric"] == "test_loss" and row["test_mean"] == pytest.approx(np.mean([0.52, 0.41, 0.47]))
    assert row["wall_time"] == pytest.approx(3.0) and row["trainable"] == 100
    assert pd.isna(summary.iloc[1]["rank"]) and summary.iloc[1]["n"] == 1 and math.isnan(summary.iloc[1]["best_low"])


def test_summarize_refuses_mixed_monitors():
    runs = pd.DataFrame([_run("a", "lora", 0, 0.5), {**_run("b", "lora", 1, 0.9), "monitor": "val_acc"}])
    with pytest.raises(ValueError, match="val_acc, val_loss"):
        summarize(runs)


def test_pareto_front_matches_brute_force():
    generator = np.random.default_rng(0)
    table = pd.DataFrame({"cost": generator.integers(1, 20, 40), "value": generator.random(40).round(2)})
    table.loc[3, "value"] = math.nan
    for mode in ("min", "max"):
        good = table["value"] if mode == "max" else -table["value"]
        expected = []
        for i in table.index:
            dominated = any(table.loc[j, "cost"] <= table.loc[i, "cost"] and good[j] >= good[i]
                            and (table.loc[j, "cost"] < table.loc[i, "cost"] or good[j] > good[i])
                            for j in table.index if j != i and not math.isnan(good[j]))
            expected.append(not math.isnan(good[i]) and not dominated)
        assert pareto_front(table, "cost", "value", mode).tolist() == expected
    with pytest.raises(ValueError, match="'min'"):
        pareto_front(table, "cost", "value", "lowest")


@pytest.mark.parametrize(("low", "high", "n", "threshold", "better", "expected"), [
    (0.2, 0.8, 3, 1.0, "below", HOLDS),
    (0.8, 1.2, 3, 1.0, "below", INCONCLUSIVE),  # the interval spans the threshold
    (1.0, 1.5, 3, 1.0, "below", FAILS),
    (11.0, 12.0, 3, 10.0, "above", HOLDS),
    (8.0, 9.0, 3, 10.0, "above", FAILS),
    (0.2, 0.3, 1, 1.0, "below", INCONCLUSIVE),  # one seed is never decided
    (math.nan, math.nan, 0, 1.0, "below", UNMEASURED),
])
def test_verdict_rule(low, high, n, threshold, better, expected):
    assert verdict(low, high, n, threshold, better) == expected


def _metrics(curves: dict[str, list[float]], metric: str = "loss") -> pd.DataFrame:
    """Validation values logged at steps 10, 20, ... for each run."""
    return pd.DataFrame([{"run": run, "step": 10 * (i + 1), "split": "val", "metric": metric, "value": value}
                         for run, values in curves.items() for i, value in enumerate(values)])


def _claim(table: pd.DataFrame, claim: str) -> pd.DataFrame:
    return table[table["claim"] == claim]


def test_lora_plus_speed_over_paired_seeds():
    # per seed, LoRA's best (its last) value, and the step at which LoRA+ first gets there
    lora = {0: [0.9, 0.7, 0.5, 0.4], 1: [0.8, 0.6, 0.5, 0.45], 2: [0.9, 0.8, 0.6, 0.42]}
    plus = {0: [0.6, 0.39, 0.3, 0.3], 1: [0.5, 0.44, 0.4, 0.4], 2: [0.7, 0.5, 0.41, 0.4]}
    runs = pd.DataFrame([_run(f"l{s}", "lora", s, min(v)) for s, v in lora.items()]
                        + [_run(f"p{s}", "lora-plus", s, min(v)) for s, v in plus.items()])
    metrics = _metrics({**{f"l{s}": v for s, v in lora.items()}, **{f"p{s}": v for s, v in plus.items()}})
    row = _claim(check_claims(runs, metrics), "LoRA+ reaches LoRA's best validation value in fewer steps").iloc[0]
    ratios = [20 / 40, 20 / 40, 30 / 40]
    _, _, low, high = interval(ratios)
    assert row["n"] == 3 and row["effect"] == pytest.approx(np.mean(ratios))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
    assert row["verdict"] == HOLDS  # high = 0.93 < 1


def test_one_seed_never_decides_and_missing_runs_are_not_measured():
    runs = pd.DataFrame([_run("l0", "lora", 0, 0.4, trainable=1000, val_acc=0.9),
                         _run("v0", "vera", 0, 0.5, trainable=10, val_acc=0.6)])
    table = check_claims(runs, _metrics({"l0": [0.4], "v0": [0.5]}))
    vera = _claim(table, "VeRA trains at least 10x fewer parameters than LoRA").iloc[0]
    assert vera["effect"] == pytest.approx(100.0) and vera["n"] == 1 and vera["verdict"] == INCONCLUSIVE
    assert _claim(table, "... for a small cost in accuracy").iloc[0]["verdict"] == INCONCLUSIVE
    assert _claim(table, "Delta-LoRA matches or beats LoRA").iloc[0]["verdict"] == UNMEASURED
    assert set(table["verdict"]) <= {INCONCLUSIVE, UNMEASURED}


def test_vera_cost_decided_when_the_interval_clears_the_threshold():
    lora_acc, vera_acc = [0.90, 0.88, 0.91], [0.89, 0.88, 0.89]  # costs 0.01, 0, 0.02
    rows = [_run(f"l{s}", "lora", s, 0.4, trainable=1000, val_acc=a) for s, a in enumerate(lora_acc)]
    rows += [_run(f"v{s}", "vera", s, 0.5, trainable=50, val_acc=a) for s, a in enumerate(vera_acc)]
    table = check_claims(pd.DataFrame(rows), _metrics({}))
    cost = _claim(table, "... for a small cost in accuracy").iloc[0]
    assert cost["effect"] == pytest.approx(0.01) and cost["ci_high"] < 0.05 and cost["verdict"] == HOLDS
    ratio = _claim(table, "VeRA trains at least 10x fewer parameters than LoRA").iloc[0]
    assert (ratio["effect"], ratio["ci_low"], ratio["verdict"]) == (20.0, 20.0, HOLDS)
    big = pd.DataFrame([*rows[:3], *(_run(f"v{s}", "vera", s, 0.5, trainable=50, val_acc=a - 0.2)
                                     for s, a in enumerate(vera_acc))])
    assert _claim(check_claims(big, _metrics({})), "... for a small cost in accuracy").iloc[0]["verdict"] == FAILS


def test_delta_lora_inconclusive_when_noise_spans_the_margin():
    lora, delta = [0.40, 0.42, 0.38], [0.39, 0.45, 0.38]  # relative shortfalls -0.025, +0.071, 0
    rows = [_run(f"l{s}", "lora", s, v) for s, v in enumerate(lora)]
    rows += [_run(f"d{s}", "delta-lora", s, v) for s, v in enumerate(delta)]
    row = _claim(check_claims(pd.DataFrame(rows), _metrics({})), "Delta-LoRA matches or beats LoRA").iloc[0]
    shortfalls = [(d - lo) / lo for lo, d in zip(lora, delta, strict=True)]
    assert row["effect"] == pytest.approx(np.mean(shortfalls)) and row["verdict"] == INCONCLUSIVE


def test_the_best_learning_rate_is_compared_and_seeds_are_paired():
    rows = [_run(f"l{s}", "lora", s, 0.5 + s / 100) for s in range(3)]
    rows += [_run(f"L{s}", "lora", s, 0.3 + s / 100, lr=1e-2) for s in range(3)]  # LoRA's better lr
    rows += [_run(f"d{s}", "delta-lora", s, 0.3 + s / 100) for s in (0, 1, 2, 3)]  # seed 3 has no pair
    row = _claim(check_claims(pd.DataFrame(rows), _metrics({})), "Delta-LoRA matches or beats LoRA").iloc[0]
    assert row["n"] == 3 and row["effect"] == pytest.approx(0.0) and row["verdict"] == HOLDS  # equal at every seed


def test_rslora_gain_with_rank_and_forgetting_against_full():
    rows = []
    for seed, (lo, hi, rs_lo, rs_hi) in enumerate([(0.5, 0.45, 0.5, 0.35), (0.52, 0.46, 0.51, 0.37),
                                                   (0.49, 0.45, 0.5, 0.34)]):
        rows += [_run(f"a{seed}", "lora", seed, lo, rank=8, forget_loss=3.0 + seed / 10),
                 _run(f"b{seed}", "lora", seed, hi, rank=64),
                 _run(f"c{seed}", "lora", seed, rs_lo, rank=8, options="rslora=True"),
                 _run(f"d{seed}", "lora", seed, rs_hi, rank=64, options="rslora=True"),
                 _run(f"f{seed}", "full", seed, 0.3, rank=None, forget_loss=3.5 + seed / 10)]
    table = check_claims(pd.DataFrame(rows), _metrics({}))
    rs = _claim(table, "rsLoRA keeps improving with rank where LoRA saturates").iloc[0]
    gains = [(0.5 - 0.35) - (0.5 - 0.45), (0.51 - 0.37) - (0.52 - 0.46), (0.5 - 0.34) - (0.49 - 0.45)]
    assert rs["rank"] == "8 to 64" and rs["effect"] == pytest.approx(np.mean(gains)) and rs["verdict"] == HOLDS
    forget = _claim(table, "LoRA forgets less than full fine-tuning")
    assert forget["rank"].tolist() == [8, 64]
    at_8 = forget.iloc[0]  # lora r8 - full = -0.5 at every seed: no spread, decided
    assert at_8["effect"] == pytest.approx(-0.5) and at_8["verdict"] == HOLDS
    assert forget.iloc[1]["verdict"] == UNMEASURED or forget.iloc[1]["n"] == 0


def test_every_claim_has_a_row_on_an_empty_table():
    table = wb.check_claims(pd.DataFrame(), pd.DataFrame())
    assert len(table) == len(CLAIMS) and set(table["verdict"]) == {UNMEASURED}
    assert list(table.columns)[:1] == ["claim"]
    assert set(itertools.chain(["effect", "ci_low", "ci_high", "n", "verdict"])) <= set(table.columns)
