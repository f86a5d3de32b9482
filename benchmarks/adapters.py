"""Adapter benchmark: this project's LoRA and DoRA against peft's, side by side in one run.

Run by hand: ``.venv/bin/python benchmarks/adapters.py`` (about a minute on 2 CPU cores).

The model is BERT-style, built from a config (4 layers, hidden 768, 12 heads, intermediate
3072; vocabulary 1,000 to keep memory small, which does not touch the adapted layers), in
training mode with dropout 0, batch 8 x sequence 128, r = 8 (alpha 16) on query and value.

- time of one forward + backward pass with wb's lora and dora and peft's lora and dora
  (``use_dora=True``) on copies of the same model, interleaved (wb lora, peft lora, wb dora,
  peft dora, no adapter, wb lora, ...) after a warm-up; medians and the ratios wb / peft
  (goal: at most 1.00) and dora / lora;
- overhead over the same model with no adapter: the base frozen except the query and value
  layers' biases, so the backward pass runs through the same layers, divided into wb's time;
- bytes autograd saves for backward in one forward pass (``wb.saved_activations``, the model's
  own parameters left out) for wb's lora, lora-fa and dora and peft's lora and dora.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertModel

import workbench as wb

TARGETS = ["query", "value"]


def base_model() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
                        intermediate_size=3072, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(config).train()


def no_adapter(model: BertModel) -> BertModel:
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            module.bias.requires_grad_(True)
    return model


def step_time(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(ids).last_hidden_state.pow(2).mean().backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    with wb.saved_activations(model) as saved:
        model(ids).last_hidden_state.pow(2).mean()
    return saved.bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    base = base_model()
    models = {
        "wb lora": wb.add_adapters(copy.deepcopy(base), "lora", 8, alpha=16, targets=TARGETS),
        "peft lora": get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                                    lora_dropout=0.0)),
        "wb dora": wb.add_adapters(copy.deepcopy(base), "dora", 8, alpha=16, targets=TARGETS),
        "peft dora": get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                                    lora_dropout=0.0, use_dora=True)),
        "no adapter": no_adapter(copy.deepcopy(base)),
    }
    print(f"torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads; BERT 4 x 768, batch 8 x 128, r=8 on query+value")
    times: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(args.repeats + 2):
        for name, model in models.items():
            elapsed = step_time(model, ids)
            if repeat >= 2:  # the first two rounds warm up
                times[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, value in median.items():
        print(f"  forward+backward {name:<11} {value * 1000:7.1f} ms (median of {args.repeats})")
    print(f"  ratio wb lora / peft lora:   {median['wb lora'] / median['peft lora']:.3f} (goal <= 1.00)")
    print(f"  ratio wb dora / peft dora:   {median['wb dora'] / median['peft dora']:.3f} (goal <= 1.00)")
    print(f"  ratio wb dora / wb lora:     {median['wb dora'] / median['wb lora']:.3f}")
    print(f"  overhead over no adapter:    {median['wb lora'] / median['no adapter']:.3f}")

    saved = {
        "wb lora": saved_bytes(models["wb lora"], ids),
        "wb lora-fa": saved_bytes(wb.add_adapters(copy.deepcopy(base), "lora-fa", 8, alpha=16, targets=TARGETS), ids),
        "peft lora": saved_bytes(models["peft lora"], ids),
        "wb dora": saved_bytes(models["wb dora"], ids),
        "peft dora": saved_bytes(models["peft dora"], ids),
    }
    for name, value in saved.items():
        print(f"  saved for backward {name:<11} {value / 2**20:7.1f} MiB")
    print(f"  ratio lora-fa / lora:        {saved['wb lora-fa'] / saved['wb lora']:.3f}")
    print(f"  ratio wb lora / peft lora:   {saved['wb lora'] / saved['peft lora']:.3f}")
    print(f"  ratio wb dora / peft dora:   {saved['wb dora'] / saved['peft dora']:.3f}")
    print(f"  ratio wb dora / wb lora:     {saved['wb dora'] / saved['wb lora']:.3f}")


if __name__ == "__main__":
    main()
