"""add_adapters on plain and transformers models, merging, removal, counts and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import mlp, snapshot
from peft import LoraConfig, get_peft_model
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
    RobertaConfig,
    RobertaModel,
)
from transformers.pytorch_utils import Conv1D

import workbench as wb


def bert() -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return BertModel(config).eval()


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    return GPT2Model(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16)).eval()


def llama() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaModel(config).eval()


LAYOUTS = {  # model, targets, the number of layers they select
    "bert": (bert, ["query", "value"], 4),
    "gpt2": (gpt2, ["c_attn", "c_proj"], 6),  # attn.c_attn, attn.c_proj, mlp.c_proj per block
    "llama": (llama, ["q_proj", "v_proj"], 4),
}
IDS = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))


def _randomise(model: nn.Module) -> None:
    """Give every adapter a non-zero update, as training would."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in wb.adapter_layers(model):
            for param in layer.adapter_params().values():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _out(model: nn.Module) -> torch.Tensor:
    return model(IDS).last_hidden_state


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", wb.VARIANTS)
def test_transformers_layouts_adapt_merge_unmerge_remove(layout, variant):
    build, targets, count = LAYOUTS[layout]
    model = build()
    original = _out(model)
    modules = {name: module for name, module in model.named_modules() if wb.adapters.is_supported(module)}
    wb.add_adapters(model, variant, 4, targets=targets)
    names = [name for name, _ in wb.adapter_layers(model)]
    assert len(names) == count and all(name.rsplit(".", 1)[-1] in targets for name in names)
    torch.testing.assert_close(_out(model), original, rtol=0, atol=0)

    _randomise(model)
    adapted = _out(model)
    assert (adapted - original).abs().max() > 1e-3
    wb.merge_adapters(model)
    torch.testing.assert_close(_out(model), adapted, rtol=1e-5, atol=1e-5)
    wb.unmerge_adapters(model)
    torch.testing.assert_close(_out(model), adapted, rtol=1e-5, atol=1e-5)

    wb.remove_adapters(model)
    assert not list(wb.adapter_layers(model))
    assert all(model.get_submodule(name) is module for name, module in modules.items())
    torch.testing.assert_close(_out(model), original, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())


def test_conv1d_merge_writes_the_transposed_weight():
    model = gpt2()
    wb.add_adapters(model, "lora", 4, targets="h.0.attn.c_attn")
    layer = model.get_submodule("h.0.attn.c_attn")
    assert isinstance(layer.base_layer, Conv1D) and layer.in_features == 32 and layer.out_features == 96
    _randomise(model)
    weight = layer.base_layer.weight.detach().clone()  # (in, out)
    wb.merge_adapters(model)
    torch.testing.assert_close(layer.base_layer.weight.detach(), weight + layer.delta_weight().detach().T)


class _ScaledCopyOfW(wb.AdapterLayer):
    """A test layer whose update depends on W: delta W = c W, with nothing to train.

    Merged, W' = (1 + c) W; subtracting a delta recomputed from W' would leave
    W' - c W' = (1 - c^2) W, off by c^2 W.
    """

    def __init__(self, base_layer: nn.Module, c: float) -> None:
        super().__init__(base_layer, rank=1)
        self.c = c

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.delta_weight().T

    def delta_weight(self) -> torch.Tensor:
        return self.c * self.base_weight()

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {}


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_unmerge_takes_out_exactly_what_merge_added_for_an_update_that_depends_on_w(kind):
    torch.manual_seed(0)
    layer = _ScaledCopyOfW(nn.Linear(12, 8) if kind == "linear" else Conv1D(8, 12), c=0.1)
    w = layer.base_weight().detach().clone()  # (out, in)
    x = torch.randn(5, 12)
    adapted = layer(x)
    layer.merge()
    layer.merge()  # merging twice does nothing
    torch.testing.assert_close(layer.base_weight(), 1.1 * w)
    torch.testing.assert_close(layer(x), adapted)
    assert layer.merged and layer.merged_delta.dtype == w.dtype
    assert not any("merged_delta" in key for key in layer.state_dict())  # never saved
    recomputed = layer.base_weight() - layer.delta_weight()  # what unmerging by recomputing would give
    assert (recomputed - w).abs().max() > 0.5 * 0.1**2 * w.abs().max()  # off by c^2 W
    layer.unmerge()
    layer.unmerge()  # unmerging twice does nothing
    # W + D - D in float32: two roundings of values below 1, so within a few 1e-8
    torch.testing.assert_close(layer.base_weight(), w, rtol=0, atol=1e-7)
    assert not layer.merged and layer.merged_delta is None


def test_remove_with_merge_keeps_what_was_learnt_and_restores_requires_grad():
    model = mlp()
    model[0].bias.requires_grad_(False)  # a choice of the user's, to be given back
    wb.add_adapters(model, "lora", 4)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == [
        f"{i}.lora_{m}" for i in (0, 2, 4) for m in "AB"
    ]
    _randomise(model)
    x = torch.randn(5, 12)
    adapted = model(x)
    wb.remove_adapters(model, merge=True)
    assert not any(isinstance(module, wb.AdapterLayer) for module in model.modules())
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == {"0.bias"}


def test_targets_exact_suffix_and_regex():
    def chosen(targets):
        return [name for name, _ in wb.adapter_layers(wb.add_adapters(bert(), "lora", 2, targets=targets))]

    assert chosen("encoder.layer.0.attention.self.query") == ["encoder.layer.0.attention.self.query"]
    assert chosen("query") == [f"encoder.layer.{i}.attention.self.query" for i in (0, 1)]
    assert chosen(r"encoder\.layer\.1\..*(query|key)") == [
        "encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.key"
    ]
    every_linear = [name for name, m in bert().named_modules() if isinstance(m, nn.Linear)]
    assert chosen(None) == every_linear


def test_roberta_base_counts_match_the_papers():
    """LoRA's and VeRA's tables: 0.3M (lora r=8) and 0.043M (vera r=1024) on query and value."""
    with torch.device("meta"):  # the full roberta-base layout without allocating its weights
        counts = {
            (variant, rank): wb.trainable_parameters(
                wb.add_adapters(RobertaModel(RobertaConfig()), variant, rank, targets=["query", "value"])
            )
            for variant, rank in [("lora", 8), ("lora-fa", 8), ("vera", 1024)]
        }
    assert counts == {("lora", 8): 294_912, ("lora-fa", 8): 147_456, ("vera", 1024): 43_008}


def test_make_optimizer_trains_a_head_the_user_unfroze():
    model = wb.add_adapters(mlp(), "lora-plus", 4, targets=["0", "2"])
    model[4].requires_grad_(True)
    opt = wb.make_optimizer(model, lr=1e-3)
    grouped = [p for group in opt.param_groups for p in group["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == 4 + 2
    assert any(p is model[4].weight for p in opt.param_groups[-1]["params"])


BAD_INPUTS = [
    (dict(variant="adalora", rank=4), rf"unknown variant 'adalora'; valid variants: {', '.join(wb.VARIANTS)}$"),
    (dict(variant="lora", rank=0), r"rank must be an integer >= 1, not 0"),
    (dict(variant="lora", rank=-2), r"rank must be an integer >= 1"),
    (dict(variant="lora", rank=2.5), r"rank must be an integer >= 1"),
    (dict(variant="lora", rank=True), r"rank must be an integer >= 1"),
    (dict(variant="lora", rank=13), r"rank 13 is larger than layer '0' allows: at most min\(in, out\) = 12"),
    (dict(variant="lora-fa", rank=7, targets="4"), r"rank 7 is larger than layer '4' allows: at most min\(in, out\) = 6"),
    (dict(variant="lora", rank=4, alpha=0), r"alpha must be a finite number > 0"),
    (dict(variant="vera", rank=4, alpha=8), r"variant 'vera' has no alpha scaling"),
    (dict(variant="lora", rank=4, targets="q_proj"), r"target 'q_proj' matches no layer of the model; adaptable layer names end in: 0, 2, 4"),
    (dict(variant="lora", rank=4, targets=["0", "nothing"]), r"target 'nothing' matches no layer"),
    (dict(variant="lora", rank=4, targets="1"), r"target '1' matches '1', a Tanh, which is not a supported layer"),
    (dict(variant="lora", rank=4, targets=[]), r"targets must be None, a non-empty string or a non-empty list"),
    (dict(variant="lora", rank=4, scale=2), r"unknown option 'scale' for variant 'lora'; valid options: dropout, rslora"),
    (dict(variant="vera", rank=4, lr_ratio=2), r"unknown option 'lr_ratio' for variant 'vera'; valid options: d_initial, dropout, projection_seed"),
    (dict(variant="delta-lora", rank=4, dropout=0.1), r"unknown option 'dropout' for variant 'delta-lora'"),
    (dict(variant="lora", rank=4, dropout=1.5), r"option dropout=1.5 of variant 'lora' is invalid: expected a float in \[0, 1\)"),
    (dict(variant="lora-plus", rank=4, lr_ratio=-1), r"option lr_ratio=-1 of variant 'lora-plus' is invalid: expected a finite number > 0"),
    (dict(variant="delta-lora", rank=4, delta_start=-1), r"expected an integer >= 0"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_INPUTS, ids=[m[:40] for _, m in BAD_INPUTS])
def test_bad_input_is_refused_and_leaves_the_model_as_it_was(kwargs, message):
    model = mlp()
    before = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    structure = repr(model)
    with pytest.raises(ValueError, match=message):
        wb.add_adapters(model, **kwargs)
    assert repr(model) == structure and [p.requires_grad for p in model.parameters()] == flags
    after = snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_adapting_twice_is_refused_and_changes_nothing():
    model = wb.add_adapters(mlp(), "lora", 4)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"already has adapters; call wb.remove_adapters\(model\)"):
        wb.add_adapters(model, "vera", 4)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and wb.adapter_config(model).variant == "lora"


def test_calls_that_need_adapters_say_so():
    for call in (wb.merge_adapters, wb.unmerge_adapters, wb.remove_adapters):
        with pytest.raises(ValueError, match=r"has no adapters; add them with wb.add_adapters"):
            call(mlp())


def test_make_optimizer_refuses_unknown_optimizer_and_bad_lr():
    model = wb.add_adapters(mlp(), "lora", 4)
    with pytest.raises(ValueError, match=r"unknown optimizer 'lion'; valid optimizers: adamw, adam, sgd"):
        wb.make_optimizer(model, 1e-3, optimizer="lion")
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0"):
        wb.make_optimizer(model, 0)


def test_model_without_linear_layers_is_refused():
    with pytest.raises(ValueError, match=r"no layer an adapter can wrap"):
        wb.add_adapters(nn.Sequential(nn.Embedding(4, 4)), "lora", 1)


def _refused(model: nn.Module, error: type[Exception], message: str, **kwargs) -> None:
    """``add_adapters(model, **kwargs)`` raises ``error`` matching ``message`` and changes nothing."""
    before, structure = snapshot(model), repr(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(error, match=message):
        wb.add_adapters(model, **kwargs)
    after = snapshot(model)
    assert repr(model) == structure and [p.requires_grad for p in model.parameters()] == flags
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


NON_FINITE = [
    ("alpha", dict(variant="lora"), r"alpha must be a finite number > 0 \(or None for alpha = rank\), not"),
    ("lr_ratio", dict(variant="lora-plus"), r"option lr_ratio=.* of variant 'lora-plus' is invalid: expected a finite number > 0"),
    ("delta_lambda", dict(variant="delta-lora"), r"option delta_lambda=.* of variant 'delta-lora' is invalid: expected a finite number"),
    ("d_initial", dict(variant="vera"), r"option d_initial=.* of variant 'vera' is invalid: expected a finite number"),
]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("option", "kwargs", "message"), NON_FINITE, ids=[o for o, _, _ in NON_FINITE])
def test_non_finite_numbers_are_refused_naming_the_option(option, kwargs, message, value):
    _refused(mlp(), ValueError, message, rank=4, **kwargs, **{option: value})


BAD_TYPES = [  # (add_adapters arguments, the TypeError's message)
    (dict(targets=5), r"targets must be None, a non-empty string or a non-empty list of them, not 5 of type int"),
    (dict(targets=["0", 2]), r"targets must be .*; 2 in \['0', 2\] is not a string"),
    (dict(targets=("0", None)), r"None in \('0', None\) is not a string"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_TYPES, ids=["int", "list-with-int", "tuple-with-none"])
def test_targets_of_the_wrong_type_are_refused_naming_the_valid_ones(kwargs, message):
    _refused(mlp(), TypeError, message, variant="lora", rank=4, **kwargs)


def test_a_model_that_is_not_a_module_is_refused():
    with pytest.raises(TypeError, match=r"model must be a torch nn.Module, not a str"):
        wb.add_adapters("model", "lora", 4)
    with pytest.raises(TypeError, match=r"model must be a torch nn.Module, not a dict"):
        wb.add_adapters(dict(mlp().state_dict()), "lora", 4)


def test_an_integer_rank_of_numpy_is_taken_as_an_int():
    ours, reference = wb.add_adapters(mlp(), "lora", np.int64(4)), wb.add_adapters(mlp(), "lora", 4)
    config = wb.adapter_config(ours)
    assert type(config.rank) is int and config == wb.adapter_config(reference)
    assert all(type(layer.rank) is int and layer.rank == 4 for _, layer in wb.adapter_layers(ours))
    json.dumps(config.rank)  # a progress.json can record it
    _refused(mlp(), ValueError, r"rank must be an integer >= 1, not 2.0", variant="lora", rank=2.0)
    _refused(mlp(), ValueError, r"rank must be an integer >= 1, not (np\.int32\()?0", variant="lora",
             rank=np.int32(0))


# -- tied weights and shared modules ------------------------------------------------------------------


def gpt2_lm() -> nn.Module:
    """GPT-2 with its head: ``lm_head.weight`` is ``transformer.wte.weight`` (tie_word_embeddings)."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def _names_by_parameter(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def _assert_no_adapter_reaches_a_tied_weight(model: nn.Module) -> None:
    """Every adapted layer's W is reachable under its own name only, so writing W writes nothing else."""
    names = _names_by_parameter(model)
    for name, layer in wb.adapter_layers(model):
        assert names[id(layer.base_layer.weight)] == [f"{name}.base_layer.weight"]


TIED_CASES = {"lora": ("lora", {}), "pissa": ("lora", {"init": "pissa"}), "delta-lora": ("delta-lora", {})}


@pytest.mark.parametrize("case", TIED_CASES)
def test_a_tied_head_is_skipped_and_nothing_writes_the_embedding(case):
    variant, options = TIED_CASES[case]
    model = gpt2_lm()
    ids = IDS.remainder(100)
    embedding = model.transformer.wte.weight.detach().clone()
    wb.add_adapters(model, variant, 4, **options)
    names = [name for name, _ in wb.adapter_layers(model)]
    assert "lm_head" not in names and len(names) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert model.lm_head.weight is model.transformer.wte.weight
    _assert_no_adapter_reaches_a_tied_weight(model)
    assert torch.equal(model.transformer.wte.weight, embedding)  # PiSSA's residual is not written into it

    _randomise(model)
    logits = model(ids).logits.detach()
    wb.merge_adapters(model)
    assert torch.equal(model.transformer.wte.weight, embedding)
    # float32 rounding of W + delta W through two blocks; a merge written into the tied head moves logits by ~1
    torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=1e-4)
    wb.unmerge_adapters(model)
    assert torch.equal(model.transformer.wte.weight, embedding)
    torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=1e-4)

    optimizer = wb.make_optimizer(model, lr=0.1)  # delta-lora's step hooks move every adapted W
    for _ in range(2):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    assert torch.equal(model.transformer.wte.weight, embedding)
    wb.remove_adapters(model, merge=True)
    assert torch.equal(model.transformer.wte.weight, embedding) and model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("targets", ["lm_head", ["c_attn", "lm_head"], ".*"])
def test_targeting_a_tied_head_is_refused_naming_the_tie(targets):
    message = r"cannot adapt 'lm_head': lm_head\.weight is tied to transformer\.wte\.weight; .* Leave 'lm_head' out"
    _refused(gpt2_lm(), ValueError, message, variant="lora", rank=4, targets=targets)


class TiedPair(nn.Module):
    """A plain torch model whose first and last Linear share one weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encode, self.middle, self.decode = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.decode.weight = self.encode.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(torch.tanh(self.middle(torch.tanh(self.encode(x)))))


def test_a_weight_shared_by_two_torch_layers_is_skipped_or_refused():
    model = wb.add_adapters(TiedPair(), "lora", 2, init="pissa")
    assert [name for name, _ in wb.adapter_layers(model)] == ["middle"]
    _assert_no_adapter_reaches_a_tied_weight(model)
    _refused(TiedPair(), ValueError, r"decode\.weight is tied to encode\.weight", variant="lora", rank=2,
             targets="decode")
    _refused(TiedPair(), ValueError, r"encode\.weight is tied to decode\.weight", variant="lora", rank=2,
             targets=["middle", "encode"])


def shared_module() -> nn.Sequential:
    """One Linear registered as both '0' and '2'; '4' is a layer of its own."""
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    return nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(6, 3))


def test_a_module_under_two_names_is_skipped_or_refused_naming_both():
    model = shared_module()
    x = torch.randn(4, 6)
    expected = model(x)
    wb.add_adapters(model, "lora", 2, init="pissa")
    assert [name for name, _ in wb.adapter_layers(model)] == ["4"]
    assert model[0] is model[2] and not isinstance(model[0], wb.AdapterLayer)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)  # PiSSA's residual: float rounding
    for targets in ("0", "2", ["4", "0"]):
        _refused(shared_module(), ValueError, r"the same Linear is registered as '0' and '2'; .*copy\.deepcopy",
                 variant="lora", rank=2, targets=targets)


def test_a_model_of_only_tied_layers_says_so():
    model = nn.Module()
    model.first = nn.Linear(4, 4)
    model.second = model.first
    _refused(model, ValueError, r"no layer of the model can be adapted alone: the same Linear is registered",
             variant="lora", rank=2)


# -- peft's adapters ------------------------------------------------------------------------------------


def test_a_model_with_peft_adapters_is_refused_and_left_as_it_was(tmp_path):
    peft_model = get_peft_model(mlp(), LoraConfig(r=2, target_modules=["0", "2"]))
    message = r"carries peft adapters \(.* is a peft .*\), and a model is adapted once: .*merge_and_unload\(\).*wb\.import_peft"
    for model in (peft_model, peft_model.base_model.model):  # the wrapper and the model peft modified in place
        _refused(model, ValueError, message, variant="lora", rank=2)
        assert not list(wb.adapter_layers(model))
    with pytest.raises(ValueError, match=message):
        wb.import_peft(peft_model, tmp_path)
    plain = peft_model.merge_and_unload()  # what the message advises
    assert [name for name, _ in wb.adapter_layers(wb.add_adapters(plain, "lora", 2))] == ["0", "2", "4"]


# -- modules trained in full (train=) ------------------------------------------------------------------


def bert_classifier() -> nn.Module:
    """BERT with a new 3-way head, ``classifier`` (an nn.Linear 32 -> 3), and no dropout."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


LABELS = torch.tensor([0, 2])


def _trainable(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def test_train_modules_train_in_full_next_to_the_adapters_and_removal_restores_requires_grad():
    model = bert_classifier()
    model.classifier.bias.requires_grad_(False)  # a flag of the user's own, restored on removal
    before = {name: param.requires_grad for name, param in model.named_parameters()}
    wb.add_adapters(model, "lora", 4, targets=["query", "value"], train=["classifier"])
    config = wb.adapter_config(model)
    assert config.train == ("classifier",) and len(config.targets) == 4
    adapters = [f"{name}.{key}" for name, layer in wb.adapter_layers(model) for key in layer.adapter_params()]
    assert _trainable(model) == [*adapters, "classifier.weight", "classifier.bias"]
    assert wb.trainable_parameters(model) == 4 * (4 * 32 + 32 * 4) + (3 * 32 + 3)
    wb.remove_adapters(model)
    assert {name: param.requires_grad for name, param in model.named_parameters()} == before


def test_targets_none_skips_the_layers_of_trained_modules():
    model = wb.add_adapters(bert_classifier(), "lora", 4, train="classifier")
    names = [name for name, _ in wb.adapter_layers(model)]
    assert "classifier" not in names and len(names) == 13  # 6 linear layers per block, the pooler
    assert isinstance(model.classifier, nn.Linear) and model.classifier.weight.requires_grad
    assert list(wb.find_targets(bert_classifier(), train="classifier")) == names


TRAIN_PATTERNS = [  # train=, the modules it selects
    ("classifier", ("classifier",)),
    ("pooler", ("bert.pooler",)),  # a suffix at a dot
    ([r"bert\.pooler.*", "classifier"], ("bert.pooler", "classifier")),  # pooler.dense is inside bert.pooler
    (r".*layer\.1\.output", ("bert.encoder.layer.1.output",)),  # not attention.output: the whole name matches
    ([], ()),
]


@pytest.mark.parametrize(("train", "selected"), TRAIN_PATTERNS, ids=[repr(t) for t, _ in TRAIN_PATTERNS])
def test_train_patterns_are_resolved_like_targets_outermost_first(train, selected):
    model = wb.add_adapters(bert_classifier(), "lora", 4, targets=["query", "value"], train=train)
    assert wb.adapter_config(model).train == selected
    trained = {name for name, param in model.named_parameters() if param.requires_grad and "lora_" not in name}
    assert trained == {f"{module}.{name}" for module in selected
                       for name, _ in model.get_submodule(module).named_parameters()}


class GatedLinear(nn.Linear):
    """A supported layer (an nn.Linear) with a module of its own inside."""

    def __init__(self) -> None:
        super().__init__(6, 6)
        self.gate = nn.Linear(6, 1)


def gated() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(GatedLinear(), nn.Tanh(), nn.Linear(6, 3))


TRAIN_REFUSALS = [  # model, add_adapters arguments, the ValueError's message
    (bert_classifier, dict(train="clasifier"),
     r"train pattern 'clasifier' matches no module of the model; module names end in: .*classifier, dense.*"
     r"\(the top-level modules: bert, dropout, classifier\)"),
    (bert_classifier, dict(train=["classifier", "dropout"]),
     r"train pattern 'dropout' selects only modules without parameters \('bert.embeddings.dropout', a Dropout\)"),
    (bert_classifier, dict(targets=["query", "classifier"], train="classifier"),
     r"cannot adapt 'classifier': train selects 'classifier' to train in full, and a module is adapted or trained "
     r"in full, not both\. Leave 'classifier' out of targets .* or 'classifier' out of train"),
    (bert_classifier, dict(targets="query", train="layer.0.attention"),
     r"cannot adapt 'bert.encoder.layer.0.attention.self.query': it is inside 'bert.encoder.layer.0.attention', "
     r"which train selects"),
    (gated, dict(targets="0", train="0.gate"), r"cannot adapt '0': it contains '0.gate', which train selects"),
    (gpt2_lm, dict(train="lm_head"),
     r"cannot train 'lm_head' in full: its parameter lm_head.weight is also transformer.wte.weight .* would train "
     r"'transformer.wte' too\. Add 'transformer.wte' to train .* or untie it first"),
    (shared_module, dict(targets="4", train="0"), r"cannot train '0' in full: its parameter 0.weight is also 2.weight"),
]


@pytest.mark.parametrize(("build", "kwargs", "message"), TRAIN_REFUSALS,
                         ids=["no-match", "no-parameters", "adapted-too", "inside-trained", "contains-trained",
                              "tied-to-frozen", "registered-twice"])
def test_train_refusals_name_the_pattern_or_both_modules_and_change_nothing(build, kwargs, message):
    _refused(build(), ValueError, message, variant="lora", rank=2, **kwargs)


def test_train_of_the_wrong_type_is_refused():
    _refused(mlp(), TypeError, r"train must be None, a non-empty string .*; 4 in \['0', 4\] is not a string",
             variant="lora", rank=2, targets="2", train=["0", 4])


def test_a_tied_pair_trained_together_shares_its_trained_weight():
    """Naming both ends of GPT-2's tie trains the one shared weight, for the head and the embedding."""
    model = gpt2_lm()
    ids = IDS.remainder(100)
    embedding = model.transformer.wte.weight.detach().clone()
    wb.add_adapters(model, "lora", 4, targets="c_attn", train=["lm_head", "transformer.wte"])
    assert wb.adapter_config(model).train == ("transformer.wte", "lm_head")
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.requires_grad
    optimizer = wb.make_optimizer(model, lr=0.1)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(model.transformer.wte.weight, embedding)
    assert model.lm_head.weight is model.transformer.wte.weight
    wb.remove_adapters(model)
    assert all(param.requires_grad for param in model.parameters())


def test_make_optimizer_trains_the_train_modules_at_lr():
    model = wb.add_adapters(bert_classifier(), "lora-plus", 4, targets=["query", "value"], train=["classifier"])
    head = {name: param.detach().clone() for name, param in model.classifier.named_parameters()}
    optimizer = wb.make_optimizer(model, lr=1e-2)
    assert all(p is q for p, q in zip(optimizer.param_groups[-1]["params"], model.classifier.parameters(), strict=True))
    assert optimizer.param_groups[-1]["lr"] == 1e-2  # LoRA+'s two groups come first
    model(IDS, labels=LABELS).loss.backward()
    optimizer.step()
    for name, param in model.classifier.named_parameters():
        assert not torch.equal(param, head[name]), name
