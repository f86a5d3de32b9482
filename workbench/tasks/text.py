"""Tasks on your own text: a pretrained transformers model and your data, tokenized once.

Two kinds, each a ``Task`` whose items are token ids:

* ``text_classification(model, data, text=, label=)``: sentences and their labels. The model is
  the pretrained encoder (``AutoModel``) with a new linear head on the mean of its last hidden
  states over the real (unpadded) tokens: logits = W mean_t(h_t) + b, (B, T) ids -> (B, C).
  The head is trained in full (``default_train=["classifier"]``) next to the adapters.
* ``causal_lm(model, texts, block_size=)``: text cut into blocks of ``block_size`` + 1 tokens;
  inputs are a block's first ``block_size`` tokens and targets the next token at each position,
  so the loss is the mean next-token cross-entropy and ``<split>_ppl`` its exponential. The
  blocks from the end of the text are held out: val, then test. Text given as ``forget=`` (that
  adaptation never sees) is the "forget" split: its perplexity shows what adapting cost the base.

``model`` is a local transformers directory (``save_pretrained``'s; ``gguf_file=`` for a GGUF
file in it) or a ``(model, tokenizer)`` pair. ``data`` is a pandas DataFrame, a CSV or JSONL file,
or a ``datasets.Dataset``. Given as paths, the task records them with their SHA-256 in
``Task.source``, and a run's record keeps it, so ``wb.load_run_model``, the checkpoint browser,
``workbench export`` and ``reduce`` rebuild the task (``from_source``), and say so when a file
moved or changed. Text is tokenized once per task and kept as tensors; each batch is padded to
its own longest sequence (``pad_batch``), so batches of texts of similar length pad little: a
classification task's training batches are grouped by length (``group_by_length``: a random
draw among texts of about the same length, batches of all lengths spread over the epoch), and
val and test are read sorted by length in batches taken in a seeded random order.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ..checkpoints.files import sha256_once
from ..checks import is_integer
from .base import SPLITS, Task, group_by_length

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
EVAL_BATCH = 64  # texts per evaluation batch: on 2 CPU cores, 64 sorted by length beat 256 by 1.3x
ModelSource = str | os.PathLike[str] | tuple[nn.Module, Any]
DataSource = pd.DataFrame | str | os.PathLike[str] | Any


# -- models ---------------------------------------------------------------------------------------

class TextClassifier(nn.Module):
    """A pretrained encoder and a linear head on its mean-pooled last hidden states.

    The encoder sits under its ``base_model_prefix`` (``bert`` for BERT), so module names read as
    in transformers' ``*ForSequenceClassification`` (``bert.encoder.layer.0.attention.self.query``)
    and the head is ``classifier``.

    Args:
        encoder: a transformers base model (``AutoModel``), (B, T) ids -> ``last_hidden_state`` (B, T, H).
        classes: C, the number of classes.
        pad_id: the padding token; positions holding it are masked out of attention and pooling.
    """

    def __init__(self, encoder: nn.Module, classes: int, pad_id: int) -> None:
        super().__init__()
        self.prefix = getattr(encoder, "base_model_prefix", "") or "encoder"
        self.add_module(self.prefix, encoder)
        self.classifier = nn.Linear(encoder.config.hidden_size, classes)
        self.pad_id = pad_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) int64 -> logits (B, C): classifier(sum_t m_t h_t / sum_t m_t), m = (ids != pad)."""
        mask = ids != self.pad_id
        hidden = getattr(self, self.prefix)(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.classifier(pooled)


class CausalLM(nn.Module):
    """A transformers causal language model as (B, T) ids -> next-token logits (B, T, V).

    The model's own children are this module's children under the same names (``model``,
    ``lm_head`` for Llama), so checkpoints and PEFT exports have transformers' module names and
    load onto the plain ``AutoModelForCausalLM``. ``forward`` runs the model's own forward (a child
    replaced here, by an adapter say, is handed to it first); ``hf`` is the model itself, for
    ``generate``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "hf", model)  # not a child: its children are ours
        for name, child in model.named_children():
            self.add_module(name, child)

    @property
    def config(self) -> Any:
        """The transformers model's config (peft reads it)."""
        return self.hf.config

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) int64 -> logits (B, T, V)."""
        self._sync()
        return self.hf(input_ids=ids, use_cache=False).logits

    def _sync(self) -> None:
        """Give the transformers model this module's children and mode (a child may have been replaced)."""
        for name, child in self.named_children():
            if getattr(self.hf, name) is not child:
                setattr(self.hf, name, child)
        self.hf.training = self.training


def transformers_part(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The transformers model inside a text task's model, and the prefix of its parameters' names there.

    ``CausalLM``: ``("", model.hf)``, its children brought up to date first (every parameter is
    the transformers model's); ``TextClassifier``: ``("bert.", the encoder)``, the head outside it;
    any other model: None.
    """
    if isinstance(model, CausalLM):
        model._sync()
        return "", model.hf
    if isinstance(model, TextClassifier):
        return f"{model.prefix}.", getattr(model, model.prefix)
    return None


# -- loading --------------------------------------------------------------------------------------

def weight_files(directory: Path) -> list[Path]:
    """A model directory's weight files (``WEIGHT_SUFFIXES``), in name order.

    Raises:
        ValueError: there is none.
    """
    files = sorted(f for f in directory.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ValueError(f"{directory} holds no model weights (no {', '.join(WEIGHT_SUFFIXES)} file); "
                         "give a directory written by save_pretrained")
    return files


def weights_sha256(directory: Path) -> str:
    """One SHA-256 over a model directory's weight files: each file's name and SHA-256, in name order.

    Each file is hashed once per state in a process (``sha256_once``): checking a recorded
    task's files and rebuilding it read the same hashes.
    """
    return sha256_of_lines(f"{f.name} {sha256_once(f)}" for f in weight_files(directory))


def path_sha256(path: Path) -> str:
    """A model directory's ``weights_sha256``, or a data file's SHA-256."""
    return weights_sha256(path) if path.is_dir() else sha256_once(path)


def sha256_of_lines(lines: Iterable[str]) -> str:
    """The SHA-256 of the lines joined by newlines."""
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def model_directory(model: str | os.PathLike[str]) -> Path:
    """``model`` as an absolute directory path.

    Raises:
        ValueError: it is not a directory.
    """
    path = Path(model).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f"model {str(model)!r} is not a directory; give a transformers model directory "
                         "(save_pretrained's) or a (model, tokenizer) pair")
    return path


@functools.cache
def _load(directory: Path, kind: str, gguf_file: str | None) -> tuple[nn.Module, Any]:
    """The model (``AutoModel`` or ``AutoModelForCausalLM``) and tokenizer in ``directory``, loaded once per process."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    weight_files(directory)
    loader = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **extra)
            model = loader.from_pretrained(directory, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{directory}: not a transformers model directory loadable offline ({error})") from error
    return model.eval(), tokenizer


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars off inside (loading local files takes seconds), as they were after."""
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            logging.enable_progress_bar()


def load_pretrained(model: ModelSource, kind: str, gguf_file: str | None = None) -> tuple[nn.Module, Any]:
    """A fresh copy of the model, and the tokenizer, from a directory or a ``(model, tokenizer)`` pair."""
    if isinstance(model, tuple):
        if len(model) != 2 or not isinstance(model[0], nn.Module):
            raise ValueError("model must be a transformers directory or a (model, tokenizer) pair")
        pretrained, tokenizer = model
    else:
        pretrained, tokenizer = _load(model_directory(model), kind, gguf_file)
    return copy.deepcopy(pretrained), tokenizer


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's padding token, else its end-of-text token (for models trained without padding)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a padding nor an end-of-text token to pad batches with")
    return int(pad)


# -- data -----------------------------------------------------------------------------------------

def read_table(data: DataSource) -> pd.DataFrame:
    """``data`` as a DataFrame: a DataFrame, a CSV (``.csv``, ``.csv.bz2``, ...) or JSONL file, a ``datasets.Dataset``.

    Raises:
        ValueError: a missing, unreadable or empty file, or another kind of object.
    """
    if isinstance(data, pd.DataFrame):
        table = data
    elif isinstance(data, str | os.PathLike):
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"data file {str(data)!r} does not exist")
        suffixes = [s.lower() for s in path.suffixes]
        try:
            if ".jsonl" in suffixes or ".json" in suffixes:
                table = pd.read_json(path, lines=True)
            elif ".csv" in suffixes or ".tsv" in suffixes:
                table = pd.read_csv(path, sep="\t" if ".tsv" in suffixes else ",")
            else:
                raise ValueError(f"data file {path}: unknown format; give a .csv, .tsv or .jsonl file")
        except pd.errors.EmptyDataError:
            raise ValueError(f"data file {path} is empty") from None
        except (UnicodeDecodeError, pd.errors.ParserError) as error:
            raise ValueError(f"data file {path} could not be read ({error})") from None
    elif hasattr(data, "to_pandas") and hasattr(data, "column_names"):  # a datasets.Dataset
        table = data.to_pandas()
    else:
        raise ValueError(f"data must be a pandas DataFrame, a CSV or JSONL path, or a datasets.Dataset, "
                         f"not {type(data).__name__}")
    if len(table) == 0:
        raise ValueError("the data has no rows")
    return table


def text_column(table: pd.DataFrame, column: str) -> list[str]:
    """The column's values, each checked to be a non-empty string.

    Raises:
        ValueError: no such column (the message lists the columns), or a row that is not a string.
    """
    if column not in table.columns:
        raise ValueError(f"the data has no column {column!r}; its columns: {', '.join(map(str, table.columns))}")
    values = table[column].tolist()
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise ValueError(f"column {column!r}, row {row}: the text is missing (an empty cell)")
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"column {column!r}, row {row}: {value!r} is not a non-empty string of text")
    return values


def label_column(table: pd.DataFrame, column: str) -> tuple[torch.Tensor, list[str]]:
    """(labels (N,) int64, class names): integer or string labels, class ids in sorted order of the values.

    Raises:
        ValueError: no such column, a label that is neither an integer nor a string (the first such
            row), or fewer than two classes.
    """
    if column not in table.columns:
        raise ValueError(f"the data has no column {column!r}; its columns: {', '.join(map(str, table.columns))}")
    values = table[column].tolist()  # numpy integers become Python ints
    for row, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"column {column!r}, row {row}: label {value!r} is neither an integer nor a string")
    if len({isinstance(v, str) for v in values}) > 1:
        raise ValueError(f"column {column!r} mixes integer and string labels; use one kind")
    classes = sorted(set(values))
    if len(classes) < 2:
        raise ValueError(f"column {column!r} has one class only ({classes[0]!r}); a classifier needs two or more")
    index = {value: i for i, value in enumerate(classes)}
    return torch.tensor([index[v] for v in values], dtype=torch.int64), [str(c) for c in classes]


class TokenDataset(Dataset):
    """Items (ids (L_i,) int64, label () int64) of tokenized texts of varying length."""

    def __init__(self, ids: Sequence[torch.Tensor], labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[index], self.labels[index]


def token_count(item: tuple[torch.Tensor, torch.Tensor]) -> int:
    """A ``TokenDataset`` item's length: its tokens."""
    return len(item[0])


def pad_batch(pad_id: int) -> Callable[[list[tuple[torch.Tensor, torch.Tensor]]], tuple[torch.Tensor, torch.Tensor]]:
    """A collate function: items (ids (L_i,), label) -> (ids (B, max_i L_i) padded with ``pad_id``, labels (B,))."""

    def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels = zip(*items, strict=True)
        return torch.nn.utils.rnn.pad_sequence(list(ids), batch_first=True, padding_value=pad_id), torch.stack(labels)

    return collate


def stratified_splits(labels: torch.Tensor, seed: int, fractions: Sequence[float] = SPLIT_FRACTIONS
                      ) -> dict[str, torch.Tensor]:
    """Indices of train, val and test: disjoint, each with the classes in the data's proportions, from ``seed``.

    Raises:
        ValueError: a class too small to appear in every split.
    """
    from sklearn.model_selection import train_test_split  # scikit-learn draws the stratified split

    counts = torch.bincount(labels)
    if int(counts.min()) < len(fractions):
        raise ValueError(f"class {int(counts.argmin())} has {int(counts.min())} example(s); a stratified "
                         f"train/val/test split needs at least {len(fractions)} of each class")
    everything = torch.arange(len(labels)).numpy()
    try:
        train, rest = train_test_split(everything, train_size=fractions[0], stratify=labels.numpy(),
                                       random_state=seed)
        val, test = train_test_split(rest, train_size=fractions[1] / (1 - fractions[0]),
                                     stratify=labels[rest].numpy(), random_state=seed)
    except ValueError as error:  # scikit-learn's: a split too small to hold every class
        raise ValueError(f"{len(labels)} examples of {len(counts)} classes are too few for a stratified "
                         f"train/val/test split ({error})") from None
    return {split: torch.as_tensor(part) for split, part in zip(SPLITS, (train, val, test), strict=True)}


def length_sorted_batches(indices: torch.Tensor, lengths: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    """``indices`` sorted by ``lengths``, cut into batches of ``batch_size``, taken in a random order from ``seed``.

    An evaluation batch then holds texts of about one length, so it pads little, and its first k
    batches (``eval_batches``) are k length strata drawn at random, not the shortest texts.
    """
    order = group_by_length(indices.tolist(), lengths.tolist(), batch_size, len(indices) // batch_size + 1,
                            torch.Generator().manual_seed(seed))
    return torch.tensor(order, dtype=indices.dtype)


def _file_source(kind: str, path: str | os.PathLike[str]) -> dict[str, str]:
    """``{"<kind>": absolute path, "<kind>_sha256": ...}`` of a file or model directory."""
    resolved = Path(path).expanduser().resolve()
    return {kind: str(resolved), f"{kind}_sha256": path_sha256(resolved)}


# -- the tasks ------------------------------------------------------------------------------------

def text_classification(
    model: ModelSource,
    data: DataSource,
    text: str = "text",
    label: str = "label",
    *,
    name: str = "text-classification",
    max_length: int = 128,
    batch_size: int = 16,
    targets: Sequence[str] | None = ("query", "key", "value"),
    gguf_file: str | None = None,
    group_by_length: bool = True,
) -> Task:
    """Classify your texts with a pretrained encoder and a new head (see the module's docstring).

    Args:
        model: a transformers model directory or a ``(model, tokenizer)`` pair.
        data: a DataFrame, a CSV or JSONL path, or a ``datasets.Dataset`` with a text and a label column.
        text, label: the columns; labels are integers or strings (class ids in sorted order).
        name: the task's name in runs and tables.
        max_length: texts are truncated to this many tokens.
        batch_size: the training batch.
        targets: the default adapted modules (BERT's attention projections by default; ``None``: every linear layer).
        gguf_file: a GGUF file inside ``model`` to load.
        group_by_length: training batches of texts of similar length (``Task.length``); False:
            the plain shuffle, each batch padded to the longest of a random draw (about 1.8x the
            tokens on the reviews' snippets).

    Splits are stratified 80/10/10 from the run's seed (``stratified_splits``).

    Raises:
        ValueError: bad data (a missing column, an empty file, a label that is neither an integer
            nor a string, a text that is not a string; the message names the column or row) or a model
            that is not a loadable directory.
    """
    table = read_table(data)
    texts, (labels, classes) = text_column(table, text), label_column(table, label)
    check_positive("max_length", max_length)
    check_positive("batch_size", batch_size)
    stratified_splits(labels, 0)  # data too small to split is refused now, not at a run's start
    pretrained, tokenizer = load_pretrained(model, "encoder", gguf_file)
    pad_id = pad_id_of(tokenizer)
    def encode(texts: Sequence[str]) -> list[torch.Tensor]:
        """Texts -> token ids (L_i,) int64, truncated to ``max_length`` tokens."""
        return [torch.tensor(row, dtype=torch.int64)
                for row in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]

    ids = encode(texts)

    def base_model() -> nn.Module:
        """The encoder, a fresh copy, with a new head initialised from torch's global RNG (a run seeds it)."""
        return TextClassifier(copy.deepcopy(pretrained), len(classes), pad_id)

    lengths = torch.tensor([len(row) for row in ids])

    def datasets(seed: int) -> dict[str, Dataset]:
        """The seed's stratified splits; val and test in length-sorted batches (``length_sorted_batches``)."""
        splits = stratified_splits(labels, seed)
        for split in ("val", "test"):
            splits[split] = length_sorted_batches(splits[split], lengths, EVAL_BATCH, seed)
        return {split: TokenDataset([ids[i] for i in index.tolist()], labels[index]) for split, index in splits.items()}

    source = None
    if not isinstance(model, tuple) and isinstance(data, str | os.PathLike):
        source = {"kind": "text_classification", **_file_source("model", model_directory(model)),
                  **_file_source("data", data), "text": text, "label": label, "name": name,
                  "max_length": max_length, "batch_size": batch_size,
                  "targets": None if targets is None else list(targets), "gguf_file": gguf_file,
                  "group_by_length": group_by_length}
    return Task(name=name, base_model=base_model, datasets=datasets, default_targets=targets,
                default_train=["classifier"], batch_size=batch_size, eval_batch_size=EVAL_BATCH,
                collate=pad_batch(pad_id), source=source, tokenizer=tokenizer, encode=encode, classes=classes,
                length=token_count if group_by_length else None)


def read_texts(texts: str | os.PathLike[str] | Sequence[str], column: str = "text") -> list[str]:
    """Documents: a string (one document), a list of strings, or a file (``.txt`` whole; CSV / JSONL: ``column``).

    Raises:
        ValueError: a missing or empty file, no text, or an item that is not a string.
    """
    if isinstance(texts, os.PathLike):
        path = Path(texts)
        if not path.is_file():
            raise ValueError(f"text file {str(texts)!r} does not exist")
        if path.suffix.lower() in (".txt", ".md", ""):
            documents = [path.read_text(encoding="utf-8")]
        else:
            documents = text_column(read_table(path), column)
    elif isinstance(texts, str):
        documents = [texts]
    else:
        documents = list(texts)
        for row, value in enumerate(documents):
            if not isinstance(value, str):
                raise ValueError(f"text {row} is {type(value).__name__}, not a string")
    if not any(d.strip() for d in documents):
        raise ValueError("the text is empty")
    return documents


def blocks(tokenizer: Any, documents: Sequence[str], block_size: int) -> torch.Tensor:
    """(N, block_size + 1) int64: the documents' tokens, each followed by end-of-text, cut into consecutive blocks.

    Blocks overlap by one token, so every token but the first is a target once; the tail shorter
    than a block is dropped.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for document in documents:
        stream += tokenizer(document)["input_ids"] + ([eos] if eos is not None else [])
    tokens = torch.tensor(stream, dtype=torch.int64)
    count = (len(tokens) - 1) // block_size
    return tokens[: count * block_size + 1].unfold(0, block_size + 1, block_size)


def causal_lm(
    model: ModelSource,
    texts: str | os.PathLike[str] | Sequence[str],
    *,
    block_size: int = 64,
    forget: str | os.PathLike[str] | Sequence[str] | None = None,
    forget_blocks: int = 64,
    name: str = "causal-lm",
    batch_size: int = 8,
    targets: Sequence[str] | None = ("q_proj", "v_proj"),
    column: str = "text",
    gguf_file: str | None = None,
) -> Task:
    """Adapt a pretrained causal language model to your text (see the module's docstring).

    Args:
        model: a transformers model directory (``gguf_file=``: a GGUF file in it) or a ``(model, tokenizer)`` pair.
        texts: the text to adapt to: a string, a list of documents, or a file (``.txt``, or a
            CSV / JSONL file's ``column``); a path must be a ``pathlib.Path``.
        block_size: tokens per example.
        forget: other text, never trained on, whose first ``forget_blocks`` blocks are the "forget" split.
        name: the task's name in runs and tables.
        batch_size: the training batch, in blocks.
        targets: the default adapted modules (Llama's q and v projections; ``None``: every linear layer).

    The blocks are split in text order: the first 80% train, then 10% val, the last 10% test.

    Raises:
        ValueError: empty or non-string text, a text too short for 10 blocks, a bad model.
    """
    check_positive("block_size", block_size)
    check_positive("batch_size", batch_size)
    documents = read_texts(texts, column)
    forgotten = None if forget is None else read_texts(forget, column)
    pretrained, tokenizer = load_pretrained(model, "causal-lm", gguf_file)
    examples = blocks(tokenizer, documents, block_size)
    if len(examples) < 10:
        raise ValueError(f"the text makes {len(examples)} blocks of {block_size} tokens; at least 10 are needed "
                         "for train, val and test")
    cuts = [math.floor(f * len(examples)) for f in (SPLIT_FRACTIONS[0], sum(SPLIT_FRACTIONS[:2]))]
    parts = {"train": examples[: cuts[0]], "val": examples[cuts[0]: cuts[1]], "test": examples[cuts[1]:]}
    if forgotten is not None:
        parts["forget"] = blocks(tokenizer, forgotten, block_size)[:forget_blocks]
    split_data = {split: TensorDataset(part[:, :-1].contiguous(), part[:, 1:].contiguous())
                  for split, part in parts.items()}

    def base_model() -> nn.Module:
        return CausalLM(copy.deepcopy(pretrained))

    source = None
    if not isinstance(model, tuple) and isinstance(texts, os.PathLike) and (
            forget is None or isinstance(forget, os.PathLike)):
        source = {"kind": "causal_lm", **_file_source("model", model_directory(model)),
                  **_file_source("data", texts), **(_file_source("forget", forget) if forget is not None else {}),
                  "block_size": block_size, "forget_blocks": forget_blocks, "name": name, "batch_size": batch_size,
                  "targets": None if targets is None else list(targets), "column": column, "gguf_file": gguf_file}
    return Task(name=name, base_model=base_model, datasets=lambda seed: split_data, default_targets=targets,
                batch_size=batch_size, eval_batch_size=batch_size, perplexity=True, source=source,
                tokenizer=tokenizer)


def check_positive(name: str, value: object) -> None:
    """Refuse a size that is not an integer >= 1 (``is_integer``: never a bool)."""
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")


# -- rebuilding and using --------------------------------------------------------------------------

def from_source(source: dict[str, Any]) -> Task:
    """Rebuild the task a run recorded (``Task.source``), after checking its files are the ones it trained on.

    Raises:
        ValueError: an unknown kind, or a file that moved (the message gives the recorded path)
            or changed (its SHA-256 differs from the recorded one).
    """
    kind = source.get("kind")
    if kind not in ("text_classification", "causal_lm"):
        raise ValueError(f"unknown task source kind {kind!r}; valid kinds: text_classification, causal_lm")
    for part in ("model", "data", "forget"):
        if part not in source:
            continue
        path = Path(source[part])
        if not path.exists():
            raise ValueError(f"the run's {part} {path} is gone (moved or deleted); put it back there, or pass the "
                             "task as task=...")
        found = path_sha256(path)
        if found != source[f"{part}_sha256"]:
            raise ValueError(f"the run's {part} {path} changed since it trained (SHA-256 {found}, recorded "
                             f"{source[f'{part}_sha256']}); restore it, or pass the task as task=...")
    targets = source["targets"]
    if kind == "text_classification":
        return text_classification(source["model"], source["data"], source["text"], source["label"],
                                   name=source["name"], max_length=source["max_length"],
                                   batch_size=source["batch_size"], targets=targets, gguf_file=source["gguf_file"],
                                   group_by_length=source.get("group_by_length", False))
    return causal_lm(source["model"], Path(source["data"]), block_size=source["block_size"],
                     forget=Path(source["forget"]) if "forget" in source else None,
                     forget_blocks=source["forget_blocks"], name=source["name"], batch_size=source["batch_size"],
                     targets=targets, column=source["column"], gguf_file=source["gguf_file"])


@torch.no_grad()
def predict(model: nn.Module, task: Task, texts: Sequence[str]) -> pd.DataFrame:
    """A classification task's predictions on new texts: text, label (the class name) and its probability."""
    if task.classes is None or task.encode is None:
        raise ValueError(f"task {task.name!r} is not a text classification task")
    texts = read_texts(list(texts))
    ids, _ = task.collate([(row, torch.tensor(0)) for row in task.encode(texts)])
    was_training = model.training
    probabilities = model.eval()(ids).softmax(-1)
    model.train(was_training)
    best = probabilities.max(-1)
    return pd.DataFrame({"text": texts, "label": [task.classes[i] for i in best.indices.tolist()],
                         "probability": best.values.tolist()})


@torch.no_grad()
def generate(model: nn.Module, task: Task, prompt: str, max_new_tokens: int = 40) -> str:
    """A language-model task's greedy continuation of ``prompt`` (transformers' ``generate``), without the prompt."""
    if not isinstance(model, CausalLM) or task.tokenizer is None:
        raise ValueError(f"task {task.name!r} is not a causal language-model task, or the model is not its model")
    ids = task.tokenizer(prompt, return_tensors="pt")["input_ids"]
    was_training = model.training
    model.eval()._sync()
    out = model.hf.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=pad_id_of(task.tokenizer))
    model.train(was_training)
    return task.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
