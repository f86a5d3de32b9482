"""The ``workbench`` command line: train, sweep, compress, the tables (runs, summary, claims), best, export, report."""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist

from .adapters import Option, variant_names, variant_options
from .baselines import BASELINES, is_baseline
from .checkpoints import CheckpointError
from .claims import check_claims
from .distributed import torchrun_group
from .optim import OPTIMIZERS
from .report import write_report
from .runs import (
    EXPORT_FORMATS,
    best_checkpoint,
    compress_task,
    effective_rank,
    export_checkpoint,
    frozen_metrics,
    load_metrics,
    load_runs,
    reduce_checkpoint,
    resume_run,
    spectrum,
    summarize,
    sweep,
    train,
)
from .runs.compression import FACTORS
from .runs.executors import EXECUTORS, MissingExtraError
from .runs.search import PRUNERS
from .runs.sweep import SEARCHES
from .save_interval import AUTO, parse_duration
from .selection import metric_mode
from .tasks import TASKS, Task, causal_lm, get_task, text_classification
from .trainer import PRECISIONS, SCHEDULES, Callback, Trainer


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


_FLAG_TYPES: dict[type, Callable[[str], Any]] = {int: int, float: _finite_float, str: str}  # by option kind


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return repr(value) if isinstance(value, str) else f"{value:g}"


def option_flags() -> list[tuple[str, str, dict[str, Any]]]:
    """Every registered variant's options as flags: (flag, option name, ``add_argument`` keywords).

    One flag per option name, whichever variants have it (``lr_ratio`` -> ``--lr-ratio``), of the
    option's kind: a bool is a switch (``--rslora``; ``--no-<name>`` for one that is on by default),
    an int an integer, a float a finite number (``_finite_float``), a str a value, one of the
    ``choices`` when the option has them. Every flag defaults to None and is passed on only when
    given, so a flag the chosen variant does not have is refused by ``add_adapters`` with the
    valid options named. The help is the option's, then the variants that have it and the default.
    Read from the registry when called: a variant registered before the parser is built has flags.
    """
    owners: dict[str, list[tuple[str, Option]]] = {}
    for variant in variant_names():
        for name, option in variant_options(variant).items():
            owners.setdefault(name, []).append((variant, option))
    flags = []
    for name, having in owners.items():
        option = having[0][1]
        by_default: dict[str, list[str]] = {}  # the default as shown -> the variants with it, most common first
        for variant, o in having:
            by_default.setdefault(_shown(o.default), []).append(variant)
        usual, *others = sorted(by_default, key=lambda d: -len(by_default[d]))
        default = ", ".join([f"default {usual}", *(f"{d} for {', '.join(by_default[d])}" for d in others)])
        about = f"({', '.join(v for v, _ in having)}; {default})"
        flag = "--" + name.replace("_", "-")
        common = {"dest": name, "default": None}
        if option.kind is bool:
            if any(not o.default for _, o in having):
                flags.append((flag, name, {**common, "action": "store_true", "help": f"{option.help} {about}"}))
            if any(o.default for _, o in having):
                flags.append((f"--no-{flag[2:]}", name,
                              {**common, "action": "store_false", "help": f"turn off: {option.help} {about}"}))
            continue
        keywords: dict[str, Any] = {**common, "type": _FLAG_TYPES[option.kind], "help": f"{option.help} {about}"}
        choices = [c for _, o in having for c in (o.choices or ())]
        if choices and all(o.choices for _, o in having):
            keywords["choices"] = list(dict.fromkeys(choices))
        flags.append((flag, name, keywords))
    for _, _, keywords in flags:
        keywords["help"] = keywords["help"].replace("%", "%%")  # argparse formats help with %
    return flags


MONITORS = ["val_loss", "val_acc", "val_ppl"]
# The main job: every variant and both baselines on the real task, three seeds each (see the README for its time).
# Full fine-tuning moves every weight and wants a far smaller learning rate; the head alone a larger one.
EXPERIMENT = {"task": "reviews", "ranks": [8], "seeds": [0, 1, 2], "steps": 100, "eval_every": 50,
              "lrs": {"adapters": [2e-3], "full": [1e-4], "head": [1e-2]}}


def _device(text: str) -> str:
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:N, ...)") from None
    return text


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text}")
    return value


def _interval(text: str) -> int | str:
    """--save-every: an integer >= 1, or auto."""
    return AUTO if text == AUTO else _positive_int(text)


def _duration(text: str) -> float:
    try:
        return parse_duration(text, "--mtbf")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, not {text}")
    return value


def _address(text: str) -> str:
    host, _, port = text.rpartition(":")
    if text != "auto" and not (host and port.isdigit() and 0 < int(port) < 65536):
        raise argparse.ArgumentTypeError(f"must be HOST:PORT (or auto), not {text!r}")
    return text


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], not {text}")
    return value


def _list_of(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [kind(item) for item in text.split(",") if item]

    return parse


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=sorted(TASKS), help="built-in task (default digits; not with --model)")
    parser.add_argument("--model", type=Path, help="your own pretrained model: a transformers model directory "
                        "(save_pretrained's), adapted on --data instead of a built-in task")
    parser.add_argument("--data", type=Path, help="with --model: your data, a CSV or JSONL file (or, for "
                        "--objective causal-lm, a .txt file)")
    parser.add_argument("--objective", choices=["classify", "causal-lm"], default="classify",
                        help="with --model: classify the texts of --text-column into --label-column (default), "
                        "or causal-lm: next-token prediction on the text")
    parser.add_argument("--text-column", default="text", help="with --data: the column of texts (default text)")
    parser.add_argument("--label-column", default="label", help="with --objective classify: the column of labels, "
                        "integers or strings (default label)")
    parser.add_argument("--block-size", type=_positive_int, default=64,
                        help="with --objective causal-lm: tokens per example (default 64)")
    parser.add_argument("--steps", type=_positive_int, default=300, help="optimizer steps per run (default 300)")
    parser.add_argument("--alpha", type=_positive_float, help="LoRA alpha (default: the rank; vera has none)")
    parser.add_argument("--targets", type=_list_of(str), help="comma-separated module names, suffixes or regexes")
    parser.add_argument("--train", type=_list_of(str), help="comma-separated modules trained in full next to the "
                        "adapters (a new head, say), as PEFT's modules_to_save, or by the head baseline alone on "
                        "its frozen base (default: the task's, if any)")
    parser.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS), help="(default adamw)")
    parser.add_argument("--eval-every", type=_positive_int, default=50, help="validate every K steps (default 50)")
    parser.add_argument("--save-every", type=_interval, default=50, help="checkpoint every K steps (default 50), or "
                        "auto: Young/Daly's interval from the measured write time and --mtbf")
    parser.add_argument("--mtbf", type=_duration, help="with --save-every auto: the expected time between failures, "
                        "in seconds or as 4h, 30m, 1d")
    parser.add_argument("--keep-last", type=_positive_int, help="keep the newest K checkpoints (default all)")
    parser.add_argument("--keep-best", type=_positive_int, help="keep the K best checkpoints by --monitor")
    parser.add_argument("--monitor", default="val_loss", choices=MONITORS,
                        help="validation metric that ranks checkpoints (default val_loss, lower is better; "
                        "val_acc: higher; val_ppl, the perplexity of a language-model task: lower)")
    parser.add_argument("--mode", choices=["min", "max"], help="whether a lower or a higher --monitor is better "
                        "(default: max for val_acc, else min)")
    parser.add_argument("--schedule", default="constant", choices=SCHEDULES,
                        help="learning-rate schedule after the warmup: constant (default), or linear or cosine "
                        "decay to 0 at the last step")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="steps of linear warmup from 0 to the learning rate (default 0); fewer than --steps "
                        "for linear and cosine")
    parser.add_argument("--max-grad-norm", type=_positive_float,
                        help="clip the gradient's total 2-norm to this before each step, and log the norm "
                        "(default: no clipping)")
    parser.add_argument("--accumulate", type=_positive_int, default=1,
                        help="micro-batches per optimizer step (gradient accumulation; default 1)")
    parser.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help="float32 (default), or bf16: forward and loss under bf16 autocast, the parameters "
                        "float32")
    parser.add_argument("--eval-batches", type=_positive_int,
                        help="validate on the first K batches of the validation split (default all)")
    for flag, name, keywords in option_flags():
        try:
            parser.add_argument(flag, **keywords)
        except argparse.ArgumentError:
            raise TypeError(f"variant option {name!r} would be the flag {flag}, which {parser.prog} has already: "
                            "give the option another name") from None
    parser.add_argument("--device", type=_device, help="where to train: cpu, cuda, cuda:N (default cpu; under "
                        "torchrun, each process's own)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _task(args: argparse.Namespace) -> str | Task:
    """The built-in task named by --task, or the task --model and --data make (``wb.tasks``)."""
    if args.model is None and args.data is None:
        return args.task or "digits"
    if args.model is None or args.data is None:
        raise ValueError("--model and --data go together: your model directory and your data file")
    if args.task is not None:
        raise ValueError("give either --task (a built-in task) or --model and --data (your own), not both")
    if args.objective == "causal-lm":
        return causal_lm(args.model, args.data, block_size=args.block_size, column=args.text_column)
    return text_classification(args.model, args.data, args.text_column, args.label_column)


def _run_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = {
        "alpha": args.alpha, "targets": args.targets, "train": args.train, "optimizer": args.optimizer,
        "eval_every": args.eval_every, "save_every": args.save_every, "mtbf": args.mtbf, "keep_last": args.keep_last,
        "keep_best": args.keep_best, "monitor": args.monitor, "mode": args.mode,
        "schedule": args.schedule, "warmup_steps": args.warmup_steps, "max_grad_norm": args.max_grad_norm,
        "accumulate": args.accumulate, "precision": args.precision, "eval_batches": args.eval_batches,
        "progress_bar": not args.quiet,
    }
    options = {name: getattr(args, name) for _, name, _ in option_flags() if getattr(args, name, None) is not None}
    return settings | options


def _flag_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def command_line(task: str | Task, variant: str, ranks: Sequence[int | None], out: str | os.PathLike[str],
                 *, lr: float, seed: int, steps: int, **settings: Any) -> str:
    """The ``workbench sweep`` command that trains these runs, as a shell line: "copy as CLI command".

    The runs are one per rank, in ``out / wb.trial_name(variant, rank, lr, seed)``, the directories
    the workbench panel and ``wb.sweep`` give them, so the command resumes or repeats the panel's
    runs. ``settings`` are ``wb.Run``'s keywords (alpha, targets, eval_every, save_every, mtbf,
    monitor, mode, keep_last, schedule, ..., the variant's options), each said as the sweep
    command's flag for it; None and the flag's own default are left out. Arguments are quoted
    for a POSIX shell.

    Raises:
        ValueError: a task that is neither built in nor made from files (its data is in memory), or
            a setting the command line has no flag for.
    """
    if isinstance(task, str) or task.name in TASKS and task.source is None:
        words = ["--task", task if isinstance(task, str) else task.name]
    elif task.source is not None and task.source.get("kind") in ("text_classification", "causal_lm"):
        source = task.source
        words = ["--model", source["model"], "--data", source["data"]]
        if source["kind"] == "causal_lm":
            words += ["--objective", "causal-lm", "--block-size", source["block_size"]]
        else:
            words += ["--text-column", source["text"], "--label-column", source["label"]]
    else:
        raise ValueError(f"task {task.name!r} is not built in and its data is not a file: the command line cannot "
                         "name it (write the data to a CSV or JSONL file and use wb.tasks.text_classification on it)")
    words = ["workbench", "sweep", "--variants", variant, *words]
    chosen = [rank for rank in ranks if rank is not None]
    if chosen:
        words += ["--ranks", _flag_value(chosen)]
    words += ["--lrs", _flag_value(float(lr)), "--seeds", seed, "--steps", steps, "--out", out]
    flags: dict[str, list[argparse.Action]] = {}  # the sweep command's own flags and defaults, by setting
    for action in _subcommands(build_parser())["sweep"]._actions:
        flags.setdefault(action.dest, []).append(action)
    for name, value in settings.items():
        if name not in flags or not flags[name][0].option_strings:
            raise ValueError(f"the command line has no flag for the setting {name!r}")
        if isinstance(value, bool):  # --rslora, --no-<name>: the switch that sets this value, if any
            words += [action.option_strings[0] for action in flags[name] if action.const is value]
        elif value is not None and value != flags[name][0].default:
            words += [flags[name][0].option_strings[0], _flag_value(value)]
    return shlex.join(str(word) for word in words)


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit status 2, no usage block and no traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="workbench", description="Low-rank adaptation experiments: train, "
                                     "compare and keep the best checkpoint.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    experiment = commands.add_parser("experiment", help="the default experiment: every variant at rank 8 and the "
                                     "baselines full and head on reviews (pretrained MiniLM, Rotten Tomatoes "
                                     "sentiment), three seeds each, against the frozen model; write the report, "
                                     "print the runs, the configurations with intervals, the claims and the best "
                                     "checkpoint")
    experiment.add_argument("--out", type=Path, default=Path("runs"), help="runs directory (default runs)")
    experiment.add_argument("--steps", type=_positive_int, default=EXPERIMENT["steps"],
                            help=f"optimizer steps per run (default {EXPERIMENT['steps']})")
    experiment.add_argument("--report", type=Path, default=Path("report.html"),
                            help="the HTML report to write (default report.html)")

    one = commands.add_parser("train", help="train one run (under torchrun --nproc-per-node N: one run over N "
                              "data-parallel processes, the same global batch)")
    one.add_argument("--variant", required=True, choices=[*variant_names(), *BASELINES],
                     help="the adapter variant, or a baseline: " + "; ".join(f"{name}, {about}" for name, about
                                                                             in BASELINES.items()))
    one.add_argument("--rank", type=_positive_int, help="the adapter rank r (required for an adapter variant; "
                     "a baseline has none)")
    one.add_argument("--out", required=True, type=Path, help="the run directory")
    one.add_argument("--lr", type=_positive_float, default=3e-3, help="learning rate (default 0.003)")
    one.add_argument("--seed", type=int, default=0, help="seeds the data split and order, init and dropout "
                     "(default 0)")
    one.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    _add_run_options(one)

    many = commands.add_parser("sweep", help="one run per variant x rank x lr x seed")
    many.add_argument("--variants", type=_list_of(str), default=list(variant_names()),
                      help="comma-separated variants, and baselines (" + ", ".join(BASELINES) + ": one run "
                      "per lr and seed, no rank); default every variant, no baseline")
    many.add_argument("--ranks", type=_list_of(_positive_int), default=[2, 8],
                      help="comma-separated adapter ranks (default 2,8)")
    many.add_argument("--lrs", type=_list_of(_positive_float), default=[3e-3], help="comma-separated (default 0.003)")
    many.add_argument("--seeds", type=_list_of(int), default=[0], help="comma-separated (default 0)")
    many.add_argument("--search", choices=SEARCHES, default="grid",
                      help="every combination (default), --trials of them drawn at random, or optuna: --trials "
                      "sampled by Optuna's TPE, the worse stopped early by --pruner (the study in OUT/optuna.db, "
                      "continued when run again)")
    many.add_argument("--trials", type=_positive_int, help="how many trials a random or optuna search runs")
    many.add_argument("--pruner", choices=[*(p for p in PRUNERS if p), "none"], default="successive-halving",
                      help="with --search optuna: what stops trials at their validations (default "
                      "successive-halving), or none")
    many.add_argument("--out", required=True, type=Path, help="the runs directory")
    many.add_argument("--executor", choices=EXECUTORS, default="local",
                      help="where trials run: local, one after another in this process (default), or ray, "
                      "each a Ray task, side by side (needs pip install 'adapter-workbench[ray]')")
    many.add_argument("--address", type=_address,
                      help="with --executor ray: join the running Ray cluster at HOST:PORT (auto: the one "
                      "RAY_ADDRESS or ray start names); default: start a local Ray instance for the sweep")
    many.add_argument("--cpus-per-trial", type=_positive_int, default=1,
                      help="with --executor ray: CPUs each trial reserves, and its torch threads (default 1)")
    _add_run_options(many)

    resuming = commands.add_parser("resume", help="continue a run (pruned, stopped, or finished and given more "
                                   "--steps) from its newest checkpoint, exactly, as the same run")
    resuming.add_argument("run", type=Path, help="the run directory")
    resuming.add_argument("--steps", type=_positive_int, help="train to this step (default: the run's own steps)")
    resuming.add_argument("--quiet", action="store_true", help="no progress bar")

    runs = commands.add_parser("runs", help="print the runs table")
    runs.add_argument("directory", type=Path, help="a run or a runs directory")
    summary = commands.add_parser("summary", help="print one row per configuration: the mean and 95%% interval "
                                  "over seeds of the best validation and the test metric, and the costs")
    summary.add_argument("directory", type=Path, help="a runs directory")
    claims = commands.add_parser("claims", help="print the published claims checked on the runs: effect, 95%% "
                                 "interval over paired seeds, verdict")
    claims.add_argument("directory", type=Path, help="a runs directory")

    best = commands.add_parser("best", help="print the path of the best checkpoint (by validation)")
    best.add_argument("directory", type=Path, help="a run or a runs directory")
    best.add_argument("--metric", default="val_loss", choices=MONITORS, help="(default val_loss)")
    best.add_argument("--mode", choices=["min", "max"], help="default: max for val_acc, else min")

    export = commands.add_parser("export", help="export a checkpoint: its adapter in PEFT's format, or the model "
                                 "with the adapters merged into its weights")
    export.add_argument("checkpoint", type=Path, help="a checkpoint directory of a run (see workbench best)")
    export.add_argument("--format", default="peft", choices=list(EXPORT_FORMATS), help="; ".join(
        f"{name}: {about}" for name, about in EXPORT_FORMATS.items()) + " (default peft)")
    export.add_argument("--to", required=True, type=Path, help="the directory to write: a new or empty one")

    compressing = commands.add_parser("compress", help="compress the task's pretrained model by truncated SVD and "
                                      "recover by training: three runs side by side in --out (svd, rank-reduced, "
                                      "finetuned)")
    _add_run_options(compressing)
    budget = compressing.add_mutually_exclusive_group(required=True)
    budget.add_argument("--rank", type=_positive_int, help="the rank k of every compressed layer")
    budget.add_argument("--energy", type=_fraction, help="per layer, the smallest rank keeping this fraction (0, 1] "
                        "of the squared singular values")
    budget.add_argument("--params", type=_positive_int, help="the compressed model's parameter count; ranks are "
                        "allocated across layers by the largest singular values first")
    compressing.add_argument("--layers", type=_list_of(str), help="comma-separated layers to compress, as --targets "
                             "(default every linear layer but the task's own trained modules, e.g. a new head)")
    compressing.add_argument("--recover", default=FACTORS, choices=[FACTORS, *variant_names(), *BASELINES],
                             help="factors (default): train the compressed factors themselves, so the model keeps "
                             "its compressed size; or an adapter variant on the factors, at --recover-rank; or full")
    compressing.add_argument("--recover-rank", type=_positive_int, default=8,
                             help="the adapter's rank with an adapter --recover (default 8)")
    compressing.add_argument("--lr", type=_positive_float, default=1e-4, help="recovery learning rate "
                             "(default 0.0001)")
    compressing.add_argument("--seed", type=int, default=0, help="(default 0)")
    compressing.add_argument("--out", required=True, type=Path, help="the directory of the three stage runs")

    reduce = commands.add_parser("reduce", help="reduce a checkpoint's adapters to a lower rank (truncated SVD) and "
                                 "save it, stage rank-reduced, as a new run")
    reduce.add_argument("checkpoint", type=Path, help="a checkpoint directory of a run")
    size = reduce.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=_positive_int, help="the new rank of every layer")
    size.add_argument("--energy", type=_fraction, help="per layer, the smallest rank keeping this fraction (0, 1] of "
                      "the squared singular values")
    reduce.add_argument("--out", required=True, type=Path, help="the new run directory")

    spectra = commands.add_parser("spectrum", help="print the singular values of every adapter's update and each "
                                  "layer's effective rank")
    spectra.add_argument("checkpoint", type=Path, help="a checkpoint directory of a run")
    spectra.add_argument("--energy", type=_fraction, default=0.9,
                         help="the energy the effective rank keeps (default 0.9)")

    report = commands.add_parser("report", help="write a standalone HTML report of the runs")
    report.add_argument("directory", type=Path, help="a runs directory")
    report.add_argument("--to", type=Path, default=Path("report.html"), help="the HTML file (default report.html)")
    report.add_argument("--grid", type=Path, help="with a search's runs directory: the full grid of the same space, "
                        "to compare the search's compute and best against")
    return parser


def _print_table(table: pd.DataFrame) -> None:
    """The runs table, best first when the runs share a monitor, its columns named for what they hold and in what unit.

    ``best <monitor>`` is each run's best validation value over its checkpoints (``best_value``),
    ``at step`` where it was; ``test_*`` the test metric of that checkpoint; ``wall time (s)``.
    """
    if table.empty:
        print("no runs")
        return
    monitors = set(table["monitor"].dropna()) if "monitor" in table else set()
    monitor = monitors.pop() if len(monitors) == 1 else None
    if monitor is not None:
        table = table.sort_values("best_value", ascending=metric_mode(monitor) == "min", kind="stable",
                                  na_position="last")
    best = f"best {monitor}" if monitor is not None else "best (of its monitor)"
    columns = {"run": "run", "variant": "variant", "rank": "rank", "trainable": "trainable", "best_value": best,
               "best_step": "at step", "test_acc": "test_acc", "test_ppl": "test_ppl", "steps_done": "steps",
               "wall_time": "wall time (s)", "status": "status"}
    shown = table[[c for c in columns if c in table]].rename(columns=columns)
    if "rank" in shown:  # a baseline has no rank: "-", and the adapters' ranks stay integers
        shown = shown.assign(rank=["-" if pd.isna(rank) else int(rank) for rank in shown["rank"]])
    if "at step" in shown:
        shown = shown.assign(**{"at step": ["-" if pd.isna(s) else int(s) for s in shown["at step"]]})
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def _print_summary(summary: pd.DataFrame) -> None:
    """``wb.summarize``'s table, its columns named for the metric they hold."""
    if summary.empty:
        print("no runs")
        return
    monitor, test = summary["monitor"].iloc[0], summary["test_metric"].iloc[0]
    columns = {"variant": "variant", "rank": "rank", "options": "options", "lr": "lr", "n": "seeds",
               "best_mean": f"best {monitor}", "best_low": "95% low", "best_high": "95% high", "test_mean": test,
               "test_low": "test low", "test_high": "test high", "trainable": "trainable",
               "wall_time": "wall time (s)"}
    shown = summary[list(columns)].rename(columns=columns)
    shown["rank"] = ["-" if pd.isna(rank) else int(rank) for rank in shown["rank"]]
    if not shown["options"].astype(bool).any():
        shown = shown.drop(columns="options")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def _print_claims(claims: pd.DataFrame) -> None:
    """``wb.check_claims``' table, one line per claim and rank: verdict, claim, effect [95% interval], seeds."""
    for row in claims.itertuples():
        where = "" if pd.isna(row.rank) else f" (rank {row.rank})"
        effect = "" if pd.isna(row.effect) else (
            f": {row.effect:.3g} [{row.ci_low:.3g}, {row.ci_high:.3g}], {row.n} seeds" if not pd.isna(row.ci_low)
            else f": {row.effect:.3g}, {row.n} seed{'s' if row.n != 1 else ''}, no interval")
        print(f"  {row.verdict:<14} {row.claim}{where}{effect}")


class _Announce(Callback):
    """Prints one line as each run of the experiment ends: which of how many, its name, status and time."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.perf_counter()

    def on_end(self, trainer: Trainer) -> None:
        self.done += 1
        name = trainer.metrics_log.parent.name if trainer.metrics_log is not None else "run"
        print(f"[{self.done}/{self.total}] {name}: {trainer.status} at step {trainer.step} "
              f"({time.perf_counter() - self.started:.0f} s in)", flush=True)


def _experiment(args: argparse.Namespace) -> None:
    variants = [*variant_names(), *BASELINES]
    lrs = {variant: EXPERIMENT["lrs"].get(variant, EXPERIMENT["lrs"]["adapters"]) for variant in variants}
    seeds = EXPERIMENT["seeds"]
    total = (len(variant_names()) * len(EXPERIMENT["ranks"]) + len(BASELINES)) * len(seeds)
    print(f"{total} runs on {EXPERIMENT['task']}: {', '.join(variants)}; seeds {', '.join(map(str, seeds))}; "
          f"{args.steps} steps each", flush=True)
    clock = time.perf_counter()
    print(f"loading the {EXPERIMENT['task']} model and tokenizing its texts...", end=" ", flush=True)
    get_task(EXPERIMENT["task"])  # built once per process: the model loaded, every text tokenized
    phases = {"load and tokenize": time.perf_counter() - clock}
    print(f"{phases['load and tokenize']:.0f} s", flush=True)
    clock = time.perf_counter()
    # one run per core, each on one thread: on 2 cores, 1.4x the runs per second of one run on two threads
    parallel = {"executor": "ray", "cpus_per_trial": 1, "progress_bar": True} if (os.cpu_count() or 1) > 1 else \
        {"progress_bar": False, "callbacks": [_Announce(total)]}
    table = sweep(EXPERIMENT["task"], variants, EXPERIMENT["ranks"], args.steps, args.out, lrs=lrs, seeds=seeds,
                  eval_every=EXPERIMENT["eval_every"], save_every=EXPERIMENT["eval_every"], **parallel)
    phases["runs"] = time.perf_counter() - clock
    clock = time.perf_counter()
    write_report(args.out, args.report)
    phases["report"] = time.perf_counter() - clock
    clock = time.perf_counter()
    frozen = pd.DataFrame([frozen_metrics(EXPERIMENT["task"], seed) for seed in seeds])
    phases["frozen model"] = time.perf_counter() - clock
    work = {"training": float((table["wall_time"] - table["eval_time"]).sum()),
            "evaluating": float(table["eval_time"].sum())}
    print()
    _print_table(table)
    print(f"\nthe frozen model ({EXPERIMENT['task']}: the pretrained encoder, its new head untrained), mean over "
          f"seeds: test_acc {frozen['test_acc'].mean():.4f}, test_loss {frozen['test_loss'].mean():.4f}")
    summary = summarize(table)
    monitor = summary["monitor"].iloc[0]
    print(f"\nconfigurations, best first by mean best {monitor} over {len(seeds)} seeds (95% intervals):")
    _print_summary(summary)
    print("\nclaims, effect over paired seeds with its 95% interval (details in the report):")
    _print_claims(check_claims(table, load_metrics(args.out)))
    print(f"\nreport: {args.report}")
    print(f"best checkpoint ({monitor}): {best_checkpoint(args.out, monitor)}")
    print("time: " + ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in phases.items())
          + f"; {sum(phases.values()):.0f} s in all. Summed over the runs"
          + (f" ({os.cpu_count()} processes side by side)" if "executor" in parallel else "") + ": "
          + ", ".join(f"{part} {seconds:.0f} s" for part, seconds in work.items()))


def _pruner(args: argparse.Namespace) -> str | None:
    """--pruner ("none": None); for a grid or random search the default means none (another is refused by sweep)."""
    pruner = None if args.pruner == "none" else args.pruner
    return None if args.search != "optuna" and pruner == "successive-halving" else pruner


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())  # one line, even for multi-line messages


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands' parsers, by name (``train``, ``sweep``, ...)."""
    return {name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of the parser and its subcommands (``--resume``, ``--save-every``, ...)."""
    found = {flag for action in parser._actions for flag in action.option_strings}
    for sub in _subcommands(parser).values():
        found |= _flags(sub)
    return found


def speak_cli(message: str, parser: argparse.ArgumentParser) -> str:
    """A library message in the command line's words: ``resume=True`` -> ``--resume``, ``save_every='auto'``
    -> ``--save-every auto``, ``alpha=None`` -> ``no --alpha``; keywords the CLI has no flag for stay, and
    a flag the message already gave in parentheses is said once."""
    flags = _flags(parser)

    def flag(match: re.Match[str]) -> str:
        name, value = "--" + match["name"].replace("_", "-"), match["value"]
        if name not in flags:
            return match[0]
        if value == "True":
            return name
        if value == "None":
            return f"no {name}"
        return f"{name} {value.strip(chr(39))}" if value else name

    spoken = re.sub(r"\b(?P<name>[a-z][a-z_]*)=(?P<value>True|None|'[^']*'|[0-9.e-]+)?", flag, message)
    return re.sub(r"(--[a-z-]+(?: [\w.]+)?) \(\1\)", r"\1", spoken)  # "x='a' (--x a)" said once


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "experiment":
            _experiment(args)
        elif args.command == "train":
            if args.rank is None and not is_baseline(args.variant):
                raise ValueError(f"--rank is required for variant {args.variant!r} (only the baselines "
                                 f"{', '.join(BASELINES)} take none)")
            with torchrun_group() as (group, device):  # under torchrun: one run over all its processes
                train(_task(args), args.variant, args.rank, args.out, steps=args.steps, lr=args.lr, seed=args.seed,
                      resume=args.resume, process_group=group, device=device or args.device, **_run_settings(args))
                if group is None or dist.get_rank(group) == 0:
                    _print_table(load_runs(args.out))
        elif args.command == "sweep":
            table = sweep(_task(args), args.variants, args.ranks, args.steps, args.out, lrs=args.lrs, seeds=args.seeds,
                          search=args.search, trials=args.trials, pruner=_pruner(args), executor=args.executor,
                          address=args.address,
                          cpus_per_trial=args.cpus_per_trial, device=args.device, **_run_settings(args))
            _print_table(table)
        elif args.command == "resume":
            resume_run(args.run, args.steps, progress_bar=not args.quiet)
            _print_table(load_runs(args.run))
        elif args.command == "runs":
            _print_table(load_runs(args.directory))
        elif args.command == "summary":
            _print_summary(summarize(args.directory))
        elif args.command == "claims":
            _print_claims(check_claims(args.directory))
        elif args.command == "best":
            print(best_checkpoint(args.directory, args.metric, args.mode))
        elif args.command == "export":
            print(export_checkpoint(args.checkpoint, args.to, args.format))
        elif args.command == "compress":
            stages = compress_task(_task(args), args.out, rank=args.rank, energy=args.energy, params=args.params,
                                   layers=args.layers, recover=args.recover, recover_rank=args.recover_rank,
                                   steps=args.steps, lr=args.lr, seed=args.seed, **_run_settings(args))
            print(stages.drop(columns=["run", "path"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
            print(f"\nthe three stages, each a run (workbench runs {args.out}): {args.out}")
        elif args.command == "reduce":
            path, table = reduce_checkpoint(args.checkpoint, args.out, rank=args.rank, energy=args.energy)
            print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
            print(f"\nrank-reduced checkpoint: {path}")
        elif args.command == "spectrum":
            values = spectrum(args.checkpoint)
            ranks = effective_rank(values, args.energy)
            wide = values.pivot(index="layer", columns="index", values="value")
            print(wide.to_string(float_format=lambda v: f"{v:.4g}"))
            print(f"\neffective rank ({args.energy:g} of the energy):")
            print(ranks.to_string())
        elif args.command == "report":
            print(write_report(args.directory, args.to, args.grid))
    except (ValueError, TypeError, CheckpointError, MissingExtraError) as error:
        parser.exit(2, f"workbench: error: {speak_cli(_one_line(error), parser)}\n")
    except OSError as error:  # the disk, not the arguments: a full disk, a path that vanished
        parser.exit(1, f"workbench: error: {speak_cli(_one_line(error), parser)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
