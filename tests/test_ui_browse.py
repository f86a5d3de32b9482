"""The CheckpointBrowser and Compare panels, headless, on a small real sweep; and the library functions they use."""

from __future__ import annotations

import html
import json
import logging
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import workbench as wb
from workbench.ui.browser import BEST_STYLE, CheckpointBrowser
from workbench.ui.compare import Compare

GRID = {"variants": ["lora", "vera"], "ranks": [2, 4], "steps": 30, "lrs": [1e-2]}
SETTINGS = {"eval_every": 10, "save_every": 10, "progress_bar": False}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Four finished runs (lora, vera x rank 2, 4), a checkpoint and an evaluation every 10 steps. Do not change them."""
    out = tmp_path_factory.mktemp("browse") / "runs"
    wb.sweep("digits", out=out, **GRID, **SETTINGS)
    return out


@pytest.fixture
def scratch(runs, tmp_path) -> Path:
    """A copy of the runs, for tests that delete or add."""
    return Path(shutil.copytree(runs, tmp_path / "runs"))


@pytest.fixture
def no_callback_errors(caplog):
    """Fails a test if ipywidgets logged an exception raised in a widget callback."""
    caplog.set_level(logging.WARNING)
    yield
    assert not [r for r in caplog.records if "Exception in" in r.getMessage()], caplog.text


def recorded(run_or_runs: Path) -> pd.DataFrame:
    """Every checkpoint's path and metrics, read straight from its progress.json."""
    rows = [{"path": str(progress.parent), **json.loads(progress.read_text())["metrics"]}
            for progress in sorted(run_or_runs.glob("**/checkpoints/step-*/progress.json"))]
    return pd.DataFrame(rows)


def table_rows(widget_html: str) -> list[tuple[str, str]]:
    """(style, data-key) of each row of a panel's HTML table."""
    return [(style, html.unescape(key)) for style, key in re.findall(r'<tr style="([^"]*)" data-key="([^"]*)">',
                                                                     widget_html)]


def status(panel) -> str:
    return html.unescape(panel.status.value)


def val_batch() -> torch.Tensor:
    inputs, _ = next(iter(wb.tasks.get_task("digits").loaders(0)["val"]))
    return inputs


def outputs(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(inputs)


def run_dir(runs: Path, variant: str, rank: int) -> Path:
    return runs / f"{variant}-r{rank}-lr0.01-s0"


# -- library functions -----------------------------------------------------------------------------


def test_load_checkpoints_and_run_settings_read_the_run_directories(runs):
    expected = pd.concat([wb.CheckpointManager(run / "checkpoints").list().assign(run=run.name)
                          for run in sorted(runs.iterdir())], ignore_index=True)
    table = wb.load_checkpoints(runs)
    assert list(table.columns[:3]) == ["run", "step", "path"]
    assert table[expected.columns].equals(expected)
    assert wb.load_checkpoints(run_dir(runs, "vera", 2))["path"].tolist() == \
        wb.CheckpointManager(run_dir(runs, "vera", 2) / "checkpoints").list()["path"].tolist()
    settings = wb.run_settings(run_dir(runs, "vera", 4))
    assert (settings["variant"], settings["rank"], settings["monitor"], settings["mode"]) == ("vera", 4, "val_loss", "min")
    with pytest.raises(ValueError, match="not a run directory"):
        wb.run_settings(runs)


def test_evaluate_checkpoint_matches_evaluate_checkpoints(runs):
    run = run_dir(runs, "lora", 2)
    for split in ("val", "test"):
        every = wb.evaluate_checkpoints(run, split)
        for _, row in every.iterrows():
            assert wb.evaluate_checkpoint(row["path"], split) == {
                f"{split}_loss": row[f"{split}_loss"], f"{split}_acc": row[f"{split}_acc"]}
    with pytest.raises(ValueError, match="valid splits: train, val, test"):
        wb.evaluate_checkpoint(every["path"][0], "dev")


def test_delete_checkpoint_removes_it_and_refuses_a_locked_directory(scratch):
    checkpoints = run_dir(scratch, "lora", 2) / "checkpoints"
    wb.delete_checkpoint(checkpoints / "step-00000010")
    assert not (checkpoints / "step-00000010").exists()
    assert wb.CheckpointManager(checkpoints).list()["step"].tolist() == [20, 30]
    with pytest.raises(wb.CheckpointError, match="no such checkpoint"):
        wb.delete_checkpoint(checkpoints / "step-00000010")
    with wb.CheckpointManager(checkpoints) as writer:
        model, _ = wb.load_run_model(checkpoints / "step-00000030")
        writer.save(40, model)  # holds the directory's lock until closed
        with pytest.raises(wb.CheckpointError, match="another process is writing"):
            wb.delete_checkpoint(checkpoints / "step-00000020")
    assert (checkpoints / "step-00000020").is_dir()


# -- CheckpointBrowser -----------------------------------------------------------------------------


def test_browser_lists_the_checkpoints_and_highlights_the_best(runs):
    browser = CheckpointBrowser(runs)
    listed = [str(p) for run in sorted(runs.iterdir()) for p in wb.CheckpointManager(run / "checkpoints").list()["path"]]
    assert browser.checkpoints["path"].tolist() == listed
    rows = table_rows(browser.table.value)
    assert [key for _, key in rows] == listed
    assert [path for _, path in browser.selector.options] == listed

    metrics = recorded(runs)
    independent = metrics.loc[metrics["val_loss"].idxmin(), "path"]
    assert browser.best == wb.best_checkpoint(runs) == Path(independent)
    assert [key for style, key in rows if style.startswith(BEST_STYLE)] == [independent]
    assert browser.selector.value == independent  # selected on opening
    assert browser._repr_mimebundle_()[WIDGET_VIEW]["model_id"] == browser.widget.model_id

    single = CheckpointBrowser(run_dir(runs, "vera", 2))
    vera = recorded(run_dir(runs, "vera", 2))
    assert single.checkpoints["path"].tolist() == vera["path"].tolist()
    assert single.best == wb.best_checkpoint(run_dir(runs, "vera", 2)) == Path(vera.loc[vera["val_loss"].idxmin(), "path"])


def test_browser_load_and_evaluate_agree_with_the_library(runs, no_callback_errors):
    browser = CheckpointBrowser(runs)
    run = run_dir(runs, "lora", 4)
    chosen = browser.select(str(run / "checkpoints" / "step-00000020"))
    browser.load_button.click()
    reference, progress = wb.load_run_model(chosen)
    assert progress["step"] == 20
    assert torch.equal(outputs(browser.model, val_batch()), outputs(reference, val_batch()))

    browser.evaluate_button.click()
    row = wb.evaluate_checkpoints(run, "val").set_index("path").loc[str(chosen)]
    assert browser.evaluation["val_loss"] == row["val_loss"] and browser.evaluation["val_acc"] == row["val_acc"]
    assert f"val_loss {row['val_loss']:.4g}" in status(browser)

    browser.select(browser.best)  # the run's test figures were measured on the best checkpoint
    best_run = wb.load_runs(runs).set_index("run").loc[browser.best.parent.parent.name]
    result = browser.evaluate()
    assert (result["test_loss"], result["test_acc"]) == pytest.approx((best_run["test_loss"], best_run["test_acc"]))


def test_browser_merge_keeps_the_outputs(runs, no_callback_errors):
    browser = CheckpointBrowser(runs)
    chosen = browser.select(str(run_dir(runs, "vera", 4) / "checkpoints" / "step-00000030"))
    browser.merge_button.click()  # loads the selected checkpoint first
    assert browser.loaded == chosen
    assert all(layer.merged for _, layer in wb.adapter_layers(browser.model))
    reference, _ = wb.load_run_model(chosen)
    torch.testing.assert_close(outputs(browser.model, val_batch()), outputs(reference, val_batch()),
                               atol=1e-4, rtol=1e-5)
    assert "max |merged - unmerged|" in status(browser)
    assert browser.merge() < 1e-4  # merging again compares against the unmerged outputs again


def test_browser_export_writes_a_peft_adapter_that_imports_to_the_same_outputs(runs, tmp_path, no_callback_errors):
    browser = CheckpointBrowser(runs)
    chosen = browser.select(str(run_dir(runs, "lora", 2) / "checkpoints" / "step-00000020"))
    browser.export_to.value = str(tmp_path / "adapter")
    browser.export_button.click()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    assert str(tmp_path / "adapter") in status(browser)
    imported = wb.import_peft(wb.tasks.get_task("digits").base_model(), tmp_path / "adapter")
    reference, _ = wb.load_run_model(chosen)
    torch.testing.assert_close(outputs(imported, val_batch()), outputs(reference, val_batch()))

    browser.export_button.click()  # the directory is not empty now
    assert "exists and is not an empty directory" in status(browser)
    assert browser.export(tmp_path / "again") == tmp_path / "again"


def test_browser_delete_removes_the_directory_and_the_row(scratch, no_callback_errors):
    browser = CheckpointBrowser(scratch)
    doomed = browser.select(str(run_dir(scratch, "vera", 2) / "checkpoints" / "step-00000010"))
    browser.delete_button.click()  # the first click only asks for confirmation
    assert doomed.is_dir() and "Confirm delete" in status(browser)
    browser.delete_button.click()
    assert not doomed.exists()
    assert str(doomed) not in browser.checkpoints["path"].tolist()
    assert str(doomed) not in [key for _, key in table_rows(browser.table.value)]
    assert browser.checkpoints["path"].tolist() == wb.load_checkpoints(scratch)["path"].tolist()
    assert len(browser.checkpoints) == 11 and f"deleted {doomed}" in status(browser)


def test_browser_filters_by_run_sorts_best_first_and_selects_the_best_by_click(runs, no_callback_errors):
    browser = CheckpointBrowser(runs)
    metrics = recorded(runs)
    lora = run_dir(runs, "lora", 2)
    browser.run_filter.value = lora.name
    listed = recorded(lora)["path"].tolist()
    assert [path for _, path in browser.selector.options] == listed == [k for _, k in table_rows(browser.table.value)]
    assert browser.selector.value in listed  # the best is of another run: a checkpoint of this one is selected
    browser.run_filter.value = ""
    browser.sort_by.value = "best"
    by_loss = metrics.sort_values("val_loss", kind="stable")["path"].tolist()
    assert [key for _, key in table_rows(browser.table.value)] == by_loss  # the best on the first row
    assert f"val_loss {metrics['val_loss'].min():.4g}" in browser.summary.value  # and named above the table
    browser.select(listed[0])
    browser.best_button.click()
    assert browser.selector.value == str(browser.best) == by_loss[0]
    browser.sort_by.value = "step"
    steps = [int(Path(key).name.split("-")[1]) for _, key in table_rows(browser.table.value)]
    assert steps == sorted(steps)


def test_browser_keeps_every_evaluation_and_clears_the_views_of_another_checkpoint(runs, no_callback_errors):
    browser = CheckpointBrowser(runs)
    first = browser.select(str(run_dir(runs, "lora", 4) / "checkpoints" / "step-00000020"))
    browser.evaluate()
    browser.spectrum()
    assert browser._figure_box.children == (browser.figure,) and "effective rank" in browser.details.value
    second = browser.select(str(run_dir(runs, "vera", 2) / "checkpoints" / "step-00000030"))
    assert browser._figure_box.children == () and browser.details.value == "" and browser.shown_spectrum is None
    browser.evaluate()
    browser.select(first)
    browser.evaluate()  # again: its row is replaced, not repeated
    assert browser.evaluations["path"].tolist() == [str(second), str(first)]
    for path in (first, second):
        expected = wb.evaluate_checkpoint(path, "val")["val_loss"]
        row = browser.evaluations.set_index("path").loc[str(path)]
        assert row["val_loss"] == expected and f"{expected:.4g}" in browser.evaluations_table.value


def test_browser_delete_selects_the_next_checkpoint_not_the_best(scratch, no_callback_errors):
    browser = CheckpointBrowser(scratch)
    listed = [path for _, path in browser.selector.options]
    doomed = next(path for path in listed[:-1] if path != str(browser.best) and listed[listed.index(path) + 1]
                  != str(browser.best))
    browser.select(doomed)
    browser.delete()
    assert browser.selector.value == listed[listed.index(doomed) + 1] != str(browser.best)


def test_browser_delete_while_another_manager_holds_the_lock_shows_the_error(scratch, no_callback_errors):
    checkpoints = run_dir(scratch, "lora", 4) / "checkpoints"
    with wb.CheckpointManager(checkpoints) as writer:
        model, _ = wb.load_run_model(checkpoints / "step-00000030")
        writer.save(40, model)  # the lock is held until the manager closes
        browser = CheckpointBrowser(scratch)
        before = browser.checkpoints["path"].tolist()
        browser.select(str(checkpoints / "step-00000020"))
        browser.delete_button.click()
        browser.delete_button.click()
        assert "CheckpointError" in status(browser) and "another process is writing" in status(browser)
        assert (checkpoints / "step-00000020").is_dir()
        assert browser.checkpoints["path"].tolist() == before == wb.load_checkpoints(scratch)["path"].tolist()


def test_browser_failed_actions_show_messages(runs, scratch, tmp_path, no_callback_errors):
    for path, message in ((tmp_path / "missing", "no such directory"), (tmp_path, "holds no run")):
        with pytest.raises(ValueError, match=message):
            CheckpointBrowser(path)
    browser = CheckpointBrowser(runs)
    browser.export_to.value = " "
    browser.export_button.click()
    assert "type the directory to export to" in status(browser)
    for wrong, message in ((99, "no checkpoint of step 99; steps: 10, 20, 30"), (20, "several runs"),
                           (str(tmp_path), "not one of the checkpoints")):
        with pytest.raises(ValueError, match=message):
            browser.select(wrong)

    empty = tmp_path / "empty-run"  # a run that has saved nothing yet
    empty.mkdir()
    shutil.copy(run_dir(runs, "lora", 2) / "config.json", empty)
    browser = CheckpointBrowser(empty)
    assert browser.checkpoints.empty and browser.selector.value is None and browser.best is None
    for button in (browser.load_button, browser.evaluate_button, browser.merge_button, browser.export_button,
                   browser.reduce_button, browser.spectrum_button):
        browser.status.value = ""
        button.click()
        assert "no checkpoint selected" in status(browser)
    browser.delete_button.click()
    assert "no checkpoint selected" in status(browser) and browser.model is None


def test_browser_reduce_rank_equals_reduce_checkpoint_and_adds_a_rank_reduced_row(scratch, tmp_path,
                                                                                      no_callback_errors):
    browser = CheckpointBrowser(scratch)
    chosen = browser.select(str(run_dir(scratch, "lora", 4) / "checkpoints" / "step-00000030"))
    browser.reduce_mode.value, browser.reduce_rank.value = "rank", 2
    browser.reduce_button.click()
    out = scratch / "lora-r4-lr0.01-s0-reduced-r2"
    assert browser.reduced == out / "checkpoints" / "step-00000030"
    assert browser.selector.value == str(chosen)  # the source stays selected

    listed = browser.checkpoints.set_index("path")
    assert len(listed) == 13 and listed["stage"].tolist().count("rank-reduced") == 1
    assert (listed.loc[str(browser.reduced), "run"], listed.loc[str(browser.reduced), "stage"]) == (
        out.name, "rank-reduced")
    assert str(browser.reduced) in [key for _, key in table_rows(browser.table.value)]
    # Recorded on the reduced model in memory, re-measured on the checkpoint as loaded: two code paths over the
    # same contiguous tensors, so they agree within float32 rounding of the split's mean loss (not bit for bit).
    again = wb.evaluate_checkpoint(browser.reduced, "val")["val_loss"]
    assert listed.loc[str(browser.reduced), "val_loss"] == pytest.approx(again, rel=1e-6)

    path, direct = wb.reduce_checkpoint(chosen, tmp_path / "direct", rank=2)
    pd.testing.assert_frame_equal(browser.reduction, direct)
    assert browser.reduction["new_rank"].tolist() == [2, 2, 2]
    for _, row in browser.reduction.iterrows():  # the per-layer table is in the panel
        assert f"<td style=\"padding:2px 8px\">{row['layer']}</td>" in browser.details.value
        assert f"{row['kept_energy']:.4g}" in browser.details.value
    reduced, _ = wb.load_run_model(browser.reduced)
    reference, _ = wb.load_run_model(chosen)
    wb.reduce_rank(reference, rank=2)  # reduced here, in memory: another path to the same factors
    assert torch.allclose(outputs(reduced, val_batch()), outputs(reference, val_batch()), rtol=1e-5, atol=1e-6)
    assert f"into the run {out.name}" in status(browser) and "val_acc" in status(browser)

    browser.reduce_mode.value, browser.reduce_energy.value = "energy", 0.5
    browser.reduce_button.click()
    by_energy = wb.spectrum(chosen)
    kept = wb.effective_rank(by_energy, 0.5)
    assert browser.reduced.parent.parent.name == "lora-r4-lr0.01-s0-reduced-e0.5"
    assert browser.reduction.set_index("layer")["new_rank"].to_dict() == kept.to_dict()
    assert (browser.reduction["kept_energy"] >= 0.5).all()

    single = CheckpointBrowser(run_dir(scratch, "lora", 2))  # a browser over one run: the new run goes beside it
    single.reduce(rank=1)
    assert (scratch / "lora-r2-lr0.01-s0-reduced-r1" / "config.json").exists()
    assert len(single.checkpoints) == 3 and "lists both" in status(single)


def test_browser_spectrum_draws_the_selected_checkpoint_and_its_effective_ranks(runs, no_callback_errors):
    browser = CheckpointBrowser(runs)
    assert browser.figure is None  # no figure (and no plotly.js) until asked for
    chosen = browser.select(str(run_dir(runs, "lora", 4) / "checkpoints" / "step-00000020"))
    browser.spectrum_button.click()
    figure = browser.figure
    expected = wb.spectrum(chosen)
    pd.testing.assert_frame_equal(browser.shown_spectrum, expected)
    for layer, rows in expected.groupby("layer"):
        values, energies = [t for t in figure.data if t.name == layer]  # singular values, then cumulative energy
        assert list(values.x) == rows["index"].tolist() == [1, 2, 3, 4]
        assert list(values.y) == rows["value"].tolist() and list(energies.y) == rows["energy"].tolist()
    ranks = wb.effective_rank(expected, 0.9)
    assert browser.effective_ranks.equals(ranks)
    assert all(f"{layer} {rank}" in status(browser) for layer, rank in ranks.items())
    assert [shape.y0 for shape in figure.layout.shapes] == [0.9]

    other = browser.select(str(run_dir(runs, "lora", 2) / "checkpoints" / "step-00000030"))
    browser.reduce_energy.value = 0.5
    browser.spectrum()
    assert browser.figure is figure and browser._figure_box.children == (figure,)  # redrawn in place
    expected = wb.spectrum(other)
    assert sorted(y for t in figure.data if t.xaxis == "x" for y in t.y) == sorted(expected["value"])
    assert browser.effective_ranks.equals(wb.effective_rank(expected, 0.5))
    assert [shape.y0 for shape in figure.layout.shapes] == [0.5] and other.parent.parent.name in figure.layout.title.text


def test_browser_reduce_and_spectrum_failures_show_in_the_status_line(scratch, no_callback_errors):
    browser = CheckpointBrowser(scratch)
    before = sorted(p.name for p in scratch.iterdir())
    browser.select(str(run_dir(scratch, "vera", 4) / "checkpoints" / "step-00000030"))
    browser.reduce_button.click()
    assert "'vera' cannot be rank-reduced" in status(browser)
    browser.select(str(run_dir(scratch, "lora", 2) / "checkpoints" / "step-00000030"))
    browser.reduce_rank.value = 4
    browser.reduce_button.click()
    assert "rank 4 for layer" in status(browser) and "current rank 2" in status(browser)
    browser.reduce_mode.value, browser.reduce_energy.value = "energy", 1.5
    browser.reduce_button.click()
    assert "energy must be a number in (0, 1]" in status(browser)
    browser.spectrum_button.click()
    assert "energy must be a number in (0, 1]" in status(browser) and browser.figure is None
    assert sorted(p.name for p in scratch.iterdir()) == before  # nothing written
    with pytest.raises(ValueError, match="not both"):
        browser.reduce(rank=1, energy=0.9)

    browser.reduce_mode.value, browser.reduce_rank.value = "rank", 1
    browser.reduce_button.click()
    browser.reduce_button.click()  # the same reduction again: its directory holds a run now
    assert "holds a run already" in status(browser)
    assert len(browser.checkpoints) == 13


# -- Compare ---------------------------------------------------------------------------------------


def line_traces(compare: Compare) -> dict[str, tuple[list, list]]:
    return {t.name: (list(t.x), list(t.y)) for t in compare.figure.data if t.mode == "lines"}


def test_compare_filters_and_draws_the_logged_validation_curves(runs, no_callback_errors):
    compare = Compare(runs)
    assert compare._repr_mimebundle_()[WIDGET_VIEW]["model_id"] == compare.widget.model_id
    names = sorted(p.name for p in runs.iterdir())
    assert list(compare.variants.value) == ["lora", "vera"] and list(compare.ranks.value) == [2, 4]
    assert list(compare.runs.value) == names
    compare.variants.value = ("vera",)
    assert [value for _, value in compare.runs.options] == [n for n in names if n.startswith("vera")]
    compare.ranks.value = (2,)
    assert [value for _, value in compare.runs.options] == ["vera-r2-lr0.01-s0"]
    compare.variants.value = ("lora", "vera")
    assert list(compare.runs.value) == ["lora-r2-lr0.01-s0", "vera-r2-lr0.01-s0"]

    metrics = wb.load_metrics(runs)
    figure = compare.figure
    for metric in ("loss", "acc"):
        compare.metric.value = metric
        assert compare.figure is figure
        logged = metrics[(metrics["split"] == "val") & (metrics["metric"] == metric)]
        expected = {run: (rows["step"].tolist(), rows["value"].tolist()) for run, rows in logged.groupby("run")
                    if run in compare.runs.value}
        assert line_traces(compare) == expected
    markers = {t.name: list(t.x) for t in figure.data if t.mode == "markers"}
    assert markers == {f"{run} checkpoints": [10, 20, 30] for run in compare.runs.value}

    shown = [key for _, key in table_rows(compare.table.value)]
    checkpoints = recorded(runs).assign(run=lambda t: t["path"].map(lambda p: Path(p).parent.parent.name))
    best_acc = checkpoints[checkpoints["run"].isin(compare.runs.value)].groupby("run")["val_acc"].max()
    assert shown == list(best_acc.sort_values(ascending=False, kind="stable").index)  # best first by the metric
    assert compare.run_summary()["lr"].tolist() == [0.01, 0.01]

    assert [value for _, value in compare.lrs.options] == [0.01]
    compare.lrs.value = ()
    assert compare.runs.options == ()  # the lr filter passes no run
    compare.lrs.value = (0.01,)
    assert len(compare.runs.options) == 2


def test_compare_exports_and_opens_the_picked_best(runs, tmp_path, no_callback_errors):
    compare = Compare(runs)
    compare.export_button.click()
    assert "pick the best first" in status(compare)
    best = compare.pick_best()
    compare.export_to.value, compare.export_format.value = str(tmp_path / "merged"), "merged"
    compare.export_button.click()
    assert [path.name for path in (tmp_path / "merged").iterdir()] == ["model.safetensors"]
    plain = wb.tasks.get_task("digits").base_model()
    from safetensors.torch import load_model
    load_model(plain, tmp_path / "merged" / "model.safetensors")
    reference, _ = wb.load_run_model(best)
    torch.testing.assert_close(outputs(plain, val_batch()), outputs(reference, val_batch()), rtol=1e-5, atol=1e-5)
    compare.open_button.click()
    assert compare.browser is not None and compare.browser.selector.value == str(best)
    assert compare._browser_box.children == (compare.browser.widget,)


def test_compare_shows_the_pareto_fronts_and_lr_sensitivity_of_the_chosen_configurations(runs, no_callback_errors):
    compare = Compare(runs)
    pareto, sensitivity = compare.pareto, compare.sensitivity
    table = wb.load_runs(runs)  # one seed per configuration: a configuration's point is its run's best value
    for axis in ("x", "x2", "x3"):  # trainable parameters, peak memory, wall time
        points = [t for t in pareto.data if t.name != "Pareto front" and t.xaxis == axis]
        assert [t.name for t in points] == ["lora", "vera"]
        assert sum(len(t.x) for t in points) == len(table) == 4
    shown = {name: (x, y) for t in pareto.data if t.name != "Pareto front" and t.xaxis == "x"
             for name, x, y in zip(t.customdata[:, 0], t.x, t.y, strict=True)}
    assert shown == {f"{row.variant} r{row.rank} lr=0.01": (row.trainable, pytest.approx(row.best_value))
                     for row in table.itertuples()}
    assert sorted(t.name for t in sensitivity.data if t.mode == "lines+markers") == ["lora r2", "lora r4", "vera r2",
                                                                                     "vera r4"]
    assert list(compare.summary["n"]) == [1, 1, 1, 1]

    compare.variants.value = ("vera",)
    assert compare.pareto is pareto and compare.sensitivity is sensitivity  # redrawn in place
    points = [t for t in pareto.data if t.name != "Pareto front" and t.xaxis == "x"]
    assert [t.name for t in points] == ["vera"] and len(points[0].x) == 2
    compare.runs.value = ()
    assert "No run chosen" in pareto.layout.title.text and "No run chosen" in sensitivity.layout.title.text


def test_compare_passes_the_baselines_without_a_rank(scratch, no_callback_errors):
    baseline = scratch / "head-copy"  # a run recorded as a baseline: variant "head", no rank, no options
    shutil.copytree(run_dir(scratch, "lora", 2), baseline)
    record = json.loads((baseline / "config.json").read_text())
    record["settings"].update(variant="head", rank=None, options={})
    (baseline / "config.json").write_text(json.dumps(record))
    compare = Compare(scratch)
    assert compare.ranks.options[-1] == ("none", 0) and "head-copy" in compare.runs.value
    assert [t.name for t in compare.pareto.data if t.xaxis == "x"] == ["lora", "vera", "head", "Pareto front"]
    assert "head" in [t.name for t in compare.sensitivity.data]
    compare.ranks.value = (2, 4)
    assert "head-copy" not in compare.runs.value and [value for _, value in compare.runs.options] == [
        name for name in sorted(p.name for p in scratch.iterdir()) if name != "head-copy"]
    compare.ranks.value = (0,)
    assert list(compare.runs.value) == ["head-copy"]


def test_compare_pick_best_over_the_chosen_runs(runs, no_callback_errors):
    compare = Compare(runs)
    compare.best_button.click()
    metrics = recorded(runs)
    assert compare.best == wb.best_checkpoint(runs) == Path(metrics.loc[metrics["val_loss"].idxmin(), "path"])
    assert str(compare.best) in status(compare)
    best_run = compare.best.parent.parent.name
    assert [key for style, key in table_rows(compare.table.value) if style == BEST_STYLE] == [best_run]
    assert [t.name for t in compare.figure.data if t.name == "best"] == ["best"]

    compare.variants.value = ("vera",)  # the best run is a lora one: the choice is dropped
    assert compare.best is None
    compare.metric.value = "acc"
    vera = pd.concat([recorded(run_dir(runs, "vera", rank)) for rank in (2, 4)], ignore_index=True)
    assert compare.pick_best() == Path(vera.loc[vera["val_acc"].idxmax(), "path"])

    compare.runs.value = ()
    compare.best_button.click()
    assert "choose at least one run" in status(compare)


def test_compare_refresh_shows_new_and_unfinished_runs(scratch, tmp_path, no_callback_errors):
    compare = Compare(scratch)
    compare.variants.value = ("vera",)
    growing = scratch / "lora-r4-copy"
    shutil.copytree(run_dir(scratch, "lora", 4), growing)
    with open(growing / "metrics.jsonl", "a") as log:
        log.write('{"step": 31, "split": "tr')  # a line still being written
    compare.refresh()
    assert list(compare.variants.value) == ["vera"]
    assert [value for _, value in compare.runs.options] == ["vera-r2-lr0.01-s0", "vera-r4-lr0.01-s0"]
    compare.variants.value = ("lora", "vera")
    assert "lora-r4-copy" in compare.runs.value
    assert line_traces(compare)["lora-r4-copy"] == line_traces(compare)["lora-r4-lr0.01-s0"]

    (tmp_path / "nothing").mkdir()
    for path, message in ((tmp_path / "missing", "no such directory"), (tmp_path / "nothing", "holds no run")):
        with pytest.raises(ValueError, match=message):
            Compare(path)
