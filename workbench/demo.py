"""The main job for now: adapt a digits classifier to mirrored digits with every variant.

A small MLP is pre-trained on scikit-learn's bundled 8x8 handwritten digits (real data that
ships with the package, nothing downloaded), then each variant adapts a copy of it to the
same digits mirrored left-right, where the frozen base does much worse.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import pandas as pd
import torch
from sklearn.datasets import load_digits
from torch import nn

from .adapt import add_adapters, merge_adapters, trainable_parameters, unmerge_adapters
from .adapters import VARIANTS
from .optim import make_optimizer


def _digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_val, y_val): 1,797 images as (N, 64) in [0, 1], 75/25 split."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = len(x) * 3 // 4
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def _mirror(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 8, 8).flip(-1).reshape(-1, 64)


def _fit(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(len(x), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(-1) == y).float().mean().item()


def run_demo(rank: int = 4, steps: int = 300, seed: int = 0, echo: Callable[[str], None] = print) -> pd.DataFrame:
    """Adapt the pre-trained digits MLP to mirrored digits with each variant; one row per variant."""
    torch.manual_seed(seed)
    x_train, y_train, x_val, y_val = _digits(seed)
    base = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    _fit(base, torch.optim.AdamW(base.parameters(), lr=3e-3), x_train, y_train, 600)
    base.eval()
    echo(f"base MLP: {sum(p.numel() for p in base.parameters()):,} parameters, pre-trained on digits")
    echo(f"  validation accuracy: original {_accuracy(base, x_val, y_val):.3f}, "
         f"mirrored {_accuracy(base, _mirror(x_val), y_val):.3f}")
    echo(f"adapting to mirrored digits: rank {rank}, {steps} steps, every Linear layer\n")

    rows = []
    for variant in VARIANTS:
        torch.manual_seed(seed)
        model = add_adapters(copy.deepcopy(base), variant, rank)
        before = _accuracy(model, _mirror(x_val), y_val)
        start = time.perf_counter()
        _fit(model, make_optimizer(model, lr=1e-2), _mirror(x_train), y_train, steps)
        seconds = time.perf_counter() - start
        outputs = model(x_val)
        merge_adapters(model)
        merged_gap = (model(x_val) - outputs).abs().max().item()
        unmerge_adapters(model)
        rows.append({
            "variant": variant,
            "trainable": trainable_parameters(model),
            "val_acc_before": before,
            "val_acc_after": _accuracy(model, _mirror(x_val), y_val),
            "merged_max_abs_diff": merged_gap,
            "train_seconds": seconds,
        })
    table = pd.DataFrame(rows)
    echo(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return table
