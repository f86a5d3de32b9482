"""Panel benchmark: what the main panel's live figure, progress bar and status line cost a training run.

Run by hand: ``.venv/bin/python benchmarks/ui.py`` (about a minute on 2 CPU cores).

The same ``wb.Run`` (same task, variant, rank, steps, intervals, seed) is trained three ways:
plainly on a background thread (``wb.Run(...).fit()``, no progress bar); from ``wb.ui.Workbench``
(launch, then wait: the panel's callback records every point and redraws the figure, the
progress bar and the status line at most every ``DRAW_INTERVAL`` seconds and at the end); and
from the panel with the throttle off (a redraw after every step), to show what the throttle
saves. A timing callback measures each from its first step to the end of training (every
evaluation and checkpoint, the final redraw), both in wall time and in the training thread's
CPU time, which other processes on the machine disturb far less. The three are interleaved
and the best of several repeats is kept. With one torch thread (the default here) all of
training runs on the training thread, so its CPU time is all of it.

Headless, the widget messages go nowhere; in a notebook the kernel also serialises them to
the browser, so read the figures there as a lower bound.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

import workbench as wb
import workbench.ui.workbench as panel_module
from workbench.ui.workbench import Workbench


class Timer(wb.Callback):
    """Wall and training-thread CPU seconds from the end of step 1 to the end of training."""

    def on_step(self, trainer: wb.Trainer, loss: float) -> None:
        if trainer.step == 1:
            self.start = (time.perf_counter(), time.thread_time())

    def on_end(self, trainer: wb.Trainer) -> None:
        self.seconds = (time.perf_counter() - self.start[0], time.thread_time() - self.start[1])


def plain(task: str, out: Path, settings: dict) -> tuple[float, float]:
    timer = Timer()
    run = wb.Run(task, "lora", 8, out, progress_bar=False, callbacks=[timer], **settings)
    thread = threading.Thread(target=run.fit)  # where the panel trains too
    thread.start()
    thread.join()
    return timer.seconds


def with_panel(task: str, out: Path, settings: dict, interval: float) -> tuple[float, float]:
    timer = Timer()
    panel = Workbench(task, out, callbacks=[timer])
    panel.ranks.value, panel.lr.value, panel.seed.value = (8,), settings["lr"], settings["seed"]
    panel.steps.value, panel.eval_every.value = settings["steps"], settings["eval_every"]
    panel.save_every.value = settings["save_every"]
    panel_module.DRAW_INTERVAL, saved = interval, panel_module.DRAW_INTERVAL
    try:
        if not panel.launch():
            raise RuntimeError(f"the panel did not launch: {panel.last_error}")
        table = panel.wait()
    finally:
        panel_module.DRAW_INTERVAL = saved
    if panel.last_error is not None or list(table["status"]) != ["finished"]:
        raise RuntimeError(f"the panel's run did not finish: {panel.status.value}")
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    torch.set_num_threads(args.threads)
    settings = {"steps": args.steps, "eval_every": args.eval_every, "save_every": args.save_every, "lr": 3e-3,
                "seed": 0}
    wb.tasks.get_task(args.task).base_model()  # pre-train and cache the base outside the timings
    labels = ("plain wb.Run", f"panel, redraw every {panel_module.DRAW_INTERVAL} s", "panel, redraw every step")
    times: dict[str, list[tuple[float, float]]] = {label: [] for label in labels}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            root = Path(tmp) / str(repeat)
            times[labels[0]].append(plain(args.task, root / "plain", settings))
            times[labels[1]].append(with_panel(args.task, root / "panel", settings, panel_module.DRAW_INTERVAL))
            times[labels[2]].append(with_panel(args.task, root / "every-step", settings, 0.0))
    wall = {label: min(w for w, _ in values) for label, values in times.items()}
    cpu = {label: min(c for _, c in values) for label, values in times.items()}
    print(f"task {args.task}, lora r=8, {args.steps} steps, evaluate every {args.eval_every}, checkpoint every "
          f"{args.save_every}, {args.threads} torch thread(s), best of {args.repeats}")
    print(f"  {'':<30} {'wall s':>8} {'steps/s':>8} {'thread CPU s':>13}")
    for label in labels:
        print(f"  {label:<30} {wall[label]:8.2f} {(args.steps - 1) / wall[label]:8.1f} {cpu[label]:13.2f}")
    for label in labels[1:]:
        goal = "  (goal: a few per cent at most)" if label == labels[1] else ""
        print(f"  {label} over plain: wall {100 * (wall[label] / wall[labels[0]] - 1):+.1f} %, "
              f"CPU {100 * (cpu[label] / cpu[labels[0]] - 1):+.1f} %{goal}")


if __name__ == "__main__":
    main()
