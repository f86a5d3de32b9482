"""Checkpoints: contents, atomicity under SIGKILL, exact resume, retention, locking, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import mlp, snapshot
from safetensors.torch import load_file
from torch import nn

import workbench as wb
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


def test_full_checkpoint_restores_every_tensor_of_a_tied_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=8)
    model = GPT2LMHeadModel(config)
    path = wb.CheckpointManager(tmp_path).save(0, model, full=True)
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
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


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


def test_sigkill_at_any_instant_leaves_only_complete_checkpoints(tmp_path):
    deadlines = [0.9, 1.3, 1.7, 2.2, 2.6]  # seconds after start, spread over saves in progress
    for deadline in deadlines:
        job = _job("churn", str(tmp_path))
        time.sleep(deadline)
        job.send_signal(signal.SIGKILL)
        job.wait()
        manager = wb.CheckpointManager(tmp_path)
        listed = manager.list()
        for path in listed["path"]:
            progress = verify(Path(path))  # every listed checkpoint is complete and intact
            model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(16)])
            manager.load(path, model)
            assert torch.all(model[0].bias == progress["step"])
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
def test_resume_after_sigkill_is_bit_exact(tmp_path, async_save):
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


def test_manager_arguments_are_checked():
    with pytest.raises(ValueError, match=r"keep_last must be None \(keep all\) or an integer >= 1, not 0"):
        wb.CheckpointManager("unused", keep_last=0)
    with pytest.raises(ValueError, match=r"mode must be 'min' or 'max', not 'lowest'"):
        wb.CheckpointManager("unused", mode="lowest")
