"""The figures of configurations and of banded curves, on hand-made tables, checked against numbers computed here."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

import workbench as wb
from workbench import plots

# variant, rank, lr, options, n, best_mean, best_low, best_high, trainable, peak_rss (bytes), wall_time (s)
CONFIGURATIONS = [
    ("lora", 2, 1e-3, "", 3, 0.50, 0.45, 0.55, 1000, 2.0e8, 10.0),
    ("lora", 2, 1e-2, "", 3, 0.40, 0.36, 0.44, 1000, 2.0e8, 11.0),
    ("lora", 2, 1e-1, "", 3, 0.42, 0.30, 0.54, 1000, 2.1e8, 11.5),
    ("lora", 8, 1e-3, "", 2, 0.60, 0.50, 0.70, 4000, 3.0e8, 12.0),
    ("lora", 8, 1e-2, "", 2, 0.35, 0.30, 0.40, 4000, 3.0e8, 12.0),
    ("lora", 8, 1e-2, "init=pissa", 1, 0.33, math.nan, math.nan, 4000, 3.2e8, 14.0),
    ("vera", 8, 1e-2, "", 1, 0.45, math.nan, math.nan, 100, 1.0e8, 9.0),
    ("full", None, 1e-3, "", 2, 0.30, 0.20, 0.40, 100000, 9.0e8, 50.0),
    ("head", None, 1e-2, "", 2, 0.70, 0.60, 0.80, 50, 1.0e8, 5.0),
]
COLUMNS = ["variant", "rank", "lr", "options", "n", "best_mean", "best_low", "best_high", "trainable", "peak_rss",
           "wall_time"]


def summary(monitor: str = "val_loss") -> pd.DataFrame:
    """A summarize-shaped table (accuracies: one minus the losses, the intervals flipped with them)."""
    table = pd.DataFrame(CONFIGURATIONS, columns=COLUMNS).assign(task="digits", monitor=monitor)
    table["rank"] = table["rank"].astype("Int64")
    if monitor.endswith("acc"):
        table = table.assign(best_mean=1 - table["best_mean"], best_low=1 - table["best_high"],
                             best_high=1 - table["best_low"])
    return table


def brute_front(table: pd.DataFrame, cost: str, higher_is_better: bool) -> list[tuple[float, float]]:
    """(cost, value) of the rows no other row beats: no worse on both, better on one; by cost."""
    points = [(float(c), float(v) if higher_is_better else -float(v)) for c, v in zip(table[cost], table["best_mean"], strict=True)]
    front = [(c, v) for c, v in points
             if not any(c2 <= c and v2 >= v and (c2 < c or v2 > v) for c2, v2 in points)]
    return sorted((c, v if higher_is_better else -v) for c, v in front)


def trace(figure, name: str):
    [found] = [t for t in figure.data if t.name == name]
    return found


@pytest.mark.parametrize("monitor", ["val_loss", "val_acc"])
@pytest.mark.parametrize("cost", list(plots.COSTS))
def test_pareto_marks_the_brute_force_front_in_order_of_cost(monitor, cost):
    table = summary(monitor)
    figure = plots.pareto(table, cost)
    front = trace(figure, "Pareto front")
    scale = 1e6 if cost == "peak_rss" else 1.0
    expected = brute_front(table, cost, monitor.endswith("acc"))
    np.testing.assert_allclose(np.column_stack([np.asarray(front.x) * scale, front.y]), expected)
    assert front.mode == "lines+markers" and front.marker.symbol == "circle-open"
    assert figure.layout.xaxis.type == "log"
    assert figure.layout.xaxis.title.text == {"trainable": "trainable parameters", "peak_rss": "peak resident memory (MB)",
                                              "wall_time": "wall time (s)"}[cost]
    assert figure.layout.yaxis.title.text.startswith("best validation " + ("accuracy" if monitor.endswith("acc") else "loss"))


def test_pareto_error_bars_colours_and_hover_name_each_configuration():
    table = summary()
    figure = plots.pareto(table, "trainable")
    points = [t for t in figure.data if t.name != "Pareto front"]
    assert [t.name for t in points] == ["lora", "vera", "full", "head"]  # registered variants, then the baselines
    assert sum(len(t.x) for t in points) == len(table)  # one point per configuration
    for drawn in points:
        mine = table[table["variant"] == drawn.name]
        np.testing.assert_allclose(drawn.x, mine["trainable"])
        np.testing.assert_allclose(drawn.error_y.array, mine["best_high"] - mine["best_mean"])  # NaN: one seed
        np.testing.assert_allclose(drawn.error_y.arrayminus, mine["best_mean"] - mine["best_low"])
        assert drawn.marker.color == plots.variant_color(drawn.name)
    lora = trace(figure, "lora")
    assert list(lora.customdata[:, 0]) == ["lora r2 lr=0.001", "lora r2 lr=0.01", "lora r2 lr=0.1", "lora r8 lr=0.001",
                                           "lora r8 lr=0.01", "lora r8 lr=0.01 (init=pissa)"]
    assert list(lora.customdata[:, 1]) == ["3", "3", "3", "2", "2", "1"]
    assert trace(figure, "full").customdata[0, 0] == "full lr=0.001"
    assert trace(figure, "vera").customdata[0, 2] == "no interval (one seed)"


def test_pareto_leaves_out_configurations_without_the_cost_and_refuses_bad_input():
    table = summary()
    table.loc[table["variant"] == "vera", "peak_rss"] = math.nan
    figure = plots.pareto(table, "peak_rss")
    assert "vera" not in [t.name for t in figure.data] and "1 configuration(s) without peak_rss" in figure.layout.title.text
    with pytest.raises(ValueError, match="trainable, peak_rss, wall_time"):
        plots.pareto(table, "saved")
    with pytest.raises(ValueError, match="trainable, peak_rss, wall_time"):
        plots.pareto_fronts(table, ["trainable", "steps"])
    with pytest.raises(ValueError, match="monitor val_acc, val_loss"):
        plots.pareto(pd.concat([summary(), summary("val_acc")]))
    with pytest.raises(ValueError, match="tasks"):
        plots.lr_sensitivity(pd.concat([summary(), summary().assign(task="reviews")]))


def test_pareto_fronts_draws_each_cost_side_by_side_sharing_y():
    table = summary()
    figure = plots.pareto_fronts(table)
    fronts = [t for t in figure.data if t.name == "Pareto front"]
    assert [t.xaxis for t in fronts] == ["x", "x2", "x3"]
    for front, cost in zip(fronts, plots.COSTS, strict=True):
        scale = 1e6 if cost == "peak_rss" else 1.0
        np.testing.assert_allclose(np.column_stack([np.asarray(front.x) * scale, front.y]),
                                   brute_front(table, cost, False))
    assert figure.layout.yaxis2.matches == "y" and figure.layout.yaxis3.matches == "y"
    assert all(figure.layout[f"xaxis{i}"].type == "log" for i in ("", "2", "3"))
    assert [t.name for t in figure.data if t.showlegend is not False] == ["lora", "vera", "full", "head", "Pareto front"]
    assert [a.text for a in figure.layout.annotations] == [f"{len(f.x)} of {len(table)} on the front" for f in fronts]
    unrecorded = plots.pareto_fronts(table.assign(peak_rss=math.nan))
    assert "peak_rss: not recorded" in [a.text for a in unrecorded.layout.annotations]


def test_variant_colours_are_fixed_and_distinct_including_the_baselines():
    names = [*wb.VARIANTS, *plots.BASELINES]
    colours = [plots.variant_color(name) for name in names]
    assert len(set(colours)) == len(names)
    assert plots.variant_color("full") == plots.PALETTE[len(wb.VARIANTS)]
    assert plots.variant_color("head") == plots.PALETTE[len(wb.VARIANTS) + 1]
    lr = plots.lr_sensitivity(summary())
    pareto = plots.pareto(summary())
    assert trace(lr, "full").line.color == trace(pareto, "full").marker.color == plots.variant_color("full")


def test_lr_sensitivity_has_a_line_per_configuration_and_bands_from_the_intervals():
    table = summary()
    figure = plots.lr_sensitivity(table)
    lines = [t for t in figure.data if t.mode == "lines+markers"]
    configurations = table.groupby(["variant", "rank", "options"], dropna=False).ngroups
    assert len(lines) == configurations == 6
    assert figure.layout.xaxis.type == "log"
    lora2 = table[(table["variant"] == "lora") & (table["rank"] == 2)].sort_values("lr")
    line = trace(figure, "lora r2")
    np.testing.assert_allclose(line.x, lora2["lr"])
    np.testing.assert_allclose(line.y, lora2["best_mean"])
    band = trace(figure, "lora r2 band")
    assert band.fill == "toself"
    np.testing.assert_allclose(band.x, [*lora2["lr"], *lora2["lr"][::-1]])
    np.testing.assert_allclose(band.y, [*lora2["best_high"], *lora2["best_low"][::-1]])
    lora8 = table[(table["variant"] == "lora") & (table["rank"] == 8) & (table["options"] == "")].sort_values("lr")
    np.testing.assert_allclose(trace(figure, "lora r8 band").y, [*lora8["best_high"], *lora8["best_low"][::-1]])
    assert not [t for t in figure.data if t.name in ("vera r8 band", "lora r8 (init=pissa) band")]  # n < 2: no band
    assert trace(figure, "lora r2").line.dash == "solid" and trace(figure, "lora r8").line.dash == "dot"
    assert trace(figure, "full").line.dash == "solid"
    alone = plots.lr_sensitivity(table[(table["variant"] == "full")])  # one lr with an interval: an error bar
    np.testing.assert_allclose(trace(alone, "full").error_y.array, [0.1])


@pytest.mark.parametrize("figure", [plots.pareto, plots.pareto_fronts, plots.lr_sensitivity])
@pytest.mark.parametrize("column", ["variant", "rank", "lr", "options", "monitor", "best_mean", "best_high"])
def test_summary_figures_name_a_missing_column(figure, column):
    with pytest.raises(ValueError, match=f"lacks the column\\(s\\) {column}"):
        figure(summary().drop(columns=column))


def test_pareto_and_pareto_fronts_name_a_missing_cost_column():
    with pytest.raises(ValueError, match="lacks the column\\(s\\) wall_time"):
        plots.pareto(summary().drop(columns="wall_time"), "wall_time")
    with pytest.raises(ValueError, match="lacks the column\\(s\\) peak_rss"):
        plots.pareto_fronts(summary().drop(columns="peak_rss"))


# -- validation_bands -----------------------------------------------------------------------------

STEPS = [10, 20, 30, 40]


def curves() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs and their validation losses: three seeds of lora r2, one of them diverged; two of lora r4 (lr 0.01
    and 0.1), one finished but with a NaN loss; two seeds of vera r2, one of them blown up; a full fine-tune."""
    rng = np.random.default_rng(0)
    runs, rows = [], []

    def add(name, variant, rank, lr, seed, status, values):
        runs.append({"run": name, "variant": variant, "rank": rank, "lr": lr, "options": "", "seed": seed,
                     "status": status})
        rows.extend({"run": name, "step": step, "split": "val", "metric": metric, "value": value}
                    for metric, series in (("loss", values), ("acc", 1 - np.asarray(values) / 10))
                    for step, value in zip(STEPS, series, strict=True))
        rows.extend({"run": name, "step": step, "split": "train", "metric": "loss", "value": 99.0} for step in STEPS)

    for seed in (0, 1):
        add(f"lora-r2-s{seed}", "lora", 2, 0.01, seed, "finished", 2.0 - 0.3 * np.arange(4) + rng.uniform(0, 0.2, 4))
    add("lora-r2-s2", "lora", 2, 0.01, 2, "diverged", [2.0, 50.0, 1e6, math.inf])
    for seed in (0, 1):
        add(f"lora-r4-s{seed}", "lora", 4, 0.01, seed, "finished", 1.8 - 0.3 * np.arange(4) + rng.uniform(0, 0.2, 4))
    add("lora-r4-lr0.1-s0", "lora", 4, 0.1, 0, "finished", [1.9, 1.5, 1.3, 1.2])
    add("lora-r4-lr0.1-s1", "lora", 4, 0.1, 1, "finished", [1.9, math.nan, 1.3, 1.2])
    add("vera-r2-s0", "vera", 2, 0.01, 0, "finished", [2.1, 1.9, 1.7, 1.6])
    add("vera-r2-s1", "vera", 2, 0.01, 1, "finished", [2.1, 300.0, 900.0, 1000.0])
    add("full-s0", "full", None, 0.001, 0, "finished", [1.5, 1.0, 0.8, 0.7])
    return pd.DataFrame(runs), pd.DataFrame(rows)


def logged(metrics: pd.DataFrame, run: str, metric: str = "loss") -> np.ndarray:
    rows = metrics[(metrics["run"] == run) & (metrics["split"] == "val") & (metrics["metric"] == metric)]
    return rows.sort_values("step")["value"].to_numpy()


def test_validation_bands_leave_flagged_runs_out_of_the_means_and_name_them():
    runs, metrics = curves()
    figure = plots.validation_bands(runs, metrics)
    title = figure.layout.title.text
    for run in ("lora-r2-s2 (diverged)", "lora-r4-lr0.1-s1 (values not finite)", "vera-r2-s1 (above 10x"):
        assert run in title
    lora2 = trace(figure, "lora r2 lr=0.01 (2 seeds)")
    kept = np.stack([logged(metrics, "lora-r2-s0"), logged(metrics, "lora-r2-s1")])
    np.testing.assert_allclose(lora2.x, STEPS)
    np.testing.assert_allclose(lora2.y, kept.mean(axis=0))
    band = trace(figure, "lora r2 lr=0.01 (2 seeds) band")
    np.testing.assert_allclose(band.y, [*kept.max(axis=0), *kept.min(axis=0)[::-1]])
    np.testing.assert_allclose(trace(figure, "vera r2 lr=0.01 (1 seed)").y, logged(metrics, "vera-r2-s0"))
    np.testing.assert_allclose(trace(figure, "lora r4 lr=0.1 (1 seed)").y, logged(metrics, "lora-r4-lr0.1-s0"))
    drawn = np.concatenate([np.asarray(t.y, dtype=float) for t in figure.data])
    assert np.isfinite(drawn).all() and drawn.max() < 3  # nothing flagged stretches the axis
    assert figure.layout.yaxis.type == "log"
    assert not [t for t in figure.data if "s2" in t.name or "run" in t.name]  # legends name configurations


def test_validation_bands_small_multiples_by_variant_share_y_with_colour_dash_and_shade():
    runs, metrics = curves()
    figure = plots.validation_bands(runs, metrics)
    assert [a.text for a in figure.layout.annotations] == ["lora", "vera", "full"]
    lines = {t.name: t for t in figure.data if not t.name.endswith("band")}
    assert {t.xaxis for t in lines.values()} == {"x", "x2", "x3"}
    assert figure.layout.yaxis2.matches == "y" and figure.layout.yaxis3.matches == "y"
    assert lines["lora r2 lr=0.01 (2 seeds)"].line.dash == "solid" and lines["lora r4 lr=0.01 (2 seeds)"].line.dash == "dot"
    assert lines["lora r4 lr=0.1 (1 seed)"].line.color == plots.variant_color("lora")  # the largest lr: the colour
    assert lines["lora r4 lr=0.01 (2 seeds)"].line.color != plots.variant_color("lora")  # a smaller one: a paler shade
    assert lines["full lr=0.001 (1 seed)"].line.color == plots.variant_color("full")


def test_validation_bands_interval_band_is_the_t_interval_over_seeds():
    runs, metrics = curves()
    figure = plots.validation_bands(runs, metrics, band="interval")
    kept = np.stack([logged(metrics, "lora-r4-s0"), logged(metrics, "lora-r4-s1")])
    half = scipy_stats.t.ppf(0.975, 1) * kept.std(axis=0, ddof=1) / math.sqrt(2)
    band = trace(figure, "lora r4 lr=0.01 (2 seeds) band")
    mean = kept.mean(axis=0)
    np.testing.assert_allclose(band.y, [*(mean + half), *(mean - half)[::-1]])
    assert "95% t interval over seeds" in figure.layout.title.text
    assert not [t for t in figure.data if t.name == "vera r2 lr=0.01 (1 seed) band"]  # one seed: no interval


def test_validation_bands_of_accuracy_keep_a_linear_axis_and_flag_only_what_diverged():
    runs, metrics = curves()
    figure = plots.validation_bands(runs, metrics, metric="acc")
    assert figure.layout.yaxis.type != "log"
    assert "vera r2 lr=0.01 (2 seeds)" in [t.name for t in figure.data]  # an accuracy cannot blow up
    title = figure.layout.title.text
    assert "lora-r2-s2 (diverged)" in title and "lora-r4-lr0.1-s1 (values not finite)" in title
    assert "vera-r2-s1" not in title


@pytest.mark.parametrize("column", ["run", "variant", "rank", "lr", "options", "status"])
def test_validation_bands_name_a_missing_runs_column(column):
    runs, metrics = curves()
    with pytest.raises(ValueError, match=f"runs lacks the column\\(s\\) {column}"):
        plots.validation_bands(runs.drop(columns=column), metrics)


@pytest.mark.parametrize("column", ["run", "step", "split", "metric", "value"])
def test_validation_bands_name_a_missing_metrics_column(column):
    runs, metrics = curves()
    with pytest.raises(ValueError, match=f"metrics lacks the column\\(s\\) {column}"):
        plots.validation_bands(runs, metrics.drop(columns=column))


def test_validation_bands_refuse_an_unknown_band():
    runs, metrics = curves()
    with pytest.raises(ValueError, match="'range'.*'interval'"):
        plots.validation_bands(runs, metrics, band="sd")


def test_a_variant_has_one_colour_and_a_rank_one_dash_in_every_figure_of_the_runs(tmp_path):
    wb.sweep("digits", ["lora", "vera"], [1, 4], 4, tmp_path, eval_every=2, save_every=2, progress_bar=False)
    runs, metrics = wb.load_runs(tmp_path), wb.load_metrics(tmp_path)
    variant_of = dict(zip(runs["run"], runs["variant"], strict=True))
    rank_of = dict(zip(runs["run"], runs["rank"], strict=True))
    seen: dict[str, set[str]] = {}
    dashes: dict[int, set[str]] = {}
    for figure in (plots.validation_curves(metrics), plots.training_loss(metrics)):
        for line in figure.data:
            seen.setdefault(variant_of[line.name], set()).add(line.line.color)
            dashes.setdefault(rank_of[line.name], set()).add(line.line.dash)
        assert figure.layout.yaxis.type == "log"  # losses, all positive
    for figure in (plots.best_by_variant_and_rank(runs), plots.parameters_vs_metric(runs)):
        for trace_ in figure.data:
            seen.setdefault(trace_.name, set()).add(trace_.marker.color)
    for line in plots.validation_bands(runs, metrics).data:
        if line.fill is None:  # the mean lines, named "<variant> r<rank> lr=... (1 seed)"
            seen.setdefault(line.name.split()[0], set()).add(line.line.color)
    summary = wb.summarize(runs)  # the report's other two figures
    for point in plots.pareto_fronts(summary).data:
        if point.name != "Pareto front":
            seen.setdefault(point.name, set()).add(point.marker.color)
    for line in plots.lr_sensitivity(summary).data:
        seen.setdefault(line.name.split()[0], set()).add(line.line.color)
    assert seen == {"lora": {plots.variant_color("lora")}, "vera": {plots.variant_color("vera")}}
    assert plots.variant_color("lora") != plots.variant_color("vera")
    assert dashes == {1: {"solid"}, 4: {"dot"}}
    accuracy = plots.validation_curves(metrics, metric="acc")
    assert accuracy.layout.yaxis.type is None and not accuracy.layout.updatemenus  # an accuracy stays linear


def test_the_empty_live_figure_has_no_axes_and_a_run_spans_its_steps():
    empty = plots.live_runs([])
    assert empty.layout.xaxis.visible is False and empty.layout.yaxis.visible is False
    assert len(empty.layout.annotations) == 1  # no subplot titles over empty space
    assert "Launch" in empty.layout.annotations[0].text
    live = plots.live_runs(["a", "b"], ["lora", "vera"], [2, 8], steps=300)
    assert live.layout.xaxis.range == (0, 300) == live.layout.xaxis2.range
    assert {t.line.color for t in live.data if t.name.startswith("a ") and t.mode == "lines"} == {
        plots.variant_color("lora")}


def test_scatter_points_carry_no_text_the_rank_is_the_marker_and_spectrum_ticks_are_integers():
    runs = pd.DataFrame({"run": ["a", "b", "c"], "variant": ["lora", "lora", "vera"], "rank": [2, 8, 2],
                         "trainable": [100, 400, 20], "best_value": [0.5, 0.4, 0.6], "monitor": "val_loss"})
    figure = plots.parameters_vs_metric(runs)
    assert all(trace_.mode == "markers" for trace_ in figure.data)  # no labels to print over each other
    lora = next(t for t in figure.data if t.name == "lora")
    assert list(lora.marker.symbol) == ["circle", "square"] and list(lora.text) == ["rank 2", "rank 8"]
    assert "circle: r2" in figure.layout.title.text and "square: r8" in figure.layout.title.text
    table = pd.DataFrame({"layer": "fc1", "index": [1, 2], "value": [2.0, 1.0], "energy": [0.8, 1.0]})
    spectrum = plots.spectrum(table)
    assert spectrum.layout.xaxis.dtick == 1 and spectrum.layout.xaxis.tickformat == "d"  # 1, 2: not 1, 1.5, 2


def test_a_blown_up_run_is_dotted_named_and_kept_off_the_loss_axis():
    steps = np.arange(1, 21)
    rows = [{"run": run, "step": int(step), "split": split, "metric": "loss", "value": float(value),
             "variant": "lora", "rank": 2}
            for run, values in {"calm": 2.0 / steps, "also-calm": 2.2 / steps, "spike": np.where(steps == 10, 300.0,
                                                                                                 2.1 / steps)}.items()
            for split in ("train", "val") for step, value in zip(steps, values, strict=True)]
    metrics = pd.DataFrame(rows)
    for figure in (plots.validation_curves(metrics), plots.training_loss(metrics, smooth=1)):
        lines = {t.name: t for t in figure.data if t.mode == "lines"}
        assert set(lines) == {"calm", "also-calm", "spike (flagged)"} and lines["spike (flagged)"].line.dash == "dot"
        assert "spike (above 10x the median first value)" in figure.layout.title.text
        low, high = figure.layout.yaxis.range  # log10 units: the calm runs' 0.1 to 2.2, not the spike's 300
        assert figure.layout.yaxis.type == "log" and 10**low < 0.1 and 2.2 < 10**high < 3
        linear = next(b for b in figure.layout.updatemenus[0].buttons if b.label == "linear")
        assert linear.args[0]["yaxis.range"][1] < 3  # the toggle keeps the spike off the linear axis too
