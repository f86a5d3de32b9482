"""Sweeps on Ray: the in-process sweep's runs exactly, a killed worker's trial resumed from its checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from conftest import training_log, training_metrics
from safetensors.torch import load_file

import workbench as wb
from workbench.cli import main
from workbench.runs.executors import MissingExtraError, ray_connection

pytestmark = pytest.mark.skipif(find_spec("ray") is None, reason="needs Ray: pip install 'adapter-workbench[ray]'")

GRID = {"variants": ["lora", "vera"], "ranks": [2], "lrs": [1e-2], "seeds": [0, 1], "steps": 60,
        "eval_every": 20, "save_every": 20, "progress_bar": False}
COLUMNS = ["run", "variant", "rank", "lr", "seed", "trainable", "saved_bytes", "steps_done", "best_value", "best_step",
           "test_loss", "test_acc", "status"]
KILLED = "vera-r2-lr0.01-s1"


HEAD = """
import sys
from workbench.runs.executors import ray_connection
with ray_connection(num_cpus=2) as ray:
    print(ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.read()
"""


@pytest.fixture(scope="module", autouse=True)
def _environment(tmp_path_factory):
    """The test cache; and RAY_AUTH_MODE=token, which a driver that joins a Ray instance by address
    needs (Ray enables token authentication on the instances it starts) before it first imports ray."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        patch.setenv("RAY_AUTH_MODE", "token")
        yield


@pytest.fixture(scope="module")
def head():
    """A local Ray instance of 2 CPUs, started by the sweep's own helper in another process."""
    process = subprocess.Popen([sys.executable, "-c", HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    yield process
    process.communicate(timeout=60)  # closes its stdin: it shuts the instance down and ends


@pytest.fixture(scope="module")
def reference(head, tmp_path_factory):
    """The same sweep in this process (trained while the Ray instance boots), on one thread as the workers are."""
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return out, wb.sweep("digits", out=out, **GRID)
    finally:
        torch.set_num_threads(threads)


# A Ray worker and this process are two process setups (another interpreter, other libraries loaded,
# possibly other kernels chosen), so their numbers are compared within float32 rounding carried through
# 60 training steps, not bit for bit; which runs, steps and checkpoints exist must match exactly.
FLOAT_COLUMNS = ["best_value", "test_loss", "test_acc"]
RTOL, ATOL = 1e-4, 1e-6


def _same_table(table, reference) -> None:
    exact = [c for c in COLUMNS if c not in FLOAT_COLUMNS]
    assert table[exact].equals(reference[exact])
    for column in FLOAT_COLUMNS:
        assert table[column].tolist() == pytest.approx(reference[column].tolist(), rel=RTOL, abs=ATOL), column


def _same_metrics(run_dir, reference_dir) -> None:
    ours, theirs = training_metrics(wb.load_metrics(run_dir)), training_metrics(wb.load_metrics(reference_dir))
    keys = ["run", "step", "split", "metric"]
    assert ours[keys].equals(theirs[keys])
    assert ours["value"].tolist() == pytest.approx(theirs["value"].tolist(), rel=RTOL, abs=ATOL)


@pytest.fixture(scope="module")
def cluster(head, reference):
    """This process joined to the instance by its address, for the whole module: so both ways of
    connecting are used. Ray is first imported here, after RAY_AUTH_MODE is set."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    address = head.stdout.readline().strip()
    assert address, "the Ray instance did not start"
    with ray_connection(address):
        yield address
    assert not ray.is_initialized()


class Record(wb.Callback):
    """Appends (run, pid, torch threads, step) to ``file`` on every step; kills its own process once at
    ``kill`` = (run, step), first noting the run's checkpoints then (a marker, so the retry lives)."""

    def __init__(self, file: Path, kill: tuple[str, int] | None = None) -> None:
        self.file, self.kill = file, kill

    def on_step(self, trainer, loss):
        run = trainer.metrics_log.parent
        with open(self.file, "a") as file:
            file.write(json.dumps([run.name, os.getpid(), torch.get_num_threads(), trainer.step]) + "\n")
        marker = self.file.with_suffix(".killed")
        if (run.name, trainer.step) == self.kill and not marker.exists():
            marker.write_text(json.dumps(_checkpoint_files(run)))
            os.kill(os.getpid(), signal.SIGKILL)


class Fail(wb.Callback):
    """A bug in one trial: raises at step 30 of the run ``KILLED``, on every attempt."""

    def on_step(self, trainer, loss):
        if (trainer.metrics_log.parent.name, trainer.step) == (KILLED, 30):
            raise ValueError("a bug at step 30")


def _checkpoint_files(run: Path) -> dict[str, list[int]]:
    return {str(p.relative_to(run)): [p.stat().st_ino, p.stat().st_mtime_ns]
            for p in sorted(run.glob("checkpoints/step-*/*"))}


def _seen(file: Path) -> list[tuple[str, int, int, int]]:
    return [tuple(json.loads(line)) for line in file.read_text().splitlines()] if file.exists() else []


def _log(run: Path) -> list[tuple]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["split"], e["metric"]) for e in training_log(lines)]


def test_a_ray_sweep_gives_the_in_process_runs_and_skips_finished_trials(cluster, reference, tmp_path):
    ref_dir, ref_table = reference
    out = tmp_path / "runs"
    wb.sweep("digits", out=out, executor="ray", **{**GRID, "variants": ["lora"]})  # an earlier, partial sweep
    seen = tmp_path / "steps.jsonl"
    table = wb.sweep("digits", out=out, executor="ray", callbacks=[Record(seen)], **GRID)

    _same_table(table, ref_table)
    _same_metrics(out, ref_dir)
    steps = _seen(seen)
    assert {run for run, *_ in steps} == {"vera-r2-lr0.01-s0", "vera-r2-lr0.01-s1"}  # the lora trials were done
    assert sorted(step for run, *_, step in steps if run == KILLED) == list(range(1, 61))
    assert {(pid != os.getpid(), threads) for _, pid, threads, _ in steps} == {(True, 1)}  # in workers, 1 thread

    again = wb.sweep("digits", out=out, executor="ray", callbacks=[Record(seen)], **GRID)
    assert len(_seen(seen)) == len(steps) and again[COLUMNS].equals(table[COLUMNS])  # all finished: nothing ran


def test_a_killed_workers_trial_resumes_from_its_checkpoint(cluster, reference, tmp_path):
    ref_dir, ref_table = reference
    out, seen = tmp_path / "runs", tmp_path / "steps.jsonl"
    table = wb.sweep("digits", out=out, executor="ray", callbacks=[Record(seen, kill=(KILLED, 30))], **GRID)

    steps = [(pid, step) for run, pid, _, step in _seen(seen) if run == KILLED]
    first, retry = dict.fromkeys(pid for pid, _ in steps)
    assert [s for p, s in steps if p == first] == list(range(1, 31))  # killed at step 30 ...
    assert [s for p, s in steps if p == retry] == list(range(21, 61))  # ... resumed from the step-20 checkpoint
    before = json.loads(seen.with_suffix(".killed").read_text())
    assert sorted({Path(name).parent.name for name in before}) == ["step-00000020"]
    after = _checkpoint_files(out / KILLED)
    assert {name: after[name] for name in before} == before  # kept, not written again

    assert _log(out / KILLED) == _log(ref_dir / KILLED)  # no step logged twice
    assert len(set(_log(out / KILLED))) == len(_log(out / KILLED))
    _same_table(table, ref_table)
    _same_metrics(out, ref_dir)
    final = f"{KILLED}/checkpoints/step-00000060"
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(out / final / name), load_file(ref_dir / final / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=RTOL, atol=ATOL) for k in a)


def test_a_trial_that_raises_is_not_retried_and_its_error_reaches_the_caller(cluster, tmp_path):
    out, seen = tmp_path / "runs", tmp_path / "steps.jsonl"
    with pytest.raises(ValueError, match="^a bug at step 30$"):
        wb.sweep("digits", out=out, executor="ray", callbacks=[Record(seen), Fail()], **GRID)
    table = wb.load_runs(out)
    assert dict(zip(table["run"], table["status"], strict=True)) == {
        "lora-r2-lr0.01-s0": "finished", "lora-r2-lr0.01-s1": "finished", "vera-r2-lr0.01-s0": "finished",
        KILLED: "failed"}  # the other trials ran to the end
    assert [step for run, *_, step in _seen(seen) if run == KILLED] == list(range(1, 31))  # one attempt


def test_the_command_line_runs_trials_on_ray(cluster, reference, tmp_path, capsys):
    ref_dir, ref_table = reference
    out = tmp_path / "runs"
    assert main(["sweep", "--variants", "lora,vera", "--ranks", "2", "--lrs", "0.01", "--seeds", "0,1", "--steps", "60",
                 "--eval-every", "20", "--save-every", "20", "--quiet", "--executor", "ray", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("finished") == 4
    _same_table(wb.load_runs(out), ref_table)
    _same_metrics(out, ref_dir)


class KillFirst(wb.Callback):
    """Logs [run, pid, step] on every step; kills its own process once, at step 30 of the first run to get
    there, after writing that run's name and checkpoints to ``<file>.killed`` (created exclusively: one winner)."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def on_step(self, trainer, loss):
        run = trainer.metrics_log.parent
        with open(self.file, "a") as file:
            file.write(json.dumps([run.name, os.getpid(), trainer.step]) + "\n")
        if trainer.step == 30:
            try:
                marker = os.open(self.file.with_suffix(".killed"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return
            os.write(marker, json.dumps([run.name, sorted(p.name for p in run.glob("checkpoints/step-*"))]).encode())
            os.close(marker)
            os.kill(os.getpid(), signal.SIGKILL)


def test_a_search_on_ray_tune_prunes_and_restarts_a_killed_trial_from_its_checkpoint(cluster, tmp_path):
    out, seen = tmp_path / "runs", tmp_path / "steps.jsonl"
    fast = {key: GRID[key] for key in ("eval_every", "save_every", "progress_bar")}
    table = wb.sweep("digits", ["lora", "vera"], [2, 8], steps=60, out=out, lrs=[1e-3, 1e-2], search="optuna",
                     trials=6, executor="ray", callbacks=[KillFirst(seen)], **fast)
    assert set(table["status"]) <= {"finished", "pruned"} and len(table) >= 2
    for row in table[table["status"] == "pruned"].itertuples():  # stopped by ASHA where it reported: a checkpoint
        assert row.steps_done < 60 and wb.load_checkpoints(row.path)["step"].max() == row.steps_done
        message = json.loads((Path(row.path) / "config.json").read_text())["message"]
        assert "Ray Tune's successive-halving scheduler" in message
    for row in table[table["status"] == "finished"].itertuples():
        assert row.steps_done == 60 and not math.isnan(row.test_loss)

    killed, checkpoints = json.loads(seen.with_suffix(".killed").read_text())
    assert checkpoints == ["step-00000020"]
    steps = [(pid, step) for run, pid, step in map(json.loads, seen.read_text().splitlines()) if run == killed]
    first, *restarts = dict.fromkeys(pid for pid, _ in steps)
    assert [s for p, s in steps if p == first] == list(range(1, 31))  # killed at step 30 ...
    assert restarts and [s for p, s in steps if p == restarts[0]][0] == 21  # ... Tune restarted it at its checkpoint
    assert table.set_index("run").loc[killed, "status"] in ("finished", "pruned")


@pytest.mark.parametrize(("options", "message"), [
    ({"executor": "dask"}, r"unknown executor 'dask'; valid executors: local, ray"),
    ({"address": "head:6379"}, r"address and cpus_per_trial \(--address, --cpus-per-trial\) are for executor='ray'"),
    ({"executor": "ray", "cpus_per_trial": 0}, r"cpus_per_trial must be an integer >= 1, not 0"),
])
def test_bad_executor_options_are_refused_before_anything_runs(options, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        wb.sweep("digits", out=tmp_path / "runs", **GRID, **options)
    assert not (tmp_path / "runs").exists()


def test_without_ray_the_error_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(MissingExtraError, match=r"needs Ray, which is not installed: pip install 'adapter-workbench\[ray\]'"):
        wb.sweep("digits", out=tmp_path / "runs", executor="ray", **GRID)
    assert not (tmp_path / "runs").exists()  # it failed before any trial was set up
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--out", str(tmp_path / "runs"), "--executor", "ray"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "pip install 'adapter-workbench[ray]'" in err


def test_workbench_never_imports_ray_itself():
    code = "import sys, workbench, workbench.cli, workbench.runs.sweep; assert 'ray' not in sys.modules, 'ray was imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
