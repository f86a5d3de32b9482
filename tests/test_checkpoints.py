"""Checkpoints: contents, atomicity under SIGKILL, exact resume, retention, locking, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import mlp, snapshot, training_log
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import workbench as wb
from workbench.checkpoints import snapshot as snapshot_module
from workbench.checkpoints import verify

JOBS = Path(__file__).with_name("checkpoint_jobs.py")


def _job(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(JOBS), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _trained(variant: str = "lora-plus", steps: int = 3, **options: object) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = wb.add_adapters(mlp(), variant, 4, **options)
    optimizer = wb.make_optimizer(model, lr=1e-2)
    x = torch.randn(16, 12)
    for _ in range(steps):
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- what a checkpoint holds ------------------------------------------------------------------


def test_checkpoint_holds_trained_tensors_optimizer_and_progress(tmp_path):
    model, optimizer = _trained("lora-plus")
    manager = wb.CheckpointManager(tmp_path, run_config={"task": "regression", "seed": 0})
    path = manager.save(3, model, optimizer, metrics={"val_loss": 0.5}, stage="finetuned", extra={"epoch": 1})
    assert sorted(os.listdir(path)) == ["model.safetensors", "optimizer.safetensors", "progress.json"]
    assert sorted(load_file(path / "model.safetensors")) == [f"{i}.lora_{m}" for i in (0, 2, 4) for m in "AB"]
    progress = json.loads((path / "progress.json").read_text())
    assert progress["lr"] == [1e-2, 1e-2 * 16] and progress["stage"] == "finetuned"
    assert progress["adapter"]["variant"] == "lora-plus" and progress["adapter"]["targets"] == ["0", "2", "4"]
    assert set(progress["rng"]) >= {"python", "numpy", "torch"} and {"torch", "safetensors"} <= set(progress["versions"])
    assert progress["versions"]["workbench"] == wb.__version__
    assert set(progress["files"]) == {"model.safetensors", "optimizer.safetensors"}
    assert progress["run"] == {"task": "regression", "seed": 0}

    fresh = wb.add_adapters(mlp(), "lora-plus", 4)
    fresh_optimizer = wb.make_optimizer(fresh, lr=1.0)
    loaded = manager.load(3, fresh, fresh_optimizer)
    _assert_same_state(snapshot(fresh), snapshot(model))
    original, restored = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]  # learning rates of both LoRA+ groups
    for index, state in original["state"].items():
        _assert_same_state(state, restored["state"][index])
    assert loaded["extra"] == {"epoch": 1} and loaded["metrics"] == {"val_loss": 0.5}


def test_delta_lora_checkpoint_holds_the_moved_base_weights(tmp_path):
    model, optimizer = _trained("delta-lora")
    path = wb.CheckpointManager(tmp_path).save(3, model, optimizer)
    names = set(load_file(path / "model.safetensors"))
    assert {"0.base_layer.weight", "2.base_layer.weight", "4.base_layer.weight"} <= names
    assert "0.base_layer.bias" not in names
    fresh = wb.add_adapters(mlp(), "delta-lora", 4)
    fresh_optimizer = wb.make_optimizer(fresh, lr=1e-2)
    wb.CheckpointManager(tmp_path).load(path, fresh, fresh_optimizer)
    _assert_same_state(snapshot(fresh), snapshot(model))
    assert fresh_optimizer.param_groups[0]["delta_steps"] == 3


@pytest.mark.parametrize("async_save", [False, True])
def test_full_checkpoint_restores_every_tensor_of_a_tied_model_storing_the_tied_one_once(tmp_path, async_save):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=8)
    model = GPT2LMHeadModel(config)
    manager = wb.CheckpointManager(tmp_path, async_save=async_save)
    path = manager.save(0, model, full=True)
    manager.close()
    stored = load_file(path / "model.safetensors")
    assert ("lm_head.weight" in stored) != ("transformer.wte.weight" in stored)  # one copy (the async one too)
    torch.manual_seed(1)
    other = GPT2LMHeadModel(config)
    wb.CheckpointManager(tmp_path).load(path, other)
    _assert_same_state(snapshot(other), snapshot(model))
    assert other.lm_head.weight is other.transformer.wte.weight  # still tied


# -- bad input: a clear CheckpointError, nothing lost ------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model, optimizer = _trained("lora")
    manager = wb.CheckpointManager(tmp_path / "run")
    return manager, manager.save(3, model, optimizer)


def _flip_a_byte(path: Path) -> None:
    """Change one byte in the middle of ``path``, as a later edit would: same size, a modification time 1 s on."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: _flip_a_byte(p / "model.safetensors"), r"model.safetensors: fails its SHA-256 checksum"),
        (lambda p: _flip_a_byte(p / "optimizer.safetensors"), r"optimizer.safetensors: fails its SHA-256 checksum"),
        (lambda p: os.truncate(p / "model.safetensors", 100), r"model.safetensors: 100 bytes, \d+ expected \(truncated"),
        (lambda p: os.truncate(p / "progress.json", 50), r"progress.json: unreadable \(truncated or corrupted JSON\)"),
        (lambda p: (p / "progress.json").write_text((p / "progress.json").read_text().replace('"step": 3', '"step": 4')),
         r"progress.json: fails its SHA-256 checksum"),
        (lambda p: (p / "model.safetensors").unlink(), r"model.safetensors: missing"),
        (lambda p: (p / "extra.pkl").write_bytes(b"\x80\x04K\x01."),
         r"refused, it holds extra.pkl; a checkpoint holds only model.safetensors, optimizer.safetensors, progress.json"),
        (lambda p: (p / "progress.json").unlink(), r"not a checkpoint \(progress.json is missing\)"),
    ],
    ids=["bit-flip-model", "bit-flip-optimizer", "truncated", "truncated-json", "edited-json", "missing-file",
         "pickle-beside", "no-progress"],
)
def test_damaged_checkpoint_is_refused_and_the_model_is_untouched(saved, damage, message):
    manager, path = saved
    damage(path)
    model, optimizer = _trained("lora", steps=1)
    before, optimizer_before = snapshot(model), optimizer.state_dict()
    with pytest.raises(wb.CheckpointError, match=message):
        manager.load(path, model, optimizer)
    _assert_same_state(snapshot(model), before)
    assert optimizer.state_dict()["state"][0]["exp_avg"].equal(optimizer_before["state"][0]["exp_avg"])


def test_missing_and_non_checkpoint_paths(saved, tmp_path):
    manager, _ = saved
    model = wb.add_adapters(mlp(), "lora", 4)
    with pytest.raises(wb.CheckpointError, match=r"step-00000099: no such checkpoint"):
        manager.load(99, model)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(wb.CheckpointError, match=r"notes.txt: not a checkpoint \(a checkpoint is a directory\)"):
        manager.load(tmp_path / "notes.txt", model)


def test_checkpoint_of_another_variant_rank_or_shape_lists_every_difference(saved):
    manager, path = saved
    other = wb.add_adapters(mlp(), "vera", 8)
    before = snapshot(other)
    with pytest.raises(wb.CheckpointError) as caught:
        manager.load(path, other)
    message = str(caught.value)
    assert "variant: checkpoint 'lora', model 'vera'" in message and "rank: checkpoint 4, model 8" in message
    assert "0.lora_A: in the checkpoint, not in the model" in message
    _assert_same_state(snapshot(other), before)

    wider = wb.add_adapters(nn.Sequential(nn.Linear(12, 30), nn.Tanh(), nn.Linear(30, 16), nn.Tanh(), nn.Linear(16, 6)), "lora", 4)
    with pytest.raises(wb.CheckpointError, match=r"0.lora_B: shape \(24, 4\) in the checkpoint, \(30, 4\) in the model"):
        manager.load(path, wider)


def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path):
    job = _job("disk-full", str(tmp_path))
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    error = json.loads(out)["error"]
    assert error is not None and "step-00000002: could not be written" in error and "File too large" in error
    manager = wb.CheckpointManager(tmp_path)
    assert manager.list()["step"].tolist() == [1]  # keep_last=1 did not prune before the new one was in place
    verify(tmp_path / "step-00000001")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "step-00000001"]  # nothing half-written


# -- atomicity and exact resume, with real SIGKILLs --------------------------------------------


def _wait_for(job: subprocess.Popen, seen: Callable[[], bool], what: str, guard: float = 300.0) -> None:
    """Poll until ``seen()``; fails if the job ends first, or after ``guard`` seconds (a guard, not a schedule)."""
    deadline = time.monotonic() + guard
    while not seen():
        assert job.poll() is None, f"the job ended before {what}: {job.stderr.read()}"
        assert time.monotonic() < deadline, f"no {what} within {guard} s"
        time.sleep(0.002)


def _new_temporary(directory: Path, before: set[str], holding: str | None = None, size: int | None = None
                   ) -> Callable[[], bool]:
    """Whether a save's temporary directory not in ``before`` exists (holding ``holding``, of ``size`` bytes)."""
    def seen() -> bool:
        for name in set(os.listdir(directory)) - before:
            file = directory / name / (holding or "")
            try:
                if name.startswith(".tmp-step-") and file.exists() and (size is None or file.stat().st_size == size):
                    return True
            except OSError:  # renamed into place or removed while we looked
                pass
        return False
    return seen


def _new_checkpoints(directory: Path, before: set[str], count: int) -> Callable[[], bool]:
    """Whether ``count`` checkpoint directories not in ``before`` have appeared since the first call."""
    appeared: set[str] = set()

    def seen() -> bool:
        appeared.update(name for name in os.listdir(directory) if name.startswith("step-") and name not in before)
        return len(appeared) >= count
    return seen


def test_sigkill_at_any_instant_leaves_only_complete_checkpoints(tmp_path):
    """Kill the ``churn`` job at points of its save cycle it is seen to reach, whatever the machine's speed."""
    model_bytes: list[int] = []  # the size of a complete model.safetensors, once one exists
    plans = [  # (what to wait for before, what to kill at), each seen on disk
        ("the first save started", lambda b: [_new_temporary(tmp_path, b)]),
        ("a checkpoint just renamed into place", lambda b: [_new_checkpoints(tmp_path, b, 1)]),
        ("a model file being written", lambda b: [_new_checkpoints(tmp_path, b, 1),
                                                   _new_temporary(tmp_path, b, "model.safetensors")]),
        ("the third new checkpoint, pruning the oldest", lambda b: [_new_checkpoints(tmp_path, b, 3)]),
        ("a model file written whole, being hashed and flushed",
         lambda b: [_new_temporary(tmp_path, b, "model.safetensors", model_bytes[0])]),
    ]
    for what, events in plans:
        before = set(os.listdir(tmp_path))
        job = _job("churn", str(tmp_path))
        for event in events(before):
            _wait_for(job, event, what)
        job.send_signal(signal.SIGKILL)
        job.wait()
        manager = wb.CheckpointManager(tmp_path)
        for path in sorted(tmp_path.glob("step-*")):
            progress = verify(path)  # every checkpoint directory is complete and intact, listed or not
            model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(16)])
            manager.load(path, model)
            assert torch.all(model[0].bias == progress["step"]), what
            model_bytes[:] = [(path / "model.safetensors").stat().st_size]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no checkpoint fails verification, so none is left out
            assert manager.list()["path"].tolist() == [str(p) for p in sorted(tmp_path.glob("step-*"))]
    assert len(wb.CheckpointManager(tmp_path).list()) > 0
    strays = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    writer = wb.CheckpointManager(tmp_path)
    writer.save(10_000, nn.Linear(2, 2), full=True)  # the next writer cleans what a kill left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".deleted-"))]
    writer.close()
    print(f"stray temporary directories cleaned: {len(strays)}")


def _losses(run: Path) -> dict[int, str]:
    lines = (run / "losses.txt").read_text().split()
    return {int(step): loss for step, loss in zip(lines[::2], lines[1::2], strict=True)}  # a re-run step overwrites


def _final_state(run: Path, steps: int) -> tuple[dict, dict]:
    path = run / "checkpoints" / f"step-{steps:08d}"
    return load_file(path / "model.safetensors"), load_file(path / "optimizer.safetensors")


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_resume_after_sigkill_is_bit_exact(tmp_path, async_save, fixed_threads):
    steps, flags = 150, ["--save-every", "10", *(["--async"] if async_save else [])]
    straight = tmp_path / "straight"
    job = _job("train", str(straight), str(steps), *flags)
    assert job.wait(timeout=300) == 0, job.stderr.read()

    broken = tmp_path / "broken"
    job = _job("train", str(broken), str(steps), *flags, "--pause", "0.01")
    while not (broken / "checkpoints" / "step-00000060").exists():  # past the first epoch (57 batches)
        assert job.poll() is None, job.stderr.read()
        time.sleep(0.005)
    job.send_signal(signal.SIGKILL)
    job.wait()
    killed_at = max(_losses(broken))
    assert 60 <= killed_at < steps
    job = _job("train", str(broken), str(steps), *flags)
    assert job.wait(timeout=300) == 0, job.stderr.read()

    assert _losses(broken) == _losses(straight)  # every step's loss, to the last bit of its repr
    for resumed, reference in zip(_final_state(broken, steps), _final_state(straight, steps), strict=True):
        _assert_same_state(resumed, reference)


def _logged(run: Path) -> list[tuple]:
    """The metrics log without its wall-clock times: (step, split, metric, value), values to the last bit."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(e["step"], e["split"], e["metric"], e["value"]) for e in training_log(list(map(json.loads, lines)))]


def test_a_run_with_a_schedule_resumes_bit_exactly_after_sigkill(tmp_path, fixed_threads):
    """wb.Run with warmup, cosine decay and clipping, killed between checkpoints: the resumed run's learning
    rates, losses, validations and final weights are the uninterrupted run's."""
    steps = 120  # 90 paused steps after the checkpoint the kill waits for: time to see it first
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    job = _job("run", str(straight), str(steps))
    assert job.wait(timeout=300) == 0, job.stderr.read()
    job = _job("run", str(broken), str(steps), "--pause", "0.02")
    _wait_for(job, lambda: (broken / "checkpoints" / "step-00000030").exists(), "the step-30 checkpoint")
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert json.loads((broken / "config.json").read_text())["status"] == "running"  # killed mid-run
    job = _job("run", str(broken), str(steps))
    assert job.wait(timeout=300) == 0, job.stderr.read()

    logged = _logged(broken)
    assert {(split, metric) for _, split, metric, _ in logged} >= {("train", "lr"), ("train", "loss"), ("val", "loss")}
    assert logged == _logged(straight)
    for resumed, reference in zip(_final_state(broken, steps), _final_state(straight, steps), strict=True):
        assert resumed.keys() == reference.keys()
        assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_resume_skips_a_corrupted_newest_checkpoint_and_says_so(tmp_path):
    model, optimizer = _trained("lora")
    manager = wb.CheckpointManager(tmp_path)
    manager.save(1, model, optimizer)
    good = snapshot(model)
    _trained_more = model(torch.randn(4, 12)).sum()
    _trained_more.backward()
    optimizer.step()
    manager.save(2, model, optimizer)
    _flip_a_byte(tmp_path / "step-00000002" / "model.safetensors")
    fresh = wb.add_adapters(mlp(), "lora", 4)
    with pytest.warns(UserWarning, match=r"not resuming from step-00000002: .*fails its SHA-256 checksum"):
        progress = manager.resume(fresh, wb.make_optimizer(fresh, lr=1e-2))
    assert progress["step"] == 1
    _assert_same_state(snapshot(fresh), good)


def test_resume_sets_a_corrupted_checkpoint_aside_so_its_step_can_be_saved_again(tmp_path):
    model, optimizer = _trained("lora")
    manager = wb.CheckpointManager(tmp_path)
    states = {}
    for step in (1, 2, 3):
        model(torch.randn(4, 12)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        manager.save(step, model, optimizer)
        states[step] = snapshot(model)
    damaged = tmp_path / "step-00000003"
    _flip_a_byte(damaged / "model.safetensors")
    contents = {file.name: file.read_bytes() for file in damaged.iterdir()}
    fresh = wb.add_adapters(mlp(), "lora", 4)
    with pytest.warns(UserWarning, match=r"not resuming from step-00000003: .*fails its SHA-256 checksum.*"
                                         r"moved it aside to .*/\.corrupt-step-00000003-[0-9a-f]{8} \(kept"):
        progress = manager.resume(fresh, wb.make_optimizer(fresh, lr=1e-2))
    assert progress["step"] == 2
    _assert_same_state(snapshot(fresh), states[2])
    [aside] = tmp_path.glob(".corrupt-step-00000003-*")
    assert {file.name: file.read_bytes() for file in aside.iterdir()} == contents  # kept as it was found
    assert not damaged.exists() and manager.list()["step"].tolist() == [1, 2]

    manager.save(3, model, optimizer)  # the step can be saved again
    assert manager.list()["step"].tolist() == [1, 2, 3]
    manager.close()
    with wb.CheckpointManager(tmp_path) as writer:
        writer.save(4, model, optimizer)  # a new writer's clean-up of strays keeps it too
    assert aside.is_dir()


def _fixed_loaders() -> dict[str, StatefulDataLoader]:
    """Train and val loaders of 32 fixed samples of 12 features, 6 classes, 8 a batch, in order."""
    generator = torch.Generator().manual_seed(4)
    data = TensorDataset(torch.randn(32, 12, generator=generator), torch.randint(0, 6, (32,), generator=generator))
    return {"train": StatefulDataLoader(data, batch_size=8), "val": StatefulDataLoader(data, batch_size=8)}


def _fit(directory: Path, steps: int, resume: bool = False) -> wb.Trainer:
    trainer = wb.Trainer(wb.add_adapters(mlp(), "lora", 4), _fixed_loaders(), steps=steps, save_every=2,
                         eval_every=2, checkpoints=directory, progress_bar=False)
    trainer.fit(resume=resume)
    return trainer


def test_trainer_resumes_past_a_corrupted_newest_checkpoint_and_finishes(tmp_path, fixed_threads):
    straight = _fit(tmp_path / "straight", 6)
    assert straight.status == "finished"
    _fit(tmp_path / "broken", 4)
    _flip_a_byte(tmp_path / "broken" / "step-00000004" / "model.safetensors")
    with pytest.warns(UserWarning, match=r"not resuming from step-00000004: .*moved it aside"):
        resumed = _fit(tmp_path / "broken", 6, resume=True)  # reaches step 4 again, and saves it
    assert resumed.status == "finished"
    assert wb.CheckpointManager(tmp_path / "broken").list()["step"].tolist() == [2, 4, 6]
    for name in ("model.safetensors", "optimizer.safetensors"):  # as if never interrupted
        _assert_same_state(*(load_file(tmp_path / run / "step-00000006" / name) for run in ("broken", "straight")))


# -- listing and choosing show only what loads -------------------------------------------------


def _rewrite_progress(path: Path, change: Callable[[dict], object], checksum: bool = True) -> None:
    """Replace ``path``'s progress.json by ``change(progress)``, with a checksum recomputed as its writer does."""
    data = change(json.loads((path / "progress.json").read_text()))
    if checksum and isinstance(data, dict):
        body = {key: value for key, value in data.items() if key != "checksum"}
        data["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (path / "progress.json").write_text(json.dumps(data))


def _with(key: str, value: object) -> Callable[[dict], dict]:
    return lambda progress: {**progress, key: value}


@pytest.fixture
def two_saved(tmp_path):
    """A manager with checkpoints of steps 1 (val_loss 0.5) and 2 (val_loss 0.2, the best and newest)."""
    model, optimizer = _trained("lora")
    manager = wb.CheckpointManager(tmp_path)
    manager.save(1, model, optimizer, metrics={"val_loss": 0.5})
    manager.save(2, model, optimizer, metrics={"val_loss": 0.2})
    assert manager.best() == manager.latest() == tmp_path / "step-00000002"
    return manager


def _listed_with_one_warning(manager: wb.CheckpointManager, match: str) -> list[int]:
    """The listed steps; the listing warns once with ``match``, and a second listing says nothing new."""
    with pytest.warns(UserWarning, match=match) as caught:
        steps = manager.list()["step"].tolist()
    assert len(caught) == 1, [str(w.message) for w in caught]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert manager.list()["step"].tolist() == steps  # warned once per path and state of its files
    return steps


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: os.truncate(p / "model.safetensors", 100), r"model.safetensors: 100 bytes, \d+ expected"),
        (lambda p: _flip_a_byte(p / "model.safetensors"), r"model.safetensors: fails its SHA-256 checksum"),
        (lambda p: _flip_a_byte(p / "optimizer.safetensors"), r"optimizer.safetensors: fails its SHA-256 checksum"),
    ],
    ids=["truncated", "bit-flip-model", "bit-flip-optimizer"],
)
def test_listing_and_choosing_leave_out_a_damaged_checkpoint(two_saved, damage, message):
    manager = two_saved
    damage(manager.path_for(2))
    assert _listed_with_one_warning(manager, r"step-00000002 is left out .* fails verification: .*" + message) == [1]
    assert manager.best() == manager.latest() == manager.path_for(1)  # what load() accepts
    manager.load(manager.best(), wb.add_adapters(mlp(), "lora", 4))


def test_the_runs_layer_never_chooses_a_damaged_checkpoint(tmp_path):
    run = wb.train("digits", "lora", 2, tmp_path / "run", steps=40, eval_every=20, save_every=20, progress_bar=False)
    table = wb.CheckpointManager(run / "checkpoints").list()
    assert table["step"].tolist() == [20, 40]
    best, other = (Path(p) for p in table.sort_values("val_loss")["path"])  # the lowest loss first
    assert wb.best_checkpoint(run, "val_loss") == best
    _flip_a_byte(best / "model.safetensors")
    with pytest.warns(UserWarning, match=rf"{best.name} is left out .* fails its SHA-256 checksum"):
        assert wb.best_checkpoint(run, "val_loss") == other
    assert wb.load_runs(run).loc[0, "best_checkpoint"] == str(other)
    wb.load_run_model(wb.best_checkpoint(run, "val_loss"))  # what is chosen loads


@pytest.mark.parametrize(
    ("change", "checksum", "message"),
    [
        (lambda p: {}, False, r"malformed, field 'format' is missing"),
        (lambda p: [p], False, r"malformed, a JSON object is expected, not list"),
        (_with("step", "x"), True, r"malformed, field 'step' must be int, not 'x'"),
        (_with("step", True), True, r"malformed, field 'step' must be int, not True"),
        (_with("metrics", 5), True, r"malformed, field 'metrics' must be dict\[str, float or null\], not 5"),
        (_with("metrics", {"val_loss": "low"}), True, r"malformed, field 'metrics' must be dict\[str, float or null\]"),
        (_with("files", []), True, r"malformed, field 'files' must be dict\[str, FileRecord\], not \[\]"),
        (_with("files", {"model.safetensors": {"sha256": 1}}), True,
         r"malformed, field 'files' must be dict\[str, FileRecord\], not \{'model.safetensors'"),
        (_with("stage", 3), True, r"malformed, field 'stage' must be str or null, not 3"),
        (_with("rng", None), True, r"malformed, field 'rng' must be dict\[str, any value\], not None"),
        (_with("checksum", None), False, r"malformed, field 'checksum' must be str, not None"),
        (_with("format", 2), True, r"format 2; this version reads format 1"),
    ],
    ids=["empty-object", "a-list", "step-text", "step-bool", "metrics-number", "metric-text", "files-list",
         "file-record", "stage-number", "rng-null", "checksum-null", "format-2"],
)
def test_a_malformed_progress_file_is_refused_and_skipped_never_raised(two_saved, change, checksum, message):
    manager = two_saved
    path = manager.path_for(2)
    _rewrite_progress(path, change, checksum)
    with pytest.raises(wb.CheckpointError, match=r"step-00000002/progress.json: " + message):
        verify(path)
    assert _listed_with_one_warning(manager, r"step-00000002 is left out .*" + message) == [1]
    assert manager.best() == manager.latest() == manager.path_for(1)
    manager.close()

    with wb.CheckpointManager(manager.directory, keep_last=1) as pruning:
        pruning.save(3, wb.add_adapters(mlp(), "lora", 4))
    assert sorted(p.name for p in manager.directory.glob("step-*")) == ["step-00000002", "step-00000003"]  # kept

    with wb.CheckpointManager(manager.directory) as deleting:
        deleting.delete(3)
    fresh = wb.add_adapters(mlp(), "lora", 4)
    with wb.CheckpointManager(manager.directory) as resuming, \
            pytest.warns(UserWarning, match=r"not resuming from step-00000002: .*" + message):
        assert resuming.resume(fresh) is None  # step 1 was pruned: nothing valid is left
    assert len(list(manager.directory.glob(".corrupt-step-00000002-*"))) == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: _rewrite_progress(p, lambda g: {**g, "files": {**g["files"], "optimizer.safetensors": {
            "sha256": "0" * 64, "bytes": 10}}}), r"step-00000001/optimizer.safetensors: missing"),
        (lambda p: (p / "optimizer.safetensors").write_bytes((p / "model.safetensors").read_bytes()),
         r"holds model.safetensors, optimizer.safetensors beside progress.json, which describes model.safetensors"),
        (lambda p: _rewrite_progress(p, lambda g: {**g, "files": {}}), r"which describes nothing; a checkpoint holds "
         r"model.safetensors and exactly the files its progress.json describes"),
    ],
    ids=["described-but-absent", "present-but-undescribed", "model-undescribed"],
)
def test_verify_requires_exactly_the_files_progress_describes(tmp_path, damage, message):
    manager = wb.CheckpointManager(tmp_path)
    path = manager.save(1, wb.add_adapters(mlp(), "lora", 4))  # no optimizer: model.safetensors alone
    damage(path)
    with pytest.raises(wb.CheckpointError, match=message):
        verify(path)
    assert _listed_with_one_warning(manager, message) == []


def test_only_a_directory_named_for_its_step_is_a_checkpoint(two_saved):
    manager = two_saved
    directory = manager.directory
    os.rename(manager.path_for(2), manager.path_for(3))
    message = r"step-00000003: its progress.json records step 2, so it must be named step-00000002, not step-00000003"
    with pytest.raises(wb.CheckpointError, match=message):
        verify(manager.path_for(3))
    assert _listed_with_one_warning(manager, message) == [1]
    manager.delete(3)

    others = ["step-5", "step-00000005x", "step-000000005", "step-00000001.bak"]
    for name in others:
        shutil.copytree(manager.path_for(1), directory / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not checkpoints: never looked at, so never warned about
        assert manager.list()["step"].tolist() == [1]
    manager.close()
    with wb.CheckpointManager(directory, keep_last=1) as pruning:
        for step in (4, 5):
            pruning.save(step, wb.add_adapters(mlp(), "lora", 4))
        with pytest.raises(wb.CheckpointError, match=r"step-5: not a checkpoint of"):
            pruning.delete(directory / "step-5")
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith("step-")) == sorted([*others, "step-00000005"])


def test_verifications_are_cached_by_each_files_size_and_mtime(tmp_path, monkeypatch):
    hashed: list[str] = []
    real_sha256 = snapshot_module.sha256

    def counting_sha256(path: Path) -> str:
        hashed.append(f"{path.parent.name}/{path.name}")
        return real_sha256(path)

    monkeypatch.setattr(snapshot_module, "sha256", counting_sha256)
    model = wb.add_adapters(mlp(), "lora", 4)
    manager = wb.CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):  # each save prunes, listing the checkpoints
        manager.save(step, model, metrics={"val_loss": 1 / step})
    written = [f".tmp-step-0000000{step}-" for step in (1, 2, 3)]
    assert [name[: len(written[0])] for name in hashed] == written  # each model file hashed once, by its writer
    hashed.clear()
    assert manager.list()["step"].tolist() == [2, 3] and manager.best() == manager.latest() == tmp_path / "step-00000003"
    assert wb.CheckpointManager(tmp_path).list()["step"].tolist() == [2, 3]  # the cache is the process's
    assert hashed == []

    model_file = tmp_path / "step-00000003" / "model.safetensors"
    size, mtime = model_file.stat().st_size, model_file.stat().st_mtime_ns
    _flip_a_byte(model_file)
    assert model_file.stat().st_size == size and model_file.stat().st_mtime_ns != mtime
    assert _listed_with_one_warning(manager, r"step-00000003 .* fails its SHA-256 checksum") == [2]
    assert hashed == ["step-00000003/model.safetensors"]  # only the changed checkpoint is hashed again
    assert manager.best() == manager.latest() == tmp_path / "step-00000002"


def test_keep_best_and_best_take_each_metrics_direction(tmp_path):
    model, _ = _trained("lora", steps=0)
    accuracy = {1: 0.5, 2: 0.9, 3: float("nan"), 4: 0.6, 5: 0.7}
    manager = wb.CheckpointManager(tmp_path, keep_last=1, keep_best=1, monitor="val_acc")  # no mode: "max"
    assert manager.mode == "max"
    for step, acc in accuracy.items():
        manager.save(step, model, metrics={"val_acc": acc, "val_loss": 0.6 - 0.1 * step})
    assert manager.list()["step"].tolist() == [2, 5]  # the highest accuracy and the newest; NaN never ranks
    assert manager.best() == manager.best("val_acc") == tmp_path / "step-00000002"
    assert manager.best("val_loss") == tmp_path / "step-00000005"  # a loss: the lowest of those kept

    losses = wb.CheckpointManager(tmp_path / "losses")
    assert losses.mode == "min"
    for step, acc in accuracy.items():
        losses.save(step, model, metrics={"val_acc": acc, "val_loss": 1 - acc})
    assert losses.best() == losses.best("val_loss") == tmp_path / "losses" / "step-00000002"
    assert losses.best("val_acc") == tmp_path / "losses" / "step-00000002"  # the highest accuracy, not the lowest
    assert losses.best("val_acc", "min") == tmp_path / "losses" / "step-00000001"


# -- retention, listing, locking, async ---------------------------------------------------------


def test_retention_keeps_newest_best_and_staged(tmp_path):
    model, _ = _trained("lora", steps=0)
    manager = wb.CheckpointManager(tmp_path, keep_last=2, keep_best=1, monitor="val_acc", mode="max")
    accuracy = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.8, 6: 0.65}
    stages = {1: "svd-init", 4: "rank-reduced"}
    for step, acc in accuracy.items():
        manager.save(step, model, metrics={"val_acc": acc, "val_loss": 1 - acc}, stage=stages.get(step))
    table = manager.list()
    assert table["step"].tolist() == [1, 2, 4, 5, 6]  # staged 1 and 4, best 2, newest 5 and 6
    assert table.columns.tolist()[:5] == ["step", "path", "stage", "size", "created"]
    assert {"val_acc", "val_loss"} <= set(table.columns) and (table["size"] > 0).all()
    assert manager.best() == tmp_path / "step-00000002"
    assert manager.best("val_loss", "min") == tmp_path / "step-00000002"
    assert manager.best("val_acc", "min") == tmp_path / "step-00000001"
    assert manager.latest() == tmp_path / "step-00000006"
    manager.delete(4)  # explicit deletion removes even a staged checkpoint
    assert manager.list()["step"].tolist() == [1, 2, 5, 6]
    with pytest.raises(wb.CheckpointError, match=r"a checkpoint of step 6 exists already"):
        manager.save(6, model)


def test_a_second_writer_gets_a_clear_error(tmp_path):
    holder = _job("hold-lock", str(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "locked"
        manager = wb.CheckpointManager(tmp_path)
        assert manager.list()["step"].tolist() == [0]  # reading needs no lock
        with pytest.raises(wb.CheckpointError, match=r"another process is writing checkpoints here"):
            manager.save(1, nn.Linear(2, 2), full=True)
    finally:
        holder.kill()
        holder.wait()
    wb.CheckpointManager(tmp_path).save(1, nn.Linear(2, 2), full=True)  # the lock died with its holder


def test_async_save_snapshots_at_call_time_and_raises_errors_at_the_next_call(tmp_path, monkeypatch):
    model, optimizer = _trained("lora")
    expected = snapshot(model)
    manager = wb.CheckpointManager(tmp_path, async_save=True)
    path = manager.save(1, model, optimizer)
    with torch.no_grad():
        model[0].lora_B.add_(1.0)  # training goes on while the write is in flight
    manager.wait()
    fresh = wb.add_adapters(mlp(), "lora", 4)
    manager.load(path, fresh)
    _assert_same_state(snapshot(fresh), expected)

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("workbench.checkpoints.manager.write_directory", fail)
    manager.save(2, model, optimizer)  # returns; the failure happens in the background
    with pytest.raises(wb.CheckpointError, match=r"step-00000002: could not be written .*No space left"):
        manager.save(3, model, optimizer)
    manager.close()
    assert manager.list()["step"].tolist() == [1]


def test_manager_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"keep_last must be None \(keep all\) or an integer >= 1, not 0"):
        wb.CheckpointManager("unused", keep_last=0)
    with pytest.raises(ValueError, match=r"mode must be 'min' \(lower is better\) or 'max' .*, not 'lowest'"):
        wb.CheckpointManager("unused", mode="lowest")
    assert not Path("unused").exists()  # checked before anything is created
    with pytest.raises(ValueError, match=r"mode must be 'min' \(lower is better\) or 'max' .*, not 'best'"):
        wb.CheckpointManager(tmp_path).best("val_acc", "best")


# -- what may not be saved, and where it cannot be ---------------------------------------------


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_saving_a_merged_model_is_refused_and_writes_nothing(tmp_path, async_save):
    model, optimizer = _trained("lora")
    x = torch.randn(5, 12)
    expected = model(x).detach()
    wb.merge_adapters(model)
    manager = wb.CheckpointManager(tmp_path / "run", async_save=async_save)
    with pytest.raises(ValueError, match=r"merged adapters \(layers 0, 2, 4\).*unmerge first: "
                                         r"wb\.unmerge_adapters\(model\)"):
        manager.save(1, model, optimizer)
    manager.wait()
    assert os.listdir(tmp_path / "run") == []  # no checkpoint, no temporary directory, not even the lock

    wb.unmerge_adapters(model)
    manager.save(1, model, optimizer)
    manager.close()
    fresh = wb.add_adapters(mlp(), "lora", 4)
    manager.load(1, fresh)
    torch.testing.assert_close(fresh(x), expected)  # the update applied once, as before merging


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o077, 0o600)], ids=["022", "077"])
def test_checkpoint_files_get_the_permissions_the_umask_allows(tmp_path, umask, expected):
    model, optimizer = _trained("lora")
    previous = os.umask(umask)
    try:
        path = wb.CheckpointManager(tmp_path).save(1, model, optimizer)
    finally:
        os.umask(previous)
    modes = {file.name: stat.S_IMODE(file.stat().st_mode) for file in path.iterdir()}
    assert modes == dict.fromkeys(["model.safetensors", "optimizer.safetensors", "progress.json"], expected)


def test_an_unwritable_directory_gives_a_checkpoint_error_naming_it():
    """Every write into a read-only directory is a ``CheckpointError`` naming it; reading still works.

    The mechanism is real permissions, no monkeypatching: the directories are chmod 0o555 and
    the writer is a subprocess (``checkpoint_jobs.py read-only``). Permission bits do not stop
    root, so when the tests run as root (as here) that job drops to uid and gid 65534 after its
    imports, and the kernel refuses its writes with EACCES. The directories live in a fresh
    world-traversable directory, since pytest's tmp_path (under /tmp/pytest-of-root, 0o700) is
    out of that user's reach. Covered: creating the directory (mkdir), the lock file, the
    temporary directory of a save (the lock file exists and is open to all), and a delete's rename.
    """
    base = Path(tempfile.mkdtemp(prefix="checkpoints-read-only-"))
    previous = os.umask(0o022)  # files anyone may read
    try:
        base.chmod(0o755)
        for name in ("no-lock", "open-lock"):
            with wb.CheckpointManager(base / name) as manager:
                manager.save(1, nn.Linear(2, 2), full=True)
        (base / "no-lock" / ".lock").unlink()
        (base / "open-lock" / ".lock").chmod(0o666)
        before = {name: sorted(os.listdir(base / name)) for name in ("no-lock", "open-lock")}
        for name in ("no-lock", "open-lock"):
            (base / name).chmod(0o555)
        job = _job("read-only", str(base))
        out, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
        outcomes = json.loads(out)
        expected = {"create": base / "no-lock" / "new", "save": base / "no-lock", "save-locked": base / "open-lock",
                    "delete": base / "open-lock"}
        for attempt, directory in expected.items():
            assert outcomes[attempt]["raised"] == "CheckpointError", (attempt, outcomes[attempt])
            assert outcomes[attempt]["message"].startswith(f"{directory}: not writable (Permission denied"), attempt
            assert "give this process write permission there or choose another directory" in outcomes[attempt]["message"]
        assert outcomes["list"] == {"returned": "[1]"}
        assert {name: sorted(os.listdir(base / name)) for name in ("no-lock", "open-lock")} == before
        verify(base / "open-lock" / "step-00000001")
    finally:
        os.umask(previous)
        for directory in base.iterdir():
            directory.chmod(0o755)
        shutil.rmtree(base)
