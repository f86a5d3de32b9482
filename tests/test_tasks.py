"""Built-in tasks and the base-model cache, checked against independent numbers."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from torch import nn

import workbench as wb
from workbench.tasks import SPLITS, Task, get_task
from workbench.tasks.base import IGNORE_INDEX, group_by_length
from workbench.tasks.cache import cache_path, cached_model, save_tensors

digits_module = importlib.import_module("workbench.tasks.digits")  # the package's `digits` is the function
sequence_module = importlib.import_module("workbench.tasks.sequence")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _refuse(model: nn.Module) -> None:
    raise AssertionError("pre-trained although a valid cache file exists")


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of positions where argmax(model(x)) == y, positions with y == -100 left out."""
    predicted, counted = model(x).argmax(-1), y != -100
    return ((predicted == y) & counted).sum().item() / counted.sum().item()


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = zip(*dataset, strict=True)
    return torch.stack(x), torch.stack(y)


# -- digits ------------------------------------------------------------------------------------

NUMPY_SHIFTS = {  # each shift again, in numpy on the (N, 8, 8) pixels 0..16
    "mirror": lambda images: images[:, :, ::-1] / 16,
    "rotate": lambda images: np.rot90(images, 1, axes=(1, 2)) / 16,
    "invert": lambda images: (16 - images) / 16,
}


def test_digits_splits_are_disjoint_cover_the_data_and_follow_the_seed():
    pretraining, adaptation = digits_module.pools()
    splits = digits_module.split_indices(0)
    assert [len(splits[s]) for s in SPLITS] == [718, 239, 240]  # 60/20/20 of 1,797 - 600
    every = torch.cat([pretraining, *splits.values()])
    assert torch.equal(every.sort().values, torch.arange(1797))  # disjoint and complete
    assert torch.equal(torch.cat(list(splits.values())).sort().values, adaptation.sort().values)
    assert all(torch.equal(splits[s], digits_module.split_indices(0)[s]) for s in SPLITS)
    other = digits_module.split_indices(1)
    assert not torch.equal(splits["train"], other["train"])
    assert torch.equal(torch.cat(list(other.values())).sort().values, adaptation.sort().values)


@pytest.mark.parametrize("shift", ["mirror", "rotate", "invert"])
def test_digits_items_are_the_shifted_images(shift):
    data = load_digits()
    task = get_task("digits" if shift == "mirror" else f"digits-{shift}")
    datasets = task.datasets(3)
    for split, index in digits_module.split_indices(3).items():
        x, y = _stack(datasets[split])
        expected = NUMPY_SHIFTS[shift](data.images[index.numpy()]).reshape(-1, 64)
        assert x.dtype == torch.float32 and x.shape == (len(index), 64) and y.dtype == torch.int64
        assert np.allclose(x.numpy(), expected) and np.array_equal(y.numpy(), data.target[index.numpy()])


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown shift 'flip'; valid shifts: mirror, rotate, invert"):
        wb.tasks.digits("flip")
    with pytest.raises(ValueError, match="unknown task 'x'; valid tasks: digits, digits-rotate, digits-invert, sequence"):
        get_task("x")


@pytest.mark.parametrize(("shift", "at_most"), [("mirror", 0.6), ("rotate", 0.3), ("invert", 0.1)])
def test_digits_base_is_good_on_original_images_and_much_worse_on_shifted_ones(shift, at_most):
    data = load_digits()
    index = digits_module.split_indices(0)["val"].numpy()
    original = torch.tensor(data.data[index] / 16, dtype=torch.float32), torch.tensor(data.target[index])
    task = wb.tasks.digits(shift)
    base = task.base_model()
    on_original, on_shifted = _accuracy(base, *original), _accuracy(base, *_stack(task.datasets(0)["val"]))
    assert on_original > 0.9
    assert on_shifted < at_most and on_shifted < on_original - 0.3


# -- the cache ---------------------------------------------------------------------------------

def _digits_base(pretrain=digits_module.pretrain_mlp, version: int = digits_module.VERSION) -> nn.Module:
    return cached_model("digits-mlp", version, digits_module.build_mlp, pretrain)


def test_second_call_loads_the_file_without_pretraining_and_versions_are_separate(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    first = _digits_base()
    version = digits_module.VERSION
    assert [p.name for p in tmp_path.iterdir()] == [f"digits-mlp-v{version}.safetensors"]  # no temporary file left
    assert _equal(_digits_base(_refuse), first)
    with pytest.raises(AssertionError, match="pre-trained although"):
        _digits_base(_refuse, version=version + 1)  # another version never reads this one's file


def test_pretraining_gives_the_same_bits_whatever_the_callers_thread_count(tmp_path, monkeypatch):
    """Pre-training pins its own thread count, so a cache built under 1 or 2 threads is the same file."""
    threads = torch.get_num_threads()
    bases = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / str(count)))
            bases.append(_digits_base())
            assert torch.get_num_threads() == count  # given back as it was
    finally:
        torch.set_num_threads(threads)
    assert _equal(*bases)


def test_the_cached_model_equals_a_fresh_pretraining_bitwise(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "a"))
    first = _digits_base()
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "b"))
    torch.manual_seed(123)  # the caller's RNG does not matter
    again = _digits_base()
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "a"))
    loaded = _digits_base(_refuse)
    assert _equal(first, again) and _equal(first, loaded)
    assert not _equal(first, digits_module.build_mlp())  # it was trained


def test_building_a_base_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    torch.manual_seed(7)
    state = torch.get_rng_state()
    _digits_base()  # pre-trains
    assert torch.equal(torch.get_rng_state(), state)
    _digits_base()  # loads
    wb.tasks.sequence().base_model()
    assert torch.equal(torch.get_rng_state(), state)


def _truncate(path, state):
    path.write_bytes(path.read_bytes()[:-100])


def _flip_a_tensor_byte(path, state):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's data: the header still parses
    path.write_bytes(bytes(data))
    assert load_file(path).keys() == state.keys()  # readable, so only the hash can tell


def _garbage(path, state):
    path.write_bytes(b"not a safetensors file")


def _missing_key(path, state):
    save_tensors(path, {k: v for k, v in state.items() if k != "head.bias"})


def _extra_key(path, state):
    save_tensors(path, {**state, "extra": torch.zeros(3)})


def _wrong_shape(path, state):
    save_tensors(path, {**state, "head.bias": torch.zeros(11)})


@pytest.mark.parametrize(("corrupt", "reason"), [
    (_truncate, "unreadable"), (_flip_a_tensor_byte, "SHA-256"), (_garbage, "unreadable"),
    (_missing_key, r"missing tensors \['head.bias'\]"), (_extra_key, r"unexpected tensors \['extra'\]"),
    (_wrong_shape, r"'head.bias' is torch.float32 \(11,\), expected torch.float32 \(10,\)"),
])
def test_an_invalid_cache_file_is_detected_and_rebuilt(tmp_path, monkeypatch, corrupt, reason):
    reference = _digits_base()  # from the shared cache
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    path = cache_path("digits-mlp", digits_module.VERSION)
    save_tensors(path, reference.state_dict())
    corrupt(path, reference.state_dict())
    with pytest.warns(UserWarning, match=f"is invalid .*{reason}"):
        rebuilt = _digits_base()
    assert _equal(rebuilt, reference)
    assert _equal(_digits_base(_refuse), reference)  # the file is good again


def test_an_unwritable_cache_warns_and_still_returns_the_model(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file where the cache directory should be")
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "file"))
    with pytest.warns(UserWarning, match="could not write cache file"):
        model = _digits_base()
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    assert _equal(model, _digits_base())


# -- sequence ----------------------------------------------------------------------------------

def test_sequence_model_has_llama_names_and_takes_lora():
    model = wb.tasks.sequence().base_model()
    linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert linear == {"lm_head"} | {f"layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}"
                                    for i in range(2) for p in projections}
    tokens = torch.randint(17, (5, 16))
    before = model(tokens)
    assert before.shape == (5, 16, 17)
    wb.add_adapters(model, "lora", 4, targets=["q_proj", "v_proj"])
    assert wb.adapter_config(model).targets == tuple(f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert torch.equal(model(tokens), before)  # B = 0 at initialisation


def test_sequence_data_are_reversals_in_disjoint_splits_from_the_seed():
    datasets = wb.tasks.sequence().datasets(0)
    rows = {}
    for split in SPLITS:
        inputs, targets = _stack(datasets[split])
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == targets.shape == (len(inputs), 16)
        assert torch.equal(inputs[:, 8], torch.full((len(inputs),), 16))  # the separator
        assert (targets[:, :8] == IGNORE_INDEX).all()
        assert torch.equal(targets[:, 8:], inputs[:, :8].flip(-1))  # the answer is the source reversed
        assert torch.equal(inputs[:, 9:], targets[:, 8:15])  # inputs are the targets shifted by one
        rows[split] = {tuple(row) for row in inputs[:, :8].tolist()}
        assert len(rows[split]) == len(inputs)
    assert [len(rows[s]) for s in SPLITS] == [2400, 800, 800]
    assert not (rows["train"] & rows["val"] or rows["train"] & rows["test"] or rows["val"] & rows["test"])
    again, other = wb.tasks.sequence().datasets(0), wb.tasks.sequence().datasets(1)
    assert torch.equal(_stack(again["val"])[0], _stack(datasets["val"])[0])
    assert not torch.equal(_stack(other["val"])[0], _stack(datasets["val"])[0])


def test_sequence_base_copies_but_cannot_reverse():
    task = wb.tasks.sequence()
    inputs, targets = _stack(task.datasets(0)["val"])
    sources = inputs[:, :8]
    copy_inputs = torch.cat([sources, torch.full((len(sources), 1), 16), sources[:, :7]], dim=1)
    copy_targets = torch.cat([torch.full((len(sources), 8), -100), sources], dim=1)
    base = task.base_model()
    assert _accuracy(base, copy_inputs, copy_targets) > 0.95
    assert _accuracy(base, inputs, targets) < 0.15  # chance is 1/16


# -- adaptation --------------------------------------------------------------------------------

def _val_accuracy(model: nn.Module, task: Task) -> float:
    correct = counted = 0
    model.eval()
    with torch.no_grad():
        for inputs, targets in task.loaders(0)["val"]:
            c, n = task.counts(model(inputs), targets)
            correct, counted = correct + c, counted + n
    return correct / counted


@pytest.mark.parametrize(("name", "targets", "steps", "at_least"), [
    ("digits", None, 200, 0.85),
    ("sequence", ["q_proj", "v_proj"], 300, 0.9),
])
def test_a_short_lora_adaptation_recovers_most_of_the_accuracy(name, targets, steps, at_least):
    task = get_task(name)
    model = wb.add_adapters(task.base_model(), "lora", 4, targets=targets)
    before = _val_accuracy(model, task)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader, step = task.loaders(0)["train"], 0
    model.train()
    while step < steps:
        for inputs, targets_ in loader:
            loss = task.loss(model(inputs), targets_)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    after = _val_accuracy(model, task)
    assert after > at_least and after > before + 0.4


def _padded(order: list[int], lengths: list[int], batch_size: int) -> int:
    """Tokens computed when ``order`` is batched by ``batch_size`` and each batch padded to its longest item."""
    return sum(max(lengths[i] for i in order[k:k + batch_size]) * len(order[k:k + batch_size])
               for k in range(0, len(order), batch_size))


@pytest.mark.parametrize("size", [1000, 1003])  # batches that fill the data, and a last batch of 11
def test_grouping_by_length_batches_each_group_sorted_in_a_random_order_of_batches(size):
    lengths = torch.randint(1, 73, (size,), generator=torch.Generator().manual_seed(0)).tolist()
    order = torch.randperm(size, generator=torch.Generator().manual_seed(1)).tolist()
    batch, group = 16, 5
    grouped = group_by_length(order, lengths, batch, group, torch.Generator().manual_seed(2))
    assert sorted(grouped) == list(range(size))
    # the batches are those of each group of 80 items of ``order``, stable-sorted by length
    expected = []
    for start in range(0, size, batch * group):
        part = sorted(order[start:start + batch * group], key=lambda i: (lengths[i], order.index(i)))
        expected += [part[k:k + batch] for k in range(0, len(part), batch)]
    got = [grouped[k:k + batch] for k in range(0, size, batch)]
    assert sorted(map(tuple, got)) == sorted(map(tuple, expected))
    assert got[-1] == expected[-1] or size % batch == 0  # a partial batch stays last
    groups = [order.index(b[0]) // (batch * group) for b in got[:10]]
    assert len(set(groups)) > 1  # the batches are shuffled across groups, not taken group after group
    assert grouped == group_by_length(order, lengths, batch, group, torch.Generator().manual_seed(2))
    # a group's sorted batches each pad by at most (its longest - its shortest) per item, and these
    # spans add up to at most the group's range: at most 71 x 16 tokens of padding per group
    groups_count = -(-size // (batch * group))
    tight = _padded(grouped, lengths, batch)
    assert tight <= sum(lengths) + groups_count * (max(lengths) - min(lengths)) * batch
    assert tight < 0.75 * _padded(order, lengths, batch)
