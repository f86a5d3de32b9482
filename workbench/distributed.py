"""Data-parallel training: the process group of a ``torchrun`` job, and what its ranks agree on.

``torchrun --nproc-per-node N -m workbench train ...`` starts N processes with RANK,
WORLD_SIZE, LOCAL_RANK (and the rendezvous address) set; ``torchrun_group`` joins them into
one group, which ``wb.Run`` / ``wb.Trainer`` take as ``process_group`` (see ``wb.Trainer``).

``Replicas`` is one rank's side of the protocol the trainer follows under a group, beside its
loop: the model wrapped in ``DistributedDataParallel``; one all-reduce per step agreeing on the
whole batch's loss, this rank's loss weight, a non-finite loss and a stop asked on any rank;
every rank's RNG and loader state gathered into rank 0's checkpoints; and every rank resumed
from the checkpoint rank 0 picks. ``sum_over_ranks`` is the one reduction (validation uses it too).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from .checkpoints import CheckpointManager

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@contextmanager
def torchrun_group() -> Iterator[tuple[dist.ProcessGroup | None, torch.device | None]]:
    """``(process_group, device)`` for this process, the group destroyed on exit.

    Under torchrun with more than one process: the default group, with NCCL and the device
    ``cuda:<LOCAL_RANK>`` where GPUs exist, else Gloo on the CPU. Otherwise ``(None, None)``:
    one process, as without torchrun.
    """
    if any(name not in os.environ for name in LAUNCH_VARIABLES) or int(os.environ["WORLD_SIZE"]) == 1:
        yield None, None
        return
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.group.WORLD, device
    finally:
        dist.destroy_process_group()


def collective_device(process_group: dist.ProcessGroup, device: torch.device | str | None) -> torch.device:
    """Where the group's collectives take their tensors: the training device under NCCL, else the CPU (gloo)."""
    if device is not None and dist.get_backend(process_group) == dist.Backend.NCCL:
        return torch.device(device)
    return torch.device("cpu")


def sum_over_ranks(values: torch.Tensor, process_group: dist.ProcessGroup,
                   device: torch.device | str | None) -> torch.Tensor:
    """``values`` summed element-wise over the group's ranks, on the CPU; ``values`` itself is left as it was.

    One all-reduce, on ``collective_device(process_group, device)``; every rank must call it.
    """
    reduced = values.to(collective_device(process_group, device), copy=True)
    dist.all_reduce(reduced, group=process_group)
    return reduced.cpu()


def unwrap(model: nn.Module, process_group: dist.ProcessGroup | None
           ) -> tuple[nn.Module, dist.ProcessGroup | None, DistributedDataParallel | None]:
    """``(module, process_group, wrapper)`` for a model that may already be wrapped in ``DistributedDataParallel``.

    A wrapped model gives its plain module, its group where ``process_group`` is None, and itself
    as the wrapper; a plain model comes back as it is, with ``process_group`` and no wrapper.
    """
    if isinstance(model, DistributedDataParallel):
        return model.module, process_group or model.process_group, model
    return model, process_group, None


class Agreement(NamedTuple):
    """What every rank of the group knows after ``Replicas.agree`` at a step."""

    loss: float  # L, the whole batch's mean loss; when a rank diverged, this rank's own non-finite loss, else NaN
    weight: float  # w_r, what this rank multiplies its loss by before backward (1 when a rank diverged)
    finite: bool  # every rank's loss was finite
    stop: bool  # a stop was asked on some rank


class Replicas:
    """One rank's side of data-parallel training: the group, this rank, the world size and the device.

    Every rank of the group holds a replica of the same model and makes the same calls, in the
    same order: each method below is a collective (``wrap`` too: DDP broadcasts rank 0's
    parameters), and a rank missing one leaves the others waiting.

    Args:
        process_group: the ``torch.distributed`` group the ranks train in.
        device: the training device (e.g. ``cuda:<local rank>``); the collectives take their
            tensors there under NCCL and on the CPU under gloo (``collective_device``).
    """

    def __init__(self, process_group: dist.ProcessGroup, device: torch.device | str) -> None:
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.device = torch.device(device)

    def wrap(self, model: nn.Module) -> DistributedDataParallel:
        """``model`` moved to the device and wrapped in DDP over the group, which averages gradients over the ranks.

        The wrapper is what training calls; ``model`` stays the plain module, so checkpoints hold
        its names ("fc1.lora_A", never "module.fc1.lora_A") and load into a one-process model.
        """
        model.to(self.device)
        ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, process_group=self.group)

    def agree(self, loss: float, counted: float, stop: bool) -> Agreement:
        """One all-reduce per step: the whole batch's loss, this rank's loss weight, all finite, a stop asked anywhere.

        With n_r targets counted on rank r, N = sum_r n_r and L_r rank r's mean loss, the whole
        batch's loss is L = sum_r n_r L_r / N. DDP averages gradients over the W ranks, so rank r
        back-propagates w_r L_r with w_r = W n_r / N: the average is then exactly dL/dtheta, what
        one process computes on the whole batch (w_r = 1 when the shares count alike).

        A non-finite L_r on any rank makes ``finite`` False on every rank, so all of them end
        before the step is applied; a stop asked on any rank likewise ends all at the same step.

        Args:
            loss: L_r, this rank's mean loss on its share of the batch.
            counted: n_r, the targets counted in that share.
            stop: whether a stop was asked on this rank.
        """
        finite = math.isfinite(loss)
        sums = torch.tensor([loss * counted if finite else 0.0, counted, 0.0 if finite else 1.0, float(stop)],
                            dtype=torch.float64)
        total, count, diverged, asked = sum_over_ranks(sums, self.group, self.device).tolist()
        if diverged:
            return Agreement(loss if not finite else math.nan, 1.0, False, bool(asked))
        return Agreement(total / max(count, 1), self.world_size * counted / max(count, 1), True, bool(asked))

    def gather(self, state: Any) -> list[Any] | None:
        """Every rank's ``state`` (picklable), in rank order, on rank 0; None on the other ranks."""
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(state, gathered, group=self.group, group_dst=0)
        return gathered

    def resume(self, manager: CheckpointManager, model: nn.Module,
               optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Rank 0 resumes from the newest valid checkpoint (``manager.resume``); the other ranks then load that one.

        Returns the checkpoint's progress on every rank, or None on every rank when there is none.
        Only rank 0's global RNGs are set from it (to rank 0's saved states); every rank's own
        states are wherever the caller saved them with ``gather`` (the trainer: the progress's ``extra``).
        """
        progress = manager.resume(model, optimizer) if self.rank == 0 else None
        chosen = [None if progress is None else progress["path"]]
        dist.broadcast_object_list(chosen, group=self.group, group_src=0)
        if self.rank == 0 or chosen[0] is None:
            return progress
        return manager.load(chosen[0], model, optimizer)

    def barrier(self) -> None:
        """Wait until every rank of the group gets here."""
        dist.barrier(group=self.group)
