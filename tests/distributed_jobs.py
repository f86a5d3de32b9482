"""Training jobs the distributed tests launch, as one plain process or under torchrun.

    python distributed_jobs.py OUT STEPS VARIANT...                                  one process
    torchrun --standalone --nproc-per-node 2 distributed_jobs.py OUT STEPS VARIANT... [--stop-at K]

For each variant it trains a digits run through ``wb.Trainer`` (rank 0 writes the metrics log
OUT/VARIANT/metrics.jsonl), then every rank writes its whole model state, frozen base weights
included, to OUT/VARIANT/rank-R.safetensors, so a test can compare the replicas.

``--stop-at K`` then trains LoRA with dropout twice, with checkpoints: OUT/straight without a
break, and OUT/stopped, where the last rank alone calls ``stop()`` at step K and a new trainer
resumes the run; every rank writes OUT/stopped/rank-R.json with the statuses and steps it saw.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import workbench as wb
from workbench.distributed import torchrun_group
from workbench.trainer import Trainer


class StopAt(wb.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, trainer: Trainer, loss: float) -> None:
        if trainer.step == self.step:
            trainer.stop()


def make_trainer(out: Path, steps: int, variant: str, group: Any, device: Any, checkpoints: bool = False,
                 callbacks: tuple[wb.Callback, ...] = (), **options: Any) -> Trainer:
    task = wb.tasks.get_task("digits")
    torch.manual_seed(0)
    model = wb.add_adapters(task.base_model(), variant, 4, **options)
    out.mkdir(parents=True, exist_ok=True)
    return Trainer(model, task, lr=1e-2, steps=steps, eval_every=50, save_every=50, metrics_log=out / "metrics.jsonl",
                   checkpoints=out / "checkpoints" if checkpoints else None, callbacks=callbacks, progress_bar=False,
                   process_group=group, device=device)


def stop_and_resume(out: Path, steps: int, stop_at: int, group: Any, device: Any) -> None:
    rank, last = dist.get_rank(group), dist.get_world_size(group) - 1
    straight = make_trainer(out / "straight", steps, "lora", group, device, checkpoints=True, dropout=0.1)
    assert straight.fit() == "finished"
    stopper = (StopAt(stop_at),) if rank == last else ()
    first = make_trainer(out / "stopped", steps, "lora", group, device, checkpoints=True, callbacks=stopper, dropout=0.1)
    seen = [(first.fit(), first.step)]
    second = make_trainer(out / "stopped", steps, "lora", group, device, checkpoints=True, dropout=0.1)
    seen.append((second.fit(resume=True), second.step))
    (out / "stopped" / f"rank-{rank}.json").write_text(json.dumps(seen))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--stop-at", type=int)
    args = parser.parse_args()
    with torchrun_group() as (group, device):
        rank = 0 if group is None else dist.get_rank(group)
        for variant in args.variants:
            trainer = make_trainer(args.out / variant, args.steps, variant, group, device)
            assert trainer.fit() == "finished"
            state = {name: tensor.detach().clone().contiguous() for name, tensor in trainer.model.state_dict().items()}
            save_file(state, args.out / variant / f"rank-{rank}.safetensors")
        if args.stop_at is not None:
            stop_and_resume(args.out, args.steps, args.stop_at, group, device)


if __name__ == "__main__":
    main()
