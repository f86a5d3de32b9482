"""Small models and settings shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

# Nothing here may reach the network: transformers and the hub read local files only, in this
# process, in the subprocesses tests start and in the notebooks' kernels (they inherit it).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


COSTS = "checkpoint"  # the metrics log's split of each checkpoint's write time and size: the machine's, not training's


def training_log(entries: list[dict]) -> list[dict]:
    """The metrics-log entries training computes (train and val): what an exact resume reproduces. Checkpoint
    write costs are timings (and sizes of files that hold timestamps), and a resumed run wrote other checkpoints."""
    return [entry for entry in entries if entry["split"] != COSTS]


def training_metrics(metrics):
    """``wb.load_metrics``' table without the checkpoint write costs (``training_log``)."""
    return metrics[metrics["split"] != COSTS].reset_index(drop=True)


def mlp(seed: int = 0) -> nn.Sequential:
    """A plain torch model: 12 -> 24 -> 16 -> 6, with Linear layers named 0, 2, 4."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 6))


@pytest.fixture
def regression() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (64, 12) and targets (64, 6) of a teacher: ``mlp()`` with layers 0 and 2 moved by rank-2 matrices."""
    generator = torch.Generator().manual_seed(1)
    teacher = mlp()
    with torch.no_grad():
        for layer in (teacher[0], teacher[2]):
            out_features, in_features = layer.weight.shape
            low_rank = torch.randn(out_features, 2, generator=generator) @ torch.randn(2, in_features, generator=generator)
            layer.weight += low_rank / 2
        x = torch.randn(64, 12, generator=generator)
        return x, teacher(x)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, cloned, by name."""
    return {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}


# Bitwise comparisons are kept for one thing only: the same computation run twice (an interrupted and
# resumed run against an uninterrupted one). They run on one thread, in this process and in the
# subprocesses they start, so the matmul kernels split their sums the same way on any CPU.
EXACT_THREADS = 1


@pytest.fixture
def fixed_threads(monkeypatch):
    """torch on ``EXACT_THREADS`` threads here, and OMP_NUM_THREADS for subprocesses; restored afterwards."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(EXACT_THREADS))
    torch.set_num_threads(EXACT_THREADS)
    yield os.environ
    torch.set_num_threads(before)
