"""Searches that prune (Optuna in-process), promotion by resume_run, and checkpoint write costs, on digits."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import optuna
import pytest
import torch
from safetensors.torch import load_file

import workbench as wb
from workbench.runs.search import STUDY_FILE, STUDY_NAME

FAST = {"eval_every": 10, "save_every": 10, "progress_bar": False}
SPACE = {"variants": ["lora", "vera", "lora-fa"], "ranks": [2, 8], "lrs": [1e-3, 1e-2]}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _study(out):
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / STUDY_FILE}")


def _outcome(out) -> dict[int, tuple]:
    """Each finished or pruned trial: its number, parameters, state, value and intermediate values."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return {t.number: (t.params, t.state, t.value, t.intermediate_values) for t in _study(out).get_trials(states=done)}


class Interrupt(wb.Callback):
    """Ctrl-C at step ``step`` of the ``nth`` run that reaches it (counted from 1)."""

    def __init__(self, nth: int, step: int) -> None:
        self.nth, self.step, self.seen = nth, step, 0

    def on_step(self, trainer, loss):
        if trainer.step == self.step:
            self.seen += 1
            if self.seen == self.nth:
                raise KeyboardInterrupt


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """An uninterrupted search of 8 trials with successive halving."""
    out = tmp_path_factory.mktemp("search")
    table = wb.sweep("digits", **SPACE, steps=40, out=out, search="optuna", trials=8,
                     pruner="successive-halving", **FAST)
    return out, table


def test_a_pruned_search_stops_trials_early_and_records_where(searched):
    out, table = searched
    study = _study(out)
    states = [t.state for t in study.trials]
    assert len(states) == 8 and optuna.trial.TrialState.PRUNED in states
    pruned = table[table["status"] == "pruned"]
    assert len(pruned) >= 1 and (pruned["steps_done"] < 40).all()
    for row in pruned.itertuples():
        trial = next(t for t in study.trials if t.user_attrs["run"] == row.run)
        assert trial.state == optuna.trial.TrialState.PRUNED
        assert row.steps_done == max(trial.intermediate_values)  # stopped at the evaluation that was pruned
        assert wb.load_checkpoints(row.path)["step"].max() == row.steps_done  # with a checkpoint there
        logged = wb.load_metrics(row.path)
        assert logged["step"].max() == row.steps_done  # nothing logged past the pruning
    finished = table[table["status"] == "finished"]
    for row in finished.itertuples():
        trial = next(t for t in study.trials if t.user_attrs["run"] == row.run)
        assert trial.value == pytest.approx(row.best_value)  # the objective: the run's best validation loss
    assert study.best_value == pytest.approx(finished["best_value"].min())


def test_an_interrupted_search_continues_the_same_study(searched, tmp_path):
    out, _ = searched
    again = tmp_path / "search"
    with pytest.raises(KeyboardInterrupt):
        wb.sweep("digits", **SPACE, steps=40, out=again, search="optuna", trials=8, pruner="successive-halving",
                 callbacks=[Interrupt(nth=3, step=15)], **FAST)
    assert len(_outcome(again)) < 8
    wb.sweep("digits", **SPACE, steps=40, out=again, search="optuna", trials=8, pruner="successive-halving", **FAST)

    def same(outcome):  # trial numbers shift by the failed trial the interruption left
        return [(params, state, value, steps) for _, (params, state, value, steps) in sorted(outcome.items())]

    assert same(_outcome(again)) == same(_outcome(out))
    assert _study(again).best_params == _study(out).best_params
    assert _study(again).best_value == _study(out).best_value


def test_a_search_refuses_another_space_in_the_same_directory(searched):
    out, _ = searched
    with pytest.raises(ValueError, match="another search.*space"):
        wb.sweep("digits", ["lora"], [2], steps=40, out=out, lrs=[1e-2], search="optuna", trials=8,
                 pruner="successive-halving", **FAST)


@pytest.mark.parametrize(("arguments", "message"), [
    ({"search": "optuna"}, "trials"),
    ({"search": "optuna", "trials": 2, "pruner": "asha"}, "valid pruners"),
    ({"search": "grid", "pruner": "median"}, "search='optuna'"),
    ({"search": "optuna", "trials": 2, "seeds": [0, 1]}, "one seed"),
])
def test_bad_search_arguments_are_refused_before_anything_runs(arguments, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        wb.sweep("digits", ["lora"], [2], steps=20, out=tmp_path / "runs", **arguments, **FAST)
    assert not (tmp_path / "runs").exists()


def _same_run(a, b) -> None:
    """Bit-exact: the same metrics log (timings aside) and the same final parameters and optimizer state."""
    a, b = Path(a), Path(b)
    ma, mb = wb.load_metrics(a), wb.load_metrics(b)
    keep = ["step", "split", "metric", "value"]
    assert ma[ma["split"] != "checkpoint"][keep].reset_index(drop=True).equals(
        mb[mb["split"] != "checkpoint"][keep].reset_index(drop=True))
    last = wb.load_checkpoints(b)["path"].iloc[-1].rsplit("/", 1)[-1]
    for name in ("model.safetensors", "optimizer.safetensors"):
        x, y = load_file(a / "checkpoints" / last / name), load_file(b / "checkpoints" / last / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_resume_run_extends_a_finished_run_as_if_it_had_never_stopped(tmp_path):
    wb.train("digits", "lora", 2, tmp_path / "straight", steps=40, lr=1e-2, **FAST)
    wb.train("digits", "lora", 2, tmp_path / "extended", steps=20, lr=1e-2, **FAST)
    record = wb.resume_run(tmp_path / "extended", steps=40, progress_bar=False)
    assert record["status"] == "finished" and record["steps_done"] == 40 and record["settings"]["steps"] == 40
    _same_run(tmp_path / "extended", tmp_path / "straight")
    straight, extended = (wb.load_runs(tmp_path / name).iloc[0] for name in ("straight", "extended"))
    assert extended["test_loss"] == straight["test_loss"] and extended["best_step"] == straight["best_step"]


def test_resume_run_continues_a_pruned_trial_to_its_end(searched, tmp_path):
    _, table = searched
    row = table[table["status"] == "pruned"].iloc[0]
    pruned = shutil.copytree(row.path, tmp_path / "runs" / row.run)  # the search's own directory stays as it was
    settings = wb.run_settings(pruned)
    reference = tmp_path / "straight"
    wb.train("digits", settings["variant"], settings["rank"], reference, steps=40, lr=settings["lr"], **FAST)
    record = wb.resume_run(pruned, progress_bar=False)
    assert record["status"] == "finished" and record["steps_done"] == 40
    _same_run(pruned, reference)
    assert wb.load_runs(tmp_path / "runs").iloc[0]["status"] == "finished"  # the same row, continued


@pytest.mark.parametrize(("settings", "steps", "message"), [
    ({"schedule": "cosine"}, 40, "cosine"),
    ({}, 10, "at least"),
    ({}, 20, "finished"),
])
def test_resume_run_refuses_what_it_cannot_continue_exactly(settings, steps, message, tmp_path):
    wb.train("digits", "lora", 2, tmp_path / "run", steps=20, lr=1e-2, **FAST, **settings)
    with pytest.raises(ValueError, match=message):
        wb.resume_run(tmp_path / "run", steps=steps)
    assert wb.load_runs(tmp_path / "run").iloc[0]["steps"] == 20  # unchanged


def test_each_checkpoints_write_time_and_size_are_logged_and_summarised(tmp_path):
    run = wb.train("digits", "lora", 2, tmp_path / "run", steps=30, lr=1e-2, **FAST)
    logged = wb.load_metrics(run)
    writes = logged[logged["split"] == "checkpoint"].pivot(index="step", columns="metric", values="value")
    checkpoints = wb.load_checkpoints(run).set_index("step")
    assert list(writes.index) == list(checkpoints.index) == [10, 20, 30]
    # the logged bytes are the checkpoint's files as they lie on disk, counted here independently
    on_disk = [sum(p.stat().st_size for p in (run / "checkpoints" / f"step-{s:08d}").iterdir()) for s in writes.index]
    assert writes["bytes"].tolist() == on_disk
    assert (writes["write_time"] > 0).all()
    cost = wb.checkpoint_cost(run).iloc[0]
    assert cost["checkpoints"] == 3
    assert cost["write_seconds"] == pytest.approx(writes["write_time"].mean())
    assert cost["write_total"] == pytest.approx(writes["write_time"].sum())
    assert cost["checkpoint_bytes"] == pytest.approx(writes["bytes"].mean())
    assert cost["overhead"] == pytest.approx(cost["write_total"] / wb.load_runs(run).iloc[0]["wall_time"])


class SlowWrites(wb.CheckpointManager):
    """A manager whose every write is reported to take ``seconds`` (the cost injected)."""

    seconds = 0.25

    def take_costs(self):
        return [type(cost)(cost.step, self.seconds, cost.bytes) for cost in super().take_costs()]


def test_the_auto_interval_is_youngs_formula_for_an_injected_write_cost(tmp_path):
    task = wb.tasks.get_task("digits")
    model = wb.add_adapters(task.base_model(), "lora", 2)
    manager = SlowWrites(tmp_path / "checkpoints")
    mtbf = 3600.0
    trainer = wb.Trainer(model, task, steps=200, eval_every=5, save_every="auto", mtbf="1h", checkpoints=manager,
                         progress_bar=False)
    assert trainer.fit() == "finished"
    plan = trainer.save_plan
    assert plan.write_seconds == SlowWrites.seconds and plan.mtbf_seconds == mtbf
    ideal = math.sqrt(2 * SlowWrites.seconds * mtbf) / plan.step_seconds  # Young's interval, in steps
    assert plan.steps == max(1, round(ideal / 5)) * 5
    saved = manager.list()["step"].tolist()
    assert saved[0] == 5  # the first checkpoint at the first evaluation measures the cost
    assert all(b - a >= 5 for a, b in zip(saved, saved[1:], strict=False))
    assert saved[-1] == 200


def test_the_command_line_searches_resumes_and_plans_the_interval(tmp_path, capsys):
    from workbench.cli import main

    out = tmp_path / "search"
    assert main(["sweep", "--variants", "lora,vera", "--ranks", "2", "--lrs", "0.001,0.01", "--steps", "20",
                 "--eval-every", "10", "--save-every", "10", "--quiet", "--search", "optuna", "--trials", "3",
                 "--pruner", "median", "--out", str(out)]) == 0
    assert len(_study(out).trials) == 3 and wb.load_runs(out)["status"].isin(["finished", "pruned"]).all()
    capsys.readouterr()
    run = tmp_path / "run"
    assert main(["train", "--variant", "lora", "--rank", "2", "--steps", "20", "--eval-every", "10", "--save-every",
                 "auto", "--mtbf", "30m", "--quiet", "--out", str(run)]) == 0
    record = wb.load_runs(run).iloc[0]
    plan = wb.checkpoint_cost(run).iloc[0]
    assert record["status"] == "finished" and plan["mtbf"] == 1800.0 and plan["interval_steps"] % 10 == 0
    assert main(["resume", str(run), "--steps", "30", "--quiet"]) == 0
    assert wb.load_runs(run).iloc[0]["steps_done"] == 30
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["resume", str(run), "--steps", "30"])
    assert exit_.value.code == 2 and "give more steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--variant", "lora", "--rank", "2", "--save-every", "auto", "--out", str(tmp_path / "x")])
    assert "--mtbf" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_report_shows_the_search_against_the_grid_and_the_checkpoint_interval(searched, tmp_path):
    out, table = searched
    grid = wb.sweep("digits", **SPACE, steps=40, out=tmp_path / "grid", **FAST)
    page = wb.write_report(out, tmp_path / "report.html", grid=tmp_path / "grid").read_text()
    assert "<h2>Search</h2>" in page and "<h2>How often to save</h2>" in page
    steps = int(table["steps_done"].sum())
    assert f"{steps / (12 * 40):.0%} of the full grid" in page  # 12 configurations of 40 steps
    grid_best = grid.loc[grid["best_value"].idxmin(), "run"]
    found = table.loc[table["best_value"].idxmin(), "run"]
    assert ("It found the grid's best configuration." in page) == (found == grid_best)
