"""Data-parallel training: the sharded shuffle, 2 gloo processes against 1, replicas, exact resume after SIGKILL."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import training_log
from safetensors.torch import load_file
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

import workbench as wb
from workbench.tasks import make_loaders
from workbench.tasks.base import ShardedRandomSampler
from workbench.trainer import Trainer

JOBS = Path(__file__).with_name("distributed_jobs.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The environment of the launched processes: one shared cache, its digits base pre-trained once, here."""
    cache = str(tmp_path_factory.getbasetemp() / "cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORKBENCH_CACHE", cache)
        wb.tasks.get_task("digits").base_model()
    return {**os.environ, "WORKBENCH_CACHE": cache, "OMP_NUM_THREADS": "1"}


def _launch(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as output:  # a file, not a pipe: the workers inherit it and a full pipe would block them
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)


def _finish(job: subprocess.Popen, log: Path) -> None:
    assert job.wait(timeout=300) == 0, log.read_text()


def _entries(run: Path) -> dict[tuple, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(e["step"], e["split"], e["metric"]): e["value"] for e in training_log(lines)}


# -- the sampler --------------------------------------------------------------------------------

def _epochs(loader: StatefulDataLoader, count: int) -> list[torch.Tensor]:
    return [targets for _ in range(count) for _, targets in loader]


@pytest.mark.parametrize("grouped", [False, True])  # the plain shuffle, and grouped by length
@pytest.mark.parametrize("size", [203, 193])  # a last batch of 11 (shared 6 + 5), and of 1 (left out)
def test_the_ranks_share_each_batch_of_the_one_process_shuffle_and_resume_mid_epoch(size, grouped):
    dataset = TensorDataset(torch.zeros(size, 1), torch.arange(size))
    lengths = torch.randint(1, 70, (size,), generator=torch.Generator().manual_seed(1)).tolist() if grouped else None
    generator = torch.Generator().manual_seed(5)
    sampler = (ShardedRandomSampler(dataset, 16, 0, 1, generator, lengths) if grouped  # one process, grouped
               else RandomSampler(dataset, generator=generator))
    one = StatefulDataLoader(dataset, batch_size=16, sampler=sampler)

    def shard(rank: int) -> StatefulDataLoader:
        sampler = ShardedRandomSampler(dataset, 16, rank, 2, torch.Generator().manual_seed(5), lengths)
        return StatefulDataLoader(dataset, batch_size=8, sampler=sampler)

    expected = [batch for batch in _epochs(one, 3) if len(batch) >= 2]
    ranks = [_epochs(shard(rank), 3) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(expected) and len(shard(0)) == len(ranks[0]) // 3
    for batch, *shares in zip(expected, *ranks, strict=True):
        assert sorted(torch.cat(shares).tolist()) == sorted(batch.tolist())

    loader = shard(1)  # stop after 20 batches (mid second epoch); a fresh loader continues from its state
    batches = itertools.chain.from_iterable(loader for _ in range(3))
    taken = [targets for _, (_, targets) in zip(range(20), batches, strict=False)]
    resumed = shard(1)
    resumed.load_state_dict(loader.state_dict())
    rest = [targets for _, targets in resumed] + _epochs(resumed, 1)
    assert len(taken + rest) == len(ranks[1])
    assert all(torch.equal(a, b) for a, b in zip(taken + rest, ranks[1], strict=True))


def test_loaders_split_the_global_batch_and_refuse_an_uneven_split():
    task = wb.tasks.get_task("digits")
    shares = [make_loaders(task.datasets(0), 64, 0, rank, 2) for rank in range(2)]
    assert [len(next(iter(s["train"]))[1]) for s in shares] == [32, 32]
    assert sum(len(s["val"].dataset) for s in shares) == len(task.datasets(0)["val"])
    with pytest.raises(ValueError, match=r"the global batch size 64 does not split over 3 processes"):
        make_loaders(task.datasets(0), 64, 0, 0, 3)
    with pytest.raises(ValueError, match=r"rank must be in 0..1 for world_size 2, not 2"):
        make_loaders(task.datasets(0), 64, 0, 2, 2)


# -- two processes ------------------------------------------------------------------------------

VARIANTS = ["lora", "delta-lora", "lora-plus"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, env) -> Path:
    """distributed_jobs.py's runs, 100 steps: under torchrun in two/ (with --stop-at 33), in one process in one/."""
    out = tmp_path_factory.mktemp("jobs")
    for command, name, more in ((TORCHRUN, "two", ["--stop-at", "33"]), ([sys.executable], "one", [])):
        log = out / f"{name}.log"  # one after the other: 2 cores
        _finish(_launch([*command, str(JOBS), str(out / name), "100", *VARIANTS, *more], env, log), log)
    return out


def test_two_processes_train_as_one_process_on_the_same_global_batch(jobs):
    base = wb.tasks.get_task("digits").base_model().state_dict()
    for variant in VARIANTS:
        one, two = _entries(jobs / "one" / variant), _entries(jobs / "two" / variant)
        assert one.keys() == two.keys() and len([k for k in one if k[1] == "train"]) == 100
        for key, value in one.items():  # the same up to float32 rounding (sums taken in another order)
            assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (variant, key)
        replicas = [load_file(jobs / "two" / variant / f"rank-{rank}.safetensors") for rank in range(2)]
        assert replicas[0].keys() == replicas[1].keys()
        assert all(torch.equal(replicas[0][k], replicas[1][k]) for k in replicas[0]), variant  # never drift
        alone = load_file(jobs / "one" / variant / "rank-0.safetensors")
        assert all(torch.allclose(replicas[0][k], alone[k], rtol=1e-4, atol=1e-5) for k in alone), variant
        if variant == "delta-lora":  # its base weights moved (and alike on both ranks, compared above)
            moved = [k for k in replicas[0] if k.endswith("base_layer.weight")]
            assert moved and not any(torch.equal(replicas[0][k], base[k.replace("base_layer.", "")]) for k in moved)


def test_a_stop_on_one_rank_stops_all_and_the_python_api_resumes_exactly(jobs):
    seen = [json.loads((jobs / "two" / "stopped" / f"rank-{rank}.json").read_text()) for rank in range(2)]
    assert seen[0] == seen[1]  # both ranks stopped at the same step, then finished
    (first, stopped_at), (second, end) = seen[0]
    assert (first, second, end) == ("stopped", "finished", 100)
    assert stopped_at == 34  # asked after step 33 on rank 1; the ranks agree on it as step 34 starts
    run, straight = jobs / "two" / "stopped", jobs / "two" / "straight"
    assert (run / "checkpoints" / f"step-{stopped_at:08d}").is_dir()
    entries = _entries(run)
    del entries[(stopped_at, "val", "loss")], entries[(stopped_at, "val", "acc")]  # stopping validates
    assert entries == _entries(straight)  # dropout included: each rank's RNG came back as it was
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(r / "checkpoints" / "step-00000100" / name) for r in (run, straight))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return [p for child in children for p in (child, *_descendants(child))]


def test_torchrun_train_resumes_exactly_after_sigkill(tmp_path, env):
    train = [*TORCHRUN, "-m", "workbench", "train", "--task", "digits", "--variant", "lora", "--rank", "4",
             "--steps", "200", "--lr", "0.01", "--dropout", "0.1", "--eval-every", "50", "--save-every", "50",
             "--keep-last", "2", "--quiet"]
    straight = tmp_path / "straight"
    _finish(_launch([*train, "--out", str(straight)], env, tmp_path / "straight.log"), tmp_path / "straight.log")

    run, log = tmp_path / "killed", tmp_path / "killed.log"
    job = _launch([*train, "--out", str(run)], env, log)
    while not (run / "checkpoints" / "step-00000100").exists():
        assert job.poll() is None, log.read_text()
        time.sleep(0.002)
    processes = [job.pid, *_descendants(job.pid)]  # torchrun and its workers, which run in sessions of their own
    for pid in processes:
        os.kill(pid, signal.SIGKILL)
    job.wait()
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
              for pid in processes[1:]):
        time.sleep(0.01)
    assert len(processes) >= 3, processes  # torchrun and at least two workers were killed
    assert json.loads((run / "config.json").read_text())["status"] == "running"  # it really died mid-run
    assert not (run / "checkpoints" / "step-00000200").exists()
    _finish(_launch([*train, "--out", str(run), "--resume"], env, log), log)

    assert _entries(run) == _entries(straight)
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(r / "checkpoints" / "step-00000200" / name) for r in (run, straight))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("module.") for k in a)
    record = json.loads((run / "config.json").read_text())
    assert record["status"] == "finished" and record["processes"] == 2

    task = wb.tasks.get_task("digits")  # one process cannot continue a two-process checkpoint exactly
    model = wb.add_adapters(task.base_model(), "lora", 4, dropout=0.1)
    with pytest.raises(ValueError, match=r"written by a run on 2 process\(es\), this one has 1"):
        Trainer(model, task, lr=0.01, steps=400, checkpoints=run / "checkpoints", progress_bar=False).fit(resume=True)
