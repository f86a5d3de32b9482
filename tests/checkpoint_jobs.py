"""Jobs the checkpoint tests run in real subprocesses, to kill them, starve them of disk or deny them writes.

    python checkpoint_jobs.py train RUN_DIR STEPS [--save-every K] [--pause S] [--async]
    python checkpoint_jobs.py run RUN_DIR STEPS [--save-every K] [--pause S]   wb.Run, cosine schedule with warmup
    python checkpoint_jobs.py churn DIRECTORY          save large checkpoints until killed
    python checkpoint_jobs.py disk-full DIRECTORY      save once, then again with a file-size limit
    python checkpoint_jobs.py hold-lock DIRECTORY      take the write lock, then wait to be killed
    python checkpoint_jobs.py read-only DIRECTORY      try to write in read-only directories (see read_only)

Every job runs torch on one thread, so two runs of a job compute alike on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

import workbench as wb


def digits_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10))


def train(run: Path, steps: int, save_every: int, pause: float, async_save: bool) -> None:
    """Shuffled digits, dropout in the model and on the adapter path; resumes if it can."""
    data = load_digits()
    dataset = TensorDataset(torch.tensor(data.data, dtype=torch.float32) / 16, torch.tensor(data.target))
    # Two generators: the sampler's shuffles and is saved in the loader's state; the loader's own
    # only feeds the per-epoch worker base seed. With one shared generator epochs after a resume
    # differ, and with none the base seed is drawn from the global RNG, which shifts dropout.
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(1))
    loader = StatefulDataLoader(dataset, batch_size=32, sampler=sampler, generator=torch.Generator().manual_seed(3))
    model = wb.add_adapters(digits_model(), "lora", 4, dropout=0.2)
    optimizer = wb.make_optimizer(model, lr=1e-2)
    manager = wb.CheckpointManager(run / "checkpoints", keep_last=2, async_save=async_save)
    torch.manual_seed(2)
    step, epoch = 0, 0
    progress = manager.resume(model, optimizer)
    if progress is not None:
        step, epoch = progress["step"], progress["extra"]["epoch"]
        loader.load_state_dict(progress["extra"]["loader"])
    with open(run / "losses.txt", "a") as log:
        while step < steps:
            for x, y in loader:
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                log.write(f"{step} {loss.item()!r}\n")
                log.flush()
                if step % save_every == 0 or step == steps:
                    extra = {"loader": loader.state_dict(), "epoch": epoch}
                    manager.save(step, model, optimizer, metrics={"train_loss": loss.item()}, extra=extra)
                time.sleep(pause)
                if step == steps:
                    break
            else:
                epoch += 1
    manager.close()


class Pause(wb.Callback):
    """Sleep after every step, so a test sees the run between its checkpoints."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step(self, trainer: wb.Trainer, loss: float) -> None:
        time.sleep(self.seconds)


def run(directory: Path, steps: int, save_every: int, pause: float) -> None:
    """``wb.Run`` on digits with a warmup and cosine schedule, gradient clipping and dropout; resumes if it can."""
    wb.Run("digits", "lora", 4, directory, steps=steps, lr=1e-2, eval_every=save_every, save_every=save_every,
           keep_last=2, schedule="cosine", warmup_steps=7, max_grad_norm=1.0, dropout=0.2, resume=True,
           progress_bar=False, callbacks=[Pause(pause)]).fit()


def big_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(512, 512) for _ in range(16)])  # 16.8 MB of float32


def churn(directory: Path) -> None:
    """Save full checkpoints of ``big_model`` (bias 0 filled with the step) after the newest there, forever."""
    model = big_model()
    manager = wb.CheckpointManager(directory, keep_last=3)
    listed = manager.list()
    step = int(listed["step"].max()) if len(listed) else 0
    while True:
        step += 1
        with torch.no_grad():
            model[0].bias.fill_(step)
        manager.save(step, model, full=True)


def disk_full(directory: Path) -> None:
    model = wb.add_adapters(big_model(), "lora", 8)
    manager = wb.CheckpointManager(directory, keep_last=1)
    manager.save(1, model)  # adapter tensors only: small
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    try:
        manager.save(2, model, full=True)  # 16.8 MB: cannot fit
    except wb.CheckpointError as error:
        print(json.dumps({"error": str(error)}))
    else:
        print(json.dumps({"error": None}))


def hold_lock(directory: Path) -> None:
    manager = wb.CheckpointManager(directory)
    manager.save(0, nn.Linear(2, 2), full=True)
    print("locked", flush=True)
    time.sleep(600)


NOBODY = 65534  # the unprivileged uid and gid a job run by root drops to


def read_only(directory: Path) -> None:
    """Try every kind of write in the read-only directories the test prepared; print each outcome as JSON.

    ``directory/no-lock`` holds a checkpoint of step 1 and no lock file, ``directory/open-lock``
    the same and a lock file anyone may open. Run by root (whom permission bits do not stop),
    the job first drops to uid and gid ``NOBODY``, after its imports (the interpreter lives
    where nobody may not read).
    """
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    attempts = {
        "create": lambda: wb.CheckpointManager(directory / "no-lock" / "new"),
        "save": lambda: wb.CheckpointManager(directory / "no-lock").save(2, nn.Linear(2, 2), full=True),
        "save-locked": lambda: wb.CheckpointManager(directory / "open-lock").save(2, nn.Linear(2, 2), full=True),
        "delete": lambda: wb.CheckpointManager(directory / "open-lock").delete(1),
        "list": lambda: wb.CheckpointManager(directory / "open-lock").list()["step"].tolist(),
    }
    outcomes = {}
    for name, attempt in attempts.items():
        try:
            outcomes[name] = {"returned": repr(attempt())}
        except Exception as error:  # the test checks which error, and its message
            outcomes[name] = {"raised": type(error).__name__, "message": str(error)}
    print(json.dumps(outcomes))


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=["train", "run", "churn", "disk-full", "hold-lock", "read-only"])
    parser.add_argument("directory", type=Path)
    parser.add_argument("steps", type=int, nargs="?", default=0)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--async", dest="async_save", action="store_true")
    args = parser.parse_args()
    args.directory.mkdir(parents=True, exist_ok=True)
    if args.job == "train":
        train(args.directory, args.steps, args.save_every, args.pause, args.async_save)
    elif args.job == "run":
        run(args.directory, args.steps, args.save_every, args.pause)
    else:
        jobs = {"churn": churn, "disk-full": disk_full, "hold-lock": hold_lock, "read-only": read_only}
        jobs[args.job](args.directory)


if __name__ == "__main__":
    sys.exit(main())
