"""Parity with peft's own LoRA, DoRA and VeRA layers, and the adapter format both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
)

import workbench as wb


def plain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 8))


def bert() -> nn.Module:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    return GPT2Model(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2))


IDS = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
X = torch.randn(6, 12, generator=torch.Generator().manual_seed(0))
MODELS = {  # builder, targets, input, output reader
    "plain": (plain, ["0", "2"], X, lambda out: out),
    "bert": (bert, ["query", "value"], IDS, lambda out: out.last_hidden_state),
    "gpt2": (gpt2, ["c_attn", "c_proj"], IDS, lambda out: out.last_hidden_state),
    "llama": (llama, ["q_proj", "v_proj"], IDS, lambda out: out.last_hidden_state),
}


def _peft_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft's adapted layers by the name the base model gives them."""
    prefix = "base_model.model."
    return {name[len(prefix):]: m for name, m in model.named_modules()
            if name.startswith(prefix) and (hasattr(m, "lora_A") or hasattr(m, "vera_lambda_b")) and hasattr(m, "base_layer")}


def _randomise_both(ours: nn.Module, theirs: nn.Module, variant: str) -> None:
    """The same non-zero adapter values in both (B and lambda_b start at zero)."""
    generator = torch.Generator().manual_seed(5)
    peft_layers = _peft_layers(theirs)
    layers = dict(wb.adapter_layers(ours))
    assert layers.keys() == peft_layers.keys()
    with torch.no_grad():
        for name, layer in layers.items():
            other = peft_layers[name]
            if variant in ("lora", "dora"):
                for mine, peft_param in ((layer.lora_A, other.lora_A["default"].weight),
                                         (layer.lora_B, other.lora_B["default"].weight)):
                    value = torch.randn(mine.shape, generator=generator) * 0.2
                    mine.copy_(value)
                    peft_param.copy_(value)
                if variant == "dora":  # both start at ||W||_c; moved, so that m / ||W + s B A||_c is not 1
                    magnitude = other.lora_magnitude_vector["default"].weight
                    # peft sums the squares of Conv1D's stored (in, out) weight in another order: float32 rounding
                    torch.testing.assert_close(layer.lora_magnitude_vector, magnitude, rtol=1e-6, atol=0)
                    value = magnitude * (1 + 0.3 * torch.randn(magnitude.shape, generator=generator))
                    layer.lora_magnitude_vector.copy_(value)
                    magnitude.copy_(value)
            else:
                for mine, peft_param in ((layer.vera_lambda_b, other.vera_lambda_b["default"]),
                                         (layer.vera_lambda_d, other.vera_lambda_d["default"])):
                    value = torch.randn(mine.shape, generator=generator)
                    mine.copy_(value)
                    peft_param.copy_(value)


CASES = [(m, "lora", {}) for m in MODELS] + [
    ("plain", "lora", {"rslora": True}), ("bert", "lora", {"alpha": 24}), *((m, "vera", {}) for m in MODELS),
    *((m, "dora", {}) for m in MODELS), ("bert", "dora", {"rslora": True, "alpha": 24}),
]


@pytest.mark.parametrize(("layout", "variant", "extra"), CASES, ids=[f"{m}-{v}-{e}" for m, v, e in CASES])
def test_outputs_and_gradients_equal_peft(layout, variant, extra):
    build, targets, inputs, read = MODELS[layout]
    ours = build().eval()
    if variant in ("lora", "dora"):
        alpha = extra.get("alpha", 8)
        wb.add_adapters(ours, variant, 4, alpha=alpha, targets=targets, rslora=extra.get("rslora", False))
        config = LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, use_rslora=extra.get("rslora", False),
                            use_dora=variant == "dora")
    else:
        wb.add_adapters(ours, "vera", 4, targets=targets, projection_seed=3)
        config = VeraConfig(r=4, target_modules=targets, projection_prng_key=3)
    theirs = get_peft_model(build().eval(), config)
    if variant == "vera":  # the shared projections are regenerated from the same seed, not copied
        first = next(layer for _, layer in wb.adapter_layers(ours))
        torch.testing.assert_close(first.vera_A, theirs.base_model.vera_A["default"], rtol=0, atol=0)
        torch.testing.assert_close(first.vera_B, theirs.base_model.vera_B["default"], rtol=0, atol=0)
    _randomise_both(ours, theirs, variant)

    out_ours, out_theirs = read(ours(inputs)), read(theirs(inputs))
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-6)
    # a fixed random weighting of the outputs: the sum of squares of a LayerNorm'd output (BERT's
    # last_hidden_state) is nearly constant, its gradients float32 noise
    weights = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(1))
    (out_ours * weights).sum().backward()
    (out_theirs * weights).sum().backward()
    peft_layers = _peft_layers(theirs)
    for name, layer in wb.adapter_layers(ours):
        for attribute, param in layer.adapter_params().items():
            if variant in ("lora", "dora"):  # peft's lora_A, lora_B and lora_magnitude_vector are modules
                peft_param = getattr(peft_layers[name], attribute)["default"].weight
            else:
                peft_param = getattr(peft_layers[name], attribute)["default"]
            torch.testing.assert_close(param.grad, peft_param.grad, rtol=1e-4, atol=1e-6)


def _train_a_little(model: nn.Module, inputs, read) -> None:
    optimizer = wb.make_optimizer(model, lr=0.05)
    for _ in range(3):
        read(model(inputs)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


EXPORTS = [(v, "plain") for v in wb.VARIANTS] + [("lora", "gpt2"), ("vera", "gpt2"), ("lora-plus", "llama"),
                                                 ("vera", "bert"), ("dora", "gpt2"), ("dora", "llama")]


@pytest.mark.parametrize(("variant", "layout"), EXPORTS, ids=[f"{v}-{m}" for v, m in EXPORTS])
def test_export_loads_in_peft_with_the_same_outputs(variant, layout, tmp_path):
    build, targets, inputs, read = MODELS[layout]
    model = wb.add_adapters(build().eval(), variant, 4, targets=targets)
    _train_a_little(model, inputs, read)
    model.eval()
    expected = read(model(inputs))
    if wb.get_variant(variant).moves_base_weights:  # delta-lora
        with pytest.warns(UserWarning, match=rf"variant '{variant}', which also moved the base weights"):
            wb.export_peft(model, tmp_path)
        assert "moved the base weights" in (tmp_path / "README.md").read_text()
        base = copy.deepcopy(model)
        wb.remove_adapters(base)  # the moved base weights, without the adapter: what peft must be given
    else:
        wb.export_peft(model, tmp_path)
        base = build().eval()
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(read(loaded(inputs)), expected, rtol=1e-5, atol=1e-6)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == ("VERA" if variant == "vera" else "LORA")
    assert written.get("use_dora", False) == (variant == "dora")


@pytest.mark.parametrize("variant", ["lora", "vera", "dora"])
@pytest.mark.parametrize("layout", ["plain", "gpt2"])
def test_import_of_a_peft_adapter_gives_peft_outputs(variant, layout, tmp_path):
    build, targets, inputs, read = MODELS[layout]
    config = (VeraConfig(r=4, target_modules=targets, projection_prng_key=7) if variant == "vera" else
              LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False,
                         use_dora=variant == "dora"))
    peft_model = get_peft_model(build().eval(), config)
    if variant == "vera":
        with torch.no_grad():
            for layer in _peft_layers(peft_model).values():
                layer.vera_lambda_b["default"].normal_()
    peft_model.save_pretrained(tmp_path)
    expected = read(peft_model(inputs))
    model = wb.import_peft(build().eval(), tmp_path)
    assert wb.adapter_config(model).variant == variant
    torch.testing.assert_close(read(model(inputs)), expected, rtol=1e-5, atol=1e-6)


def _peft_lora_dir(tmp_path):
    peft_model = get_peft_model(plain(), LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _replace_weights(path, transform):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "adapter_model.safetensors")
    save_file(transform(tensors), path / "adapter_model.safetensors")


REFUSALS = [
    (lambda p: (p / "adapter_config.json").unlink(), r"not a peft adapter directory: adapter_config.json is missing"),
    (lambda p: ((p / "adapter_model.safetensors").rename(p / "adapter_model.bin")),
     r"only adapter_model.bin, a pickle, which is never loaded"),
    (lambda p: _edit_config(p, peft_type="IA3"), r"peft_type 'IA3' .* is not supported; valid: LORA, VERA"),
    (lambda p: _edit_config(p, use_dora=True), r"the adapter file lacks 'lora_magnitude_vector' of module '0'"),
    (lambda p: _edit_config(p, lora_bias=True), r"lora_bias=True is not supported"),
    (lambda p: _replace_weights(p, lambda t: {k: torch.zeros(v.shape[0], v.shape[1] + 1) for k, v in t.items()}),
     r"has shape .* but the model's '0' needs"),
    (lambda p: _replace_weights(p, lambda t: {k.replace("model.2.", "model.9."): v for k, v in t.items()}),
     r"adapts '9', which the model has no linear layer for"),
    (lambda p: _edit_config(p, lora_alpha=None), r"lora_alpha is missing; peft writes it for a LORA adapter"),
    (lambda p: _edit_config(p, r="8"), r"r='8' is not a finite number"),
    (lambda p: _edit_config(p, use_rslora="yes"), r"use_rslora='yes' is not a boolean"),
    (lambda p: (p / "adapter_config.json").write_text('{"peft_type": "LO'), r"adapter_config.json: not readable as JSON"),
    (lambda p: _truncate(p / "adapter_model.safetensors"), r"adapter_model.safetensors: not a readable safetensors file"),
    (lambda p: _edit_config(p, modules_to_save=["4"]),
     r"the adapter file lacks 'weight' of module '4', which its modules_to_save names"),
    (lambda p: _edit_config(p, modules_to_save="4"), r"modules_to_save='4' is not a list of module names"),
    (lambda p: _with_saved_head(p, weight=torch.zeros(8, 23)),
     r"weight of '4' \(modules_to_save\) has shape \(8, 23\) but the model's '4' needs \(8, 24\)"),
    (lambda p: _with_saved_head(p, extra=torch.zeros(1)),
     r"unexpected tensor 'base_model.model.4.extra' in the adapter file: module '4' \(modules_to_save\) has no "
     r"tensor 'extra'; it has weight, bias"),
]


def _with_saved_head(path, **tensors) -> None:
    """Module '4' (24 -> 8) in modules_to_save, saved as peft saves it, with ``tensors`` replacing or added to its own."""
    _edit_config(path, modules_to_save=["4"])
    head = {"weight": torch.zeros(8, 24), "bias": torch.zeros(8), **tensors}
    _replace_weights(path, lambda t: {**t, **{f"base_model.model.4.{key}": value for key, value in head.items()}})


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(("damage", "message"), REFUSALS,
                         ids=["no-config", "pickle-only", "other-type", "dora-without-magnitude", "lora-bias", "bad-shape", "unknown-module",
                              "no-alpha", "text-rank", "text-flag", "cut-config", "cut-weights", "saved-module-missing",
                              "saved-not-a-list", "saved-bad-shape", "saved-stray-tensor"])
def test_import_refusals_leave_the_model_unchanged(damage, message, tmp_path):
    damage(_peft_lora_dir(tmp_path))
    model = plain()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        wb.import_peft(model, tmp_path)
    assert not list(wb.adapter_layers(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_import_onto_an_adapted_model_is_refused(tmp_path):
    model = wb.add_adapters(plain(), "lora", 2)
    with pytest.raises(ValueError, match=r"already has adapters"):
        wb.import_peft(model, _peft_lora_dir(tmp_path))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exported_files_have_the_permissions_the_umask_gives(tmp_path, umask):
    import os
    import stat

    model = wb.add_adapters(plain(), "lora", 2)
    before = os.umask(umask)
    try:
        wb.export_peft(model, tmp_path / "adapter")
    finally:
        os.umask(before)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "adapter").iterdir()}
    assert modes == dict.fromkeys(["README.md", "adapter_config.json", "adapter_model.safetensors"], 0o666 & ~umask)


# -- modules trained in full: peft's modules_to_save ---------------------------------------------------


def bert_classifier() -> nn.Module:
    """BERT with a new 3-way head ``classifier``, no dropout."""
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


def gpt2_lm() -> nn.Module:
    """GPT-2 with its head, whose weight is the embedding's (tie_word_embeddings)."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


LABELS = torch.tensor([0, 2])
SAVED = {  # builder, targets, train, the loss of a batch
    "bert-classifier": (bert_classifier, ["query", "value"], ["classifier"], lambda m: m(IDS, labels=LABELS).loss),
    # both ends of the tie trained: one shared weight, which peft saves (and loads) under both names
    "gpt2-tied-head": (gpt2_lm, ["c_attn"], ["lm_head", "transformer.wte"], lambda m: m(IDS, labels=IDS).loss),
}


@pytest.mark.parametrize("case", SAVED)
def test_export_with_modules_to_save_loads_in_peft_with_the_same_logits(case, tmp_path):
    build, targets, train, loss = SAVED[case]
    model = wb.add_adapters(build(), "lora", 4, targets=targets, train=train)
    trained = wb.adapter_config(model).train
    optimizer = wb.make_optimizer(model, lr=0.05)
    for _ in range(3):
        loss(model).backward()
        optimizer.step()
        optimizer.zero_grad()
    expected = model(IDS).logits
    wb.export_peft(model, tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == list(trained)
    saved = {key for key in load_file(tmp_path / "adapter_model.safetensors") if "lora_" not in key}
    assert saved == {f"base_model.model.{name}.{key}" for name in trained for key in model.get_submodule(name).state_dict()}
    loaded = PeftModel.from_pretrained(build(), tmp_path).eval()
    for name in trained:  # peft's trained copy holds the exported values
        wrapper = loaded.base_model.model.get_submodule(name)
        for key, value in wrapper.modules_to_save["default"].state_dict().items():
            assert torch.equal(value, model.get_submodule(name).state_dict()[key]), f"{name}.{key}"
    # the same float32 math, summed in another order by peft's layers: rounding only
    torch.testing.assert_close(loaded(IDS).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_import_of_a_peft_adapter_with_modules_to_save_gives_peft_logits(task_type, tmp_path):
    """peft's sequence-classification task saves ["classifier", "score"]: 'score' is no module of BERT, skipped as peft does."""
    modules_to_save = ["classifier"] if task_type is None else None
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=modules_to_save,
                        task_type=task_type, init_lora_weights=False)
    peft_model = get_peft_model(bert_classifier(), config).eval()
    with torch.no_grad():  # a trained head, not the base model's
        for param in peft_model.base_model.model.classifier.modules_to_save["default"].parameters():
            param.normal_(generator=torch.Generator().manual_seed(2))
    peft_model.save_pretrained(tmp_path)
    assert "classifier" in json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    expected = peft_model(IDS).logits

    model = wb.import_peft(bert_classifier(), tmp_path)
    assert wb.adapter_config(model).train == ("classifier",)
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
    torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-6)


class TwoHeads(nn.Module):
    """'head' and 'aux_head': peft's modules_to_save=["head"] selects both (str.endswith), train="head" one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.aux_head = nn.Linear(6, 6), nn.Linear(6, 2), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)) + self.aux_head(x)


def test_export_refuses_a_trained_module_whose_name_peft_would_also_match_elsewhere(tmp_path):
    model = wb.add_adapters(TwoHeads(), "lora", 2, targets="body", train="head")
    assert wb.adapter_config(model).train == ("head",)
    with pytest.raises(ValueError, match=r"cannot export 'head' as peft's modules_to_save: .* also train 'aux_head'"):
        wb.export_peft(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    wb.remove_adapters(model)
    both = wb.add_adapters(model, "lora", 2, targets="body", train=["head", "aux_head"])
    with torch.no_grad():  # trained heads
        both.head.weight.add_(1.0)
        both.aux_head.bias.sub_(1.0)
    wb.export_peft(both, tmp_path / "adapter")  # peft's selection is now ours
    x = torch.randn(3, 6)
    loaded = PeftModel.from_pretrained(TwoHeads(), tmp_path / "adapter")
    torch.testing.assert_close(loaded(x), both(x), rtol=1e-5, atol=1e-6)
