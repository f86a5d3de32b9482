"""Checkpoints of a model with modules trained in full (``add_adapters(..., train=[...])``)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import workbench as wb
from workbench.checkpoints import snapshot as snapshot_module

IDS = torch.randint(0, 50, (4, 10), generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1, 2, 1])


def adapted(seed: int = 0) -> nn.Module:
    """BERT with a new 3-way head, lora on query and value, the head trained in full; built from ``seed``."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config).eval()
    return wb.add_adapters(model, "lora", 4, targets=["query", "value"], train=["classifier"])


def trained() -> nn.Module:
    model = adapted()
    optimizer = wb.make_optimizer(model, lr=0.05)
    for _ in range(3):
        model(IDS, labels=LABELS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def _assert_loaded(fresh: nn.Module, model: nn.Module) -> None:
    """``fresh`` holds the trained head and computes what ``model`` does, bit for bit (the same computation)."""
    for name, param in model.classifier.named_parameters():
        assert torch.equal(fresh.classifier.get_parameter(name), param), name
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)


def test_a_checkpoint_holds_the_trained_head_and_loads_into_a_model_adapted_the_same_way(tmp_path, fixed_threads):
    model = trained()
    path = wb.CheckpointManager(tmp_path).save(3, model)
    saved = load_file(path / "model.safetensors")
    assert {"classifier.weight", "classifier.bias"} <= saved.keys()
    assert json.loads((path / "progress.json").read_text())["adapter"]["train"] == ["classifier"]

    fresh = adapted()
    assert not torch.equal(fresh.classifier.weight, model.classifier.weight)  # the head starts where it started
    wb.CheckpointManager(tmp_path).load(3, fresh)
    _assert_loaded(fresh, model)


def test_a_checkpoint_written_before_train_existed_loads_as_training_no_module_in_full(tmp_path):
    """A progress.json whose adapter record has no ``train`` key, as every checkpoint written before it has,
    was written by a model that trained no module in full: it loads into such a model, and a model built
    with ``train=`` refuses it, naming the difference (as it refuses a checkpoint of another rank)."""
    torch.manual_seed(0)
    plain = wb.add_adapters(BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3)), "lora", 4, targets=["query", "value"])
    snapshot = snapshot_module.capture(3, plain)
    del snapshot.progress["adapter"]["train"]
    path = tmp_path / snapshot_module.checkpoint_name(3)
    path.mkdir()
    snapshot.write(path)
    assert "train" not in json.loads((path / "progress.json").read_text())["adapter"]

    wb.CheckpointManager(tmp_path).load(path, wb.add_adapters(BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=3)), "lora", 4, targets=["query", "value"]))
    with pytest.raises(wb.CheckpointError, match=r"train: checkpoint \[\], model \['classifier'\]"):
        wb.CheckpointManager(tmp_path).load(path, adapted())


@pytest.mark.parametrize("train", [(), ("classifier",)], ids=["without-train", "with-train"])
def test_the_head_is_saved_only_when_it_trains(train, tmp_path):
    """Without train= the head is frozen, and a checkpoint holds only the adapters, as before."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        num_labels=3)
    model = wb.add_adapters(BertForSequenceClassification(config), "lora", 4, targets=["query"], train=list(train))
    path = wb.CheckpointManager(tmp_path).save(0, model)
    assert wb.adapter_config(model).train == train
    assert ("classifier.weight" in load_file(path / "model.safetensors")) == bool(train)
