"""Data-parallel launch: the process group of a ``torchrun`` job, read from its environment.

``torchrun --nproc-per-node N -m workbench train ...`` starts N processes with RANK,
WORLD_SIZE, LOCAL_RANK (and the rendezvous address) set; ``torchrun_group`` joins them into
one group, which ``wb.Run`` / ``wb.Trainer`` take as ``process_group`` (see ``wb.Trainer``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

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
