"""The command line: exact resume after SIGKILL, the commands end to end, every bad-argument path."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import training_log
from safetensors.torch import load_file

import workbench as wb
from workbench.cli import _run_settings, build_parser, main, speak_cli


@pytest.fixture
def cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "cache")


def _cli(*args: str, cache: str) -> subprocess.Popen:
    env = {**os.environ, "WORKBENCH_CACHE": cache}
    return subprocess.Popen([sys.executable, "-m", "workbench", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _entries(run) -> list[tuple]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["split"], e["metric"], e["value"]) for e in training_log(lines)]


def test_train_resumes_exactly_after_sigkill(tmp_path, cache, fixed_threads):
    train = ["train", "--task", "digits", "--variant", "lora", "--rank", "4", "--steps", "1500", "--lr", "0.01",
             "--dropout", "0.1", "--eval-every", "100", "--save-every", "100", "--keep-last", "2", "--quiet"]
    straight = _cli(*train, "--out", str(tmp_path / "straight"), cache=cache)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    run = tmp_path / "killed"
    job = _cli(*train, "--out", str(run), cache=cache)
    while not (run / "checkpoints" / "step-00000500").exists():
        assert job.poll() is None, job.stderr.read()
        time.sleep(0.002)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert json.loads((run / "config.json").read_text())["status"] == "running"  # it really died mid-run
    resumed = _cli(*train, "--out", str(run), "--resume", cache=cache)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()

    assert _entries(run) == _entries(tmp_path / "straight")
    final = "checkpoints/step-00001500"
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(run / final / name), load_file(tmp_path / "straight" / final / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert wb.load_runs(run).loc[0, "status"] == "finished"


def test_commands_end_to_end(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", cache)
    runs = tmp_path / "runs"
    assert main(["sweep", "--variants", "lora,vera", "--ranks", "2", "--steps", "40", "--eval-every", "20",
                 "--save-every", "20", "--out", str(runs), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "lora-r2-lr0.003-s0" in out and "vera-r2-lr0.003-s0" in out

    assert main(["best", str(runs)]) == 0
    best = capsys.readouterr().out.strip()
    assert best == str(wb.best_checkpoint(runs))

    assert main(["export", best, "--to", str(tmp_path / "adapter")]) == 0
    capsys.readouterr()
    assert sorted(os.listdir(tmp_path / "adapter")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    assert main(["report", str(runs), "--to", str(tmp_path / "report.html")]) == 0
    html = (tmp_path / "report.html").read_text()
    assert all(name in html for name in wb.load_runs(runs)["run"])

    assert main(["runs", str(runs)]) == 0
    assert capsys.readouterr().out.count("finished") == 2

    assert main(["summary", str(runs)]) == 0  # one seed each: the mean is the run's, no interval
    out = capsys.readouterr().out
    table = wb.load_runs(runs).set_index("variant")
    assert "best val_loss" in out.splitlines()[0] and "seeds" in out.splitlines()[0]
    for variant in ("lora", "vera"):
        line = next(line for line in out.splitlines() if line.split()[0] == variant)
        assert f"{table.loc[variant, 'best_value']:.4g}" in line.split() and " NaN " in line
    assert main(["claims", str(runs)]) == 0
    out = capsys.readouterr().out
    ratio = table.loc["lora", "trainable"] / table.loc["vera", "trainable"]
    vera = next(line for line in out.splitlines() if "VeRA trains at least 10x" in line)
    assert vera.split()[0] == "inconclusive" and f"{ratio:.3g}, 1 seed, no interval" in vera  # one seed decides nothing

    lora = wb.best_checkpoint(runs / "lora-r2-lr0.003-s0")
    assert main(["spectrum", str(lora), "--energy", "0.5"]) == 0
    out = capsys.readouterr().out
    expected = wb.effective_rank(lora, 0.5)
    assert all(re.search(rf"^{layer}\s+{rank}$", out, flags=re.M) for layer, rank in expected.items())
    assert main(["reduce", str(lora), "--rank", "1", "--out", str(runs / "lora-r1-reduced")]) == 0
    reduced = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("rank-reduced checkpoint: ")
    assert wb.load_checkpoints(runs / "lora-r1-reduced")["stage"].tolist() == ["rank-reduced"]
    assert (wb.spectrum(reduced).groupby("layer")["index"].max() == 1).all()


BAD = [
    (["reduce", "{tmp}/c", "--out", "{tmp}/r"], r"one of the arguments --rank --energy is required"),
    (["reduce", "{tmp}/c", "--rank", "2", "--energy", "0.9", "--out", "{tmp}/r"], r"not allowed with argument --rank"),
    (["reduce", "{tmp}/c", "--energy", "1.5", "--out", "{tmp}/r"], r"must be a number in \(0, 1\], not 1.5"),
    (["reduce", "{tmp}/nothing", "--rank", "1", "--out", "{tmp}/r"], r"is not a checkpoint of a run directory"),
    (["spectrum", "{tmp}/nothing"], r"is not a checkpoint of a run directory"),
    (["train", "--variant", "vera", "--rank", "2", "--init", "pissa", "--out", "{tmp}/v"], r"unknown option 'init' for variant 'vera'"),
    (["train", "--variant", "lora", "--rank", "2", "--init", "svd", "--out", "{tmp}/v"],
     r"argument --init: invalid choice: 'svd' \(choose from '?default'?, '?pissa'?\)"),
    ([], r"the following arguments are required: COMMAND"),
    (["fly"], r"invalid choice: 'fly'"),
    (["train", "--rank", "4", "--out", "x"], r"the following arguments are required: --variant"),
    (["train", "--variant", "adalora", "--rank", "4", "--out", "x"], r"argument --variant: invalid choice: 'adalora'"),
    (["train", "--variant", "lora", "--rank", "0", "--out", "x"], r"argument --rank: must be an integer >= 1, not 0"),
    (["train", "--variant", "lora", "--rank", "two", "--out", "x"], r"argument --rank: invalid _positive_int value|argument --rank"),
    (["train", "--variant", "lora", "--rank", "4", "--out", "x", "--steps", "-5"], r"argument --steps: must be an integer >= 1"),
    (["train", "--variant", "lora", "--rank", "4", "--out", "x", "--lr", "0"], r"argument --lr: must be a finite number > 0"),
    (["train", "--variant", "lora", "--rank", "4", "--out", "x", "--lr", "nan"], r"argument --lr: must be a finite number > 0, not nan"),
    (["train", "--variant", "lora", "--rank", "4", "--out", "x", "--lr", "inf"], r"argument --lr: must be a finite number > 0, not inf"),
    (["train", "--variant", "lora", "--rank", "4", "--out", "x", "--alpha", "Infinity"], r"argument --alpha: must be a finite number > 0"),
    (["train", "--variant", "lora", "--rank", "4", "--out", "x", "--dropout", "nan"], r"argument --dropout: must be a finite number, not nan"),
    (["train", "--variant", "lora-plus", "--rank", "4", "--out", "x", "--lr-ratio", "inf"], r"argument --lr-ratio: must be a finite number"),
    (["train", "--variant", "delta-lora", "--rank", "4", "--out", "x", "--delta-lambda=-inf"], r"argument --delta-lambda: must be a finite"),
    (["train", "--variant", "vera", "--rank", "4", "--out", "x", "--d-initial", "nan"], r"argument --d-initial: must be a finite"),
    (["train", "--variant", "lora", "--rank", "4", "--out", "{tmp}/r", "--seed", str(2**64)], r"seed must be an integer from 0 to 2\*\*63 - 1"),
    (["train", "--variant", "lora", "--rank", "4", "--out", "{tmp}/file"], r"file is a file; a run needs a directory"),
    (["sweep", "--ranks", "2", "--variants", "lora", "--out", "{tmp}/file"], r"file is a file; a sweep writes a directory"),
    (["experiment", "--out", "{tmp}/file"], r"file is a file; a sweep writes a directory"),
    (["sweep", "--variants", ",", "--out", "{tmp}/s"], r"variants is empty: give at least one"),
    (["export", "{run}/checkpoints/step-00000002", "--to", "{tmp}/file"], r"file exists and is not an empty directory"),
    (["export", "{run}/checkpoints/step-00000002", "--to", "{tmp}"], r"exists and is not an empty directory"),
    (["export", "{run}/checkpoints/step-00000002", "--format", "merged", "--to", "{tmp}"], r"not an empty directory"),
    (["reduce", "{run}/checkpoints/step-00000002", "--rank", "1", "--out", "{tmp}/file"], r"file is a file; the reduced checkpoint"),
    (["report", "{run}", "--to", "{tmp}"], r"is a directory; the report is a file"),
    (["train", "--variant", "lora", "--rank", "4", "--out", "x", "--task", "mnist"], r"argument --task: invalid choice: 'mnist'"),
    (["train", "--variant", "lora", "--rank", "4", "--out", "x", "--device", "gpu0"], r"argument --device: not a torch device: 'gpu0'"),
    (["train", "--variant", "lora", "--rank", "4", "--out", "x", "--data", "x.csv"], r"--model and --data go together"),
    (["train", "--variant", "lora", "--rank", "4", "--out", "x", "--model", "m", "--data", "x.csv", "--task", "digits"],
     r"give either --task \(a built-in task\) or --model and --data \(your own\), not both"),
    (["train", "--variant", "lora", "--rank", "4", "--out", "x", "--model", "{tmp}", "--data", "{tmp}/none.csv"],
     r"data file '.*none.csv' does not exist"),
    (["train", "--variant", "lora", "--rank", "4", "--out", "{tmp}/r", "--lr-ratio", "4"],
     r"unknown option 'lr_ratio' for variant 'lora'; valid options: dropout, rslora"),
    (["train", "--variant", "lora", "--rank", "99", "--out", "{tmp}/r"], r"rank 99 is larger than layer"),
    (["sweep", "--variants", "lora,adalora", "--out", "{tmp}/s"], r"unknown variant 'adalora'; valid variants: lora, lora-fa"),
    (["sweep", "--search", "random", "--out", "{tmp}/s"], r"a random search needs trials"),
    (["sweep", "--executor", "dask", "--out", "{tmp}/s"], r"argument --executor: invalid choice: 'dask'"),
    (["sweep", "--executor", "ray", "--address", "head-node", "--out", "{tmp}/s"], r"argument --address: must be HOST:PORT \(or auto\), not 'head-node'"),
    (["sweep", "--executor", "ray", "--address", "head:99999", "--out", "{tmp}/s"], r"argument --address: must be HOST:PORT"),
    (["sweep", "--executor", "ray", "--cpus-per-trial", "0", "--out", "{tmp}/s"], r"argument --cpus-per-trial: must be an integer >= 1, not 0"),
    (["sweep", "--address", "head:6379", "--out", "{tmp}/s"], r"address and cpus_per_trial \(--address, --cpus-per-trial\) are for --executor ray; the local"),
    (["runs", "{tmp}/nowhere"], r"nowhere: no such directory"),
    (["best", "{tmp}"], r"no checkpoint under .* records val_loss"),
    (["export", "{tmp}/nothing", "--to", "{tmp}/a"], r"is not a checkpoint of a run directory"),
    (["export", "{tmp}/c", "--format", "onnx", "--to", "{tmp}/a"], r"argument --format: invalid choice: 'onnx'"),
    (["report", "{tmp}/nowhere"], r"nowhere: no such directory"),
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> str:
    """A finished two-step run, for the commands that take a checkpoint."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        run = tmp_path_factory.mktemp("tiny") / "run"
        wb.train("digits", "lora", 2, run, steps=2, eval_every=2, save_every=2, progress_bar=False)
    return str(run)


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a)[:50] or "nothing" for a, _ in BAD])
def test_bad_arguments_give_one_line_and_status_2(argv, message, tmp_path, cache, capsys, monkeypatch, tiny_run):
    monkeypatch.setenv("WORKBENCH_CACHE", cache)
    (tmp_path / "file").write_text("a file where a directory is expected\n")
    with pytest.raises(SystemExit) as exit_:
        main([arg.replace("{tmp}", str(tmp_path)).replace("{run}", tiny_run) for arg in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("workbench") and "Traceback" not in err
    assert re.search(message, err), err


def test_help_documents_every_option(capsys):
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        undocumented = [a.dest for a in sub._actions if not a.help]
        assert not undocumented, f"workbench {name}: no help for {undocumented}"
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert all(flag in text for a in sub._actions for flag in a.option_strings)


def test_variant_options_are_flags_made_from_the_registry():
    """One flag per option name of every registered variant, typed by its kind, with its help, variants and default."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = {action.dest: action for action in commands.choices["train"]._actions}
    owners = {}
    for variant in wb.VARIANTS:
        for name, option in wb.variant_options(variant).items():
            owners.setdefault(name, []).append((variant, option))
    for name, having in owners.items():
        action, option = train[name], having[0][1]
        assert action.option_strings == ["--" + name.replace("_", "-")] and action.default is None
        assert option.help and option.help.replace("%", "%%") in action.help
        assert all(variant in action.help for variant, _ in having)
        assert action.choices == (list(option.choices) if option.choices else None)
        if option.kind is bool:
            assert action.nargs == 0 and action.const is True  # a switch: --rslora
    assert set(train["init"].choices) == {"default", "pissa"}

    def options(*flags):
        args = parser.parse_args(["train", "--variant", "lora", "--rank", "2", "--out", "x", *flags])
        return {k: v for k, v in _run_settings(args).items() if k in owners}

    assert options() == {}  # nothing given, nothing passed: the variant's defaults apply
    assert options("--rslora", "--init", "pissa", "--delta-start", "3", "--lr-ratio", "2") == {
        "rslora": True, "init": "pissa", "delta_start": 3, "lr_ratio": 2.0}


# -- the trainer's flags ----------------------------------------------------------------------------------

TRAINER_FLAGS = ["--schedule", "cosine", "--warmup-steps", "2", "--max-grad-norm", "1", "--accumulate", "2",
                 "--precision", "bf16", "--eval-batches", "1"]
TRAINER_SETTINGS = {"schedule": "cosine", "warmup_steps": 2, "max_grad_norm": 1.0, "accumulate": 2,
                    "precision": "bf16", "eval_batches": 1}


def test_the_trainer_flags_reach_the_run_and_its_record(tmp_path, cache, capsys, monkeypatch):
    parser = build_parser()
    for command in (["train", "--variant", "lora", "--rank", "2", "--out", "x"], ["sweep", "--out", "x"]):
        defaults = _run_settings(parser.parse_args(command))
        assert {k: defaults[k] for k in TRAINER_SETTINGS} == {
            "schedule": "constant", "warmup_steps": 0, "max_grad_norm": None, "accumulate": 1, "precision": "float32",
            "eval_batches": None}  # the trainer's own defaults
        given = _run_settings(parser.parse_args([*command, *TRAINER_FLAGS]))
        assert {k: given[k] for k in TRAINER_SETTINGS} == TRAINER_SETTINGS

    monkeypatch.setenv("WORKBENCH_CACHE", cache)
    run = tmp_path / "run"
    assert main(["train", "--variant", "lora", "--rank", "2", "--steps", "6", "--eval-every", "3", "--save-every", "3",
                 "--out", str(run), "--quiet", *TRAINER_FLAGS]) == 0
    capsys.readouterr()
    settings = json.loads((run / "config.json").read_text())["settings"]
    assert {k: settings[k] for k in TRAINER_SETTINGS} == TRAINER_SETTINGS
    logged = {(step, metric) for step, split, metric, _ in _entries(run) if split == "train"}
    assert logged == {(step, m) for step in range(1, 7) for m in ("loss", "lr", "grad_norm")}


TRAINER_BAD = [
    (["--schedule", "cosin"], r"argument --schedule: invalid choice: 'cosin' \(choose from '?constant'?, '?linear'?, '?cosine'?\)"),
    (["--precision", "fp16"], r"argument --precision: invalid choice: 'fp16'"),
    (["--accumulate", "0"], r"argument --accumulate: must be an integer >= 1, not 0"),
    (["--eval-batches", "0"], r"argument --eval-batches: must be an integer >= 1, not 0"),
    (["--max-grad-norm", "nan"], r"argument --max-grad-norm: must be a finite number > 0, not nan"),
    (["--max-grad-norm", "0"], r"argument --max-grad-norm: must be a finite number > 0, not 0"),
    (["--warmup-steps", "-1"], r"warmup_steps must be an integer >= 0, not -1"),
    (["--schedule", "linear", "--warmup-steps", "300"],
     r"warmup_steps \(300\) must be fewer than steps \(300\) for schedule 'linear'"),
]


@pytest.mark.parametrize(("flags", "message"), TRAINER_BAD, ids=[" ".join(f) for f, _ in TRAINER_BAD])
def test_bad_trainer_flags_give_one_line_and_status_2(flags, message, tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", cache)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--variant", "lora", "--rank", "2", "--out", str(tmp_path / "r"), *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and re.search(message, err), err
    assert not (tmp_path / "r").exists()


def test_a_sweep_names_each_trial_in_its_bar_and_the_table_is_sorted_by_the_named_metric(tmp_path, cache, capsys,
                                                                                          monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", cache)
    runs = tmp_path / "runs"
    assert main(["sweep", "--variants", "lora", "--ranks", "1,4", "--lrs", "0.001,0.03", "--steps", "6",
                 "--eval-every", "3", "--save-every", "3", "--out", str(runs)]) == 0
    captured = capsys.readouterr()
    names = [wb.trial_name("lora", rank, lr, 0) for rank in (1, 4) for lr in (1e-3, 3e-2)]
    for number, name in enumerate(names, start=1):
        assert f"trial {number}/4 {name}" in captured.err  # tqdm's bar, on stderr
    header, *rows = captured.out.strip().splitlines()
    assert "best val_loss" in header and "at step" in header and "wall time (s)" in header
    table = wb.load_runs(runs)
    order = [line.split()[0] for line in rows]
    assert order == list(table.sort_values("best_value")["run"])  # lowest validation loss first
    assert len(set(table["best_value"])) == 4  # four different values, so the order is a real check


def test_errors_speak_the_command_lines_words(tiny_run, capsys):
    train = ["train", "--task", "digits", "--variant", "lora", "--rank", "2", "--steps", "2", "--out", tiny_run]
    with pytest.raises(SystemExit) as exit_:
        main(train)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "holds a run already" in err
    assert "--resume" in err and "resume=True" not in err  # the library's keyword, as the flag that sets it
    parser = build_parser()
    assert speak_cli("give rank= or energy=, not both", parser) == "give --rank or --energy, not both"
    assert speak_cli("save_every='auto' needs mtbf=None?", parser) == "--save-every auto needs no --mtbf?"
    assert speak_cli("save with safe_serialization=True", parser) == "save with safe_serialization=True"  # no flag
