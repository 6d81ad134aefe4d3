"""A user's own task through the generic data module: CSV/TSV/Parquet files, Hub datasets (here a local folder in
the Hub layout), custom field names, sentence pairs, dataset corpora, the monitored metric, and clear errors."""
import csv
import json
import re
import shutil
import warnings
from pathlib import Path

import pandas
import pytest
import pytorch_lightning as pl
import torch
from datasets import ClassLabel, Dataset, Features, Value
from jsonargparse import Namespace
from transformers import AutoTokenizer

from datamodules import DataFormatError, EndTaskDataModule
from lightning_tartan import TartanModule
from lightning_tartan.cli import main, tartan_cli, task_name
from lightning_tartan.export import ExportEncoder
from lightning_tartan.heads import EncoderInputMismatch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = {"max_length": 32, "batch_size": 4, "aux_batch_size": 4, "dev_batch_size": 4, "eval_batch_size": 16}
CLI_SMALL = [f"--data.{name}={value}" for name, value in SMALL.items()] + [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
WORDS = ["good", "bad", "fine", "poor", "great", "awful"]


@pytest.fixture
def build(tiny_encoder, cache_dir):
    """A generic data module with the tiny tokenizer and small batches."""

    def build(**kwargs) -> EndTaskDataModule:
        return EndTaskDataModule(**{"tokenizer_name_or_path": tiny_encoder, "cache_dir": cache_dir, **SMALL, **kwargs})

    return build


def write_rows(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as file:
        csv.writer(file, lineterminator="\n").writerows([header, *rows])
    return path


def csv_task(folder: Path, sizes=(24, 8, 8)) -> Path:
    """train/dev/test.csv with a `sentence` column and integer labels 0, 1, 2, 10 in a `score` column."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in zip(("train", "dev", "test"), sizes):
        rows = [[f"a {WORDS[i % 6]}, honest review number {i}", [0, 1, 2, 10][i % 4]] for i in range(size)]
        write_rows(folder / f"{split}.csv", ["id", "sentence", "score"], [[i, *row] for i, row in enumerate(rows)])
    return folder


def csv_task_options(folder: Path) -> dict[str, str]:
    """The data module's options that read `csv_task(folder)`."""
    files = {f"{split}_file": f"{split}.csv" for split in ("train", "dev", "test")}
    return {"data_dir": str(csv_task(folder)), **files, "text_field": "sentence", "label_field": "score"}


def hub_folder(folder: Path, splits: dict[str, dict[str, list]], names: list[str] | None = None) -> Path:
    """A local dataset in the Hub's layout, `data/<split>-00000-of-00001.parquet`; with `names`, the `label`
    column is a `ClassLabel` with those names."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, columns in splits.items():
        features = None
        if names is not None:
            features = Features({name: Value("string") for name in columns if name != "label"})
            features["label"] = ClassLabel(names=names)
        Dataset.from_dict(columns, features=features).to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder


def sentiment_folder(folder: Path, test_labels: list[int] | None = None) -> Path:
    """Class names deliberately unsorted: ids must stay the dataset's."""
    def split(size: int, labels: list[int] | None = None) -> dict[str, list]:
        texts = [f"review {i} was {WORDS[i % 6]}" for i in range(size)]
        return {"text": texts, "label": labels or [i % 2 for i in range(size)]}

    return hub_folder(
        folder, {"train": split(12), "validation": split(6), "test": split(4, test_labels)}, names=["pos", "neg"]
    )


# ---- formats ----------------------------------------------------------------------------------------------


def test_csv_with_integer_labels_and_custom_field_names(build, tmp_path):
    folder = csv_task(tmp_path / "task")
    files = {"train_file": "train.csv", "dev_file": "dev.csv", "test_file": "test.csv"}
    dm = build(data_dir=str(folder), **files, text_field="sentence", label_field="score", aux_corpora={})
    assert dm.label_names == ["0", "1", "2", "10"]  # numeric order: labels 0..n-1 keep their ids
    dm.setup()
    expected = [[0, 1, 2, 3][i % 4] for i in range(8)]
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["labels"].tolist() == expected
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert first == dm.tokenizer("a good, honest review number 0", truncation=True, max_length=32)["input_ids"]


def test_a_csv_written_with_a_space_after_each_comma_reads_as_written_without(build, tmp_path):
    """`text, label` rows (a space after the comma, as people type them): the columns and integer labels are
    those of the same file without the spaces, and a quoted text after a space keeps its commas."""
    folder = tmp_path / "spaced"
    folder.mkdir()
    for split in ("train", "dev", "test"):
        rows = [f'"a {WORDS[i % 6]}, honest review {i}", {[2, 10, 1][i % 3]}' for i in range(6)]
        (folder / f"{split}.csv").write_text("sentence, score\n" + "\n".join(rows) + "\n", encoding="utf-8")
    files = {"train_file": "train.csv", "dev_file": "dev.csv", "test_file": "test.csv"}
    dm = build(data_dir=str(folder), **files, text_field="sentence", label_field="score", aux_corpora={})
    assert dm.label_names == ["1", "2", "10"]
    dm.setup()
    assert dm.splits["dev"]["labels"] == [1, 2, 0, 1, 2, 0]
    first = dm.splits["dev"]["input_ids"][0]
    assert first == dm.tokenizer("a good, honest review 0", truncation=True, max_length=32)["input_ids"]


def test_texts_to_label_may_keep_their_text_in_another_field_than_the_training_data(build, tmp_path):
    """Trained on a CSV's `sentence` column, new texts to label come as JSON lines with a `body`: named by
    `predict_text_field`, mistyped it is the option the error names."""
    folder = csv_task(tmp_path / "task")
    (tmp_path / "new.jsonl").write_text('{"id": 7, "body": "a fine review"}\n{"id": 8, "body": "an awful one"}\n')
    files = {"train_file": "train.csv", "dev_file": "dev.csv", "test_file": "test.csv"}
    files.update(text_field="sentence", label_field="score", aux_corpora={})
    dm = build(data_dir=str(folder), **files, predict_file=str(tmp_path / "new.jsonl"), predict_text_field="body")
    dm.setup("predict")
    assert dm.splits["predict"]["input_ids"][0] == dm.tokenizer("a fine review", truncation=True)["input_ids"]
    mistyped = build(data_dir=str(folder), **files, predict_file=str(tmp_path / "new.jsonl"), predict_text_field="bdy")
    with pytest.raises(DataFormatError, match=r"new.jsonl:1: no 'bdy' field \(its fields: 'id', 'body'; see `predict_t"):
        mistyped.setup("predict")
    with pytest.raises(ValueError, match="`predict_text_field` names the text field of `predict_file`, which is not"):
        build(data_dir=str(folder), **files, predict_text_field="body")


def test_a_spreadsheets_csv_export_with_empty_columns_and_rows_reads_as_its_filled_cells(build, tmp_path):
    """Spreadsheets export unnamed empty columns ("text,label,,") and rows of empty cells (",,,"): they hold no
    example, so they are passed over, not refused as duplicate columns or empty labels."""
    folder = tmp_path / "sheet"
    folder.mkdir()
    for split in ("train", "dev", "test"):
        rows = [f"{WORDS[i]} review,{'ab'[i % 2]},," for i in range(4)]
        (folder / f"{split}.csv").write_text("text,label,,\n" + "\n".join([*rows, ",,,", ",,,"]) + "\n")
    files = {"train_file": "train.csv", "dev_file": "dev.csv", "test_file": "test.csv"}
    dm = build(data_dir=str(folder), **files, aux_corpora={})
    assert dm.label_names == ["a", "b"]
    dm.setup()
    assert [len(dm.splits[split]) for split in ("train", "dev", "test")] == [4, 4, 4]


def test_a_csv_task_trains_with_meta_tartan_from_the_shipped_config(tiny_encoder, cache_dir, tmp_path):
    folder = csv_task(tmp_path / "task")
    fit = tartan_cli(
        [
            "fit",
            f"--config={CONFIGS / 'own_task.yaml'}",
            f"--model.encoder_name_or_path={tiny_encoder}",
            f"--data.data_dir={folder}",
            *[f"--data.{split}_file={split}.csv" for split in ("train", "dev", "test")],
            "--data.text_field=sentence",
            "--data.label_field=score",
            f"--data.cache_dir={cache_dir}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=4",
            *CLI_SMALL,
        ]
    )
    assert fit.model.hparams.weighting == "meta" and fit.model.hparams.label_names == ["0", "1", "2", "10"]
    assert fit.trainer.global_step == 2 and fit.model.objectives == ["end_task", "tapt"]
    assert not torch.equal(fit.model.weighting.logits, torch.zeros(2))  # the meta-weights moved
    # the derived TAPT corpus is the training sentences
    assert len(fit.datamodule.corpora["tapt"]) == 24


def test_tsv_is_read_as_iana_tsv_without_quoting(build, tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    rows = [[f'he said "{WORDS[i % 6]}\' twice', "ab"[i % 2]] for i in range(6)]
    for split in ("train", "dev", "test"):
        (folder / f"{split}.tsv").write_text("".join("\t".join(row) + "\n" for row in [["text", "label"], *rows]))
    dm = build(data_dir=str(folder), train_file="train.tsv", dev_file="dev.tsv", test_file="test.tsv")
    examples = dm._labeled("dev")
    assert [example.text for example in examples] == [row[0] for row in rows]  # quotes kept as written
    assert [example.line for example in examples] == list(range(2, 8))
    assert dm.label_names == ["a", "b"]


def test_a_tsv_written_with_csv_quoting_warns_naming_the_lines(build, tmp_path):
    """pandas' `to_csv(sep="\\t")` wraps each text holding a quote in quotes and doubles the ones inside; read as TSV,
    those stay in the text, so the user is told (a warning: a text may well be a quotation)."""
    folder = csv_task(tmp_path / "task")
    frame = pandas.DataFrame({"sentence": ['he said "fine"', "a plain review", 'the "best" one'], "score": [0, 1, 0]})
    frame.to_csv(folder / "train.tsv", sep="\t", index=False)
    files = {"train_file": "train.tsv", "dev_file": "dev.csv", "test_file": "test.csv"}
    dm = build(data_dir=str(folder), **files, text_field="sentence", label_field="score")
    quoted = "train.tsv: 2 of 3 examples have a text wrapped in double quotes (lines 2, 4)"
    with pytest.warns(UserWarning, match=re.escape(quoted)):
        assert dm.label_names == ["0", "1"]
    assert dm._labeled("train")[0].text == '"he said ""fine"""'  # as the file holds it


def test_a_parquet_label_column_with_missing_values_names_their_rows(build, tmp_path):
    """pandas stores an integer column with a missing value as floats (NaN): the error names the rows without a
    label, not the first row's `0.0`; a predict file's missing labels are unknown labels."""
    folder = tmp_path / "task"
    folder.mkdir()
    texts = [f"text {WORDS[i % 6]} {i}" for i in range(6)]
    pandas.DataFrame({"text": texts, "label": [0, 1, None, 1, 0, None]}).to_parquet(folder / "train.parquet")
    with pytest.raises(DataFormatError, match=re.escape("train.parquet: 'label' is missing (NaN) in rows 2, 5")):
        build(data_dir=str(folder), train_file="train.parquet").label_names
    pandas.DataFrame({"text": texts, "label": [0.0, 1.0] * 3}).to_parquet(folder / "floats.parquet")
    with pytest.raises(DataFormatError, match=re.escape("floats.parquet row 0: 'label' is a float column (0.0 here)")):
        build(data_dir=str(folder), train_file="floats.parquet").label_names


@pytest.mark.parametrize("content", ['[{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]', '[\n  {"text": "a"'])
def test_a_json_file_holding_one_document_says_json_lines_are_expected(build, tmp_path, content):
    folder = csv_task(tmp_path / "task")
    (folder / "train.json").write_text(content + "\n")
    dm = build(data_dir=str(folder), train_file="train.json", dev_file="dev.csv", test_file="test.csv")
    expected = re.escape("train.json:1: ") + ".*read as JSON Lines, one object per line"
    with pytest.raises(DataFormatError, match=expected):
        dm.label_names


def test_parquet_files_and_a_parquet_predict_file_keep_their_rows(build, tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    columns = {"text": [f"text {WORDS[i % 6]} {i}" for i in range(6)], "label": ["yes", "no"] * 3}
    for split in ("train", "dev", "test"):
        Dataset.from_dict(columns).to_parquet(folder / f"{split}.parquet")
    Dataset.from_dict({"text": ["first input", "second input"]}).to_parquet(folder / "inputs.parquet")
    files = {f"{split}_file": f"{split}.parquet" for split in ("train", "dev", "test")}
    dm = build(data_dir=str(folder), predict_file="inputs.parquet", **files)
    dm.setup("fit")
    assert dm.label_names == ["no", "yes"] and dm.splits["train"]["labels"] == [1, 0, 1, 0, 1, 0]
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["line"].tolist() == [0, 1] and "labels" not in batch  # rows of the file, no labels


def test_hub_layout_folder_takes_class_names_from_its_classlabel_and_slices_splits(build, tmp_path):
    folder = sentiment_folder(tmp_path / "sentiment")
    dm = build(dataset=str(folder), train_split="train[:8]", aux_corpora={})
    assert dm.label_names == ["pos", "neg"]  # the feature's names, ids kept (not sorted)
    dm.setup()
    assert len(dm.splits["train"]) == 8 and len(dm.splits["dev"]) == 6
    assert dm.splits["test"]["labels"] == [0, 1, 0, 1]
    dm.setup("predict")  # no predict_file: the test split, by row
    assert dm.splits["predict"]["line"] == [0, 1, 2, 3]


def test_dataset_corpus_with_its_own_text_field(build, tmp_path):
    task = sentiment_folder(tmp_path / "sentiment")
    domain = hub_folder(tmp_path / "domain", {"train": {"content": ["one document", "  ", "another one", ""]}})
    corpus = {"dataset": str(domain), "text_field": "content"}
    dm = build(dataset=str(task), aux_corpora={"tapt": "train.txt", "domain": corpus})
    assert dm.hparams.aux_corpora == {"tapt": "train.txt", "domain": corpus}
    path = tmp_path / "hparams.pt"
    torch.save(dict(dm.hparams), path)
    assert torch.load(path, weights_only=True)["aux_corpora"]["domain"] == corpus  # checkpoints stay loadable
    dm.setup("fit")
    assert len(dm.corpora["domain"]) == 2  # blank texts skipped
    assert dm.corpora["domain"][0]["input_ids"] == dm.tokenizer("one document")["input_ids"]
    assert len(dm.corpora["tapt"]) == 12  # derived from the Hub train split
    assert dm.corpus_file("tapt").read_text().splitlines()[0] == "review 0 was good"


def test_a_corpus_in_a_data_file_is_read_by_its_text_field_and_refused_as_plain_text(build, tmp_path):
    """Unlabeled text kept as JSON Lines, CSV or Parquet: `{dataset: <file>, text_field: ...}` reads that field of
    each record; the same file as a plain corpus path would train on its JSON syntax, so it is refused with the fix."""
    task = sentiment_folder(tmp_path / "sentiment")
    documents = ["one document", "  ", "another one, with a comma"]
    jsonl = tmp_path / "abstracts.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": text}) + "\n" for i, text in enumerate(documents)))
    csv_file = tmp_path / "abstracts.csv"
    write_rows(csv_file, ["id", "body"], list(enumerate(documents)))
    for corpus_file in (jsonl, csv_file):
        corpus = {"dataset": str(corpus_file), "text_field": "body"}
        dm = build(dataset=str(task), aux_corpora={"domain": corpus})
        dm.setup("fit")
        assert [dm.corpora["domain"][i]["input_ids"] for i in range(len(dm.corpora["domain"]))] == [
            dm.tokenizer(text)["input_ids"] for text in (documents[0], documents[2])
        ]
    refused = rf"`aux_corpora\['domain'\]`: '{jsonl}' would be read as plain text.*\{{domain: \{{dataset: {jsonl}, "
    with pytest.raises(ValueError, match=refused):
        build(dataset=str(task), aux_corpora={"domain": str(jsonl)})


# ---- sentence pairs ---------------------------------------------------------------------------------------


def test_sentence_pairs_keep_segment_ids_and_the_model_uses_them(build, tiny_encoder, tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    rows = [
        {"premise": f"the film was {WORDS[i % 6]}", "hypothesis": f"a {WORDS[(i + 1) % 6]} film", "label": i % 2}
        for i in range(6)
    ]
    for split in ("train", "dev", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    dm = build(data_dir=str(folder), text_field="premise", text_pair_field="hypothesis")
    dm.setup("fit")
    assert dm.corpus_file("tapt").read_text().splitlines()[0] == "the film was good a bad film"
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "token_type_ids"}
    expected = dm.tokenizer(rows[0]["premise"], rows[0]["hypothesis"])
    length = len(expected["input_ids"])
    assert batch["input_ids"][0, :length].tolist() == expected["input_ids"]
    segments = batch["token_type_ids"][0, :length]
    assert segments.tolist() == expected["token_type_ids"] and set(segments.tolist()) == {0, 1}

    model = TartanModule(tiny_encoder, num_labels=2).eval()
    inputs, mask, segments = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    with torch.no_grad():
        paired = model(inputs, mask, segments)
        single = model(inputs, mask)
        assert torch.equal(single, model(inputs, mask, torch.zeros_like(segments)))  # BERT's default segment
        assert not torch.allclose(paired, single)
        assert torch.equal(model.end_task_head(model.encode(batch)), paired)  # training batches use them too


def encoder_with_tokenizer(tiny_encoder: str, folder: Path, **changes) -> str:
    """The tiny encoder saved with its tokenizer changed (`padding_side="left"`, `pad_token=None`, ...)."""
    shutil.copytree(tiny_encoder, folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder)
    for name, value in changes.items():
        setattr(tokenizer, name, value)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_tokenizer_that_pads_on_the_left_trains_and_exports_padding_on_the_right(build, tiny_encoder, tmp_path):
    """The classifier reads each row's first token: left-padded rows would be read at a pad token, so each row's
    prediction would depend on the padding its batch gave it."""
    encoder = encoder_with_tokenizer(tiny_encoder, tmp_path / "left", padding_side="left")
    dm = build(**csv_task_options(tmp_path / "task"), tokenizer_name_or_path=encoder)
    dm.setup("fit")
    collate = dm.val_dataloader().collate_fn
    batch = collate([dm.tokenizer("short"), dm.tokenizer("a longer text than that")])
    assert batch["attention_mask"].tolist()[0] == [1, 1, 1, 0, 0, 0, 0]
    model = TartanModule.from_datamodule(dm, encoder_name_or_path=encoder, weighting="none")
    exported = model.save_end_task_model(tmp_path / "export")
    assert AutoTokenizer.from_pretrained(exported).padding_side == "right"


def test_a_tokenizer_without_a_pad_token_is_refused_before_tokenizing(build, tiny_encoder, tmp_path):
    encoder = encoder_with_tokenizer(tiny_encoder, tmp_path / "nopad", pad_token=None)
    dm = build(**csv_task_options(tmp_path / "task"), tokenizer_name_or_path=encoder)
    with pytest.raises(EncoderInputMismatch, match=re.escape(f"the tokenizer {encoder!r} has no pad token")):
        dm.setup("fit")


def test_a_tokenizer_without_a_mask_token_fine_tunes_and_refuses_corpora(build, tiny_encoder, tmp_path):
    encoder = encoder_with_tokenizer(tiny_encoder, tmp_path / "nomask", mask_token=None)
    options = dict(csv_task_options(tmp_path / "task"), tokenizer_name_or_path=encoder)
    with pytest.raises(EncoderInputMismatch, match=re.escape("has no mask token, which the masked-LM objectives on")):
        build(**options).setup("fit")
    dm = build(**options, aux_corpora={})
    model = TartanModule.from_datamodule(dm, encoder_name_or_path=encoder, weighting="none")
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2


def test_a_task_without_a_test_split_trains_and_says_what_test_and_predict_need(build, tiny_encoder, tmp_path):
    """Many own tasks have train and dev only; the dev split is what no task can do without."""
    options = csv_task_options(tmp_path / "task")
    (tmp_path / "task" / "test.csv").unlink()
    with pytest.raises(DataFormatError, match=re.escape("a task without a test split sets `test_file` to null")):
        build(**options).prepare_data()
    with pytest.raises(ValueError, match=re.escape("`dev_file` (--data.init_args.dev_file) is required: the dev split")):
        build(**{**options, "dev_file": None})
    dm = build(**{**options, "test_file": None}, aux_corpora={})
    model = TartanModule.from_datamodule(dm, encoder_name_or_path=tiny_encoder, weighting="none")
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, val_check_interval=2)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 and "val/f1_macro" in trainer.callback_metrics
    with pytest.raises(DataFormatError, match=re.escape("the task has no test split to test on (`test_file` is None")):
        trainer.test(model, datamodule=dm)
    with pytest.raises(DataFormatError, match=re.escape("no test split to label: set `predict_file`")):
        trainer.predict(model, datamodule=dm)


def test_a_hub_dataset_trains_and_predicts_from_the_shipped_config(tiny_encoder, cache_dir, tmp_path):
    """The README's Hub walk-through, on a local folder in the Hub layout: META-TARTAN trains on the end task and
    the training texts, and `tartan predict` writes the dataset's class names."""
    folder = sentiment_folder(tmp_path / "sentiment")
    common = [
        f"--config={CONFIGS / 'own_task.yaml'}",
        f"--model.encoder_name_or_path={tiny_encoder}",
        f"--data.dataset={folder}",
        "--data.text_field=text",
        f"--data.cache_dir={cache_dir}",
        f"--trainer.default_root_dir={tmp_path}",
        *CLI_SMALL,
    ]
    fit = tartan_cli(["fit", *common, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    assert fit.model.hparams.weighting == "meta" and fit.model.hparams.label_names == ["pos", "neg"]
    assert fit.trainer.global_step == 2 and not torch.equal(fit.model.weighting.logits, torch.zeros(2))
    best = fit.trainer.checkpoint_callback.best_model_path
    tartan_cli(["predict", *common, f"--ckpt_path={best}"])
    written = sorted(tmp_path.glob("lightning_logs/version_*/predictions.jsonl"))
    rows = [json.loads(line) for line in written[-1].read_text().splitlines()]
    assert [row["gold"] for row in rows] == ["pos", "neg", "pos", "neg"]  # the test split's ClassLabel names
    assert all(set(row["probabilities"]) == {"pos", "neg"} for row in rows)


def test_exports_of_two_hub_datasets_sharing_a_corpus_folder_go_to_two_folders(tiny_encoder, cache_dir, tmp_path):
    """`{task}` in `exports/{task}/tapt` names the dataset (and its configuration), not the `data_dir` its corpora
    are read from: two tasks sharing one corpus folder must not overwrite each other's TAPT encoder."""
    exports = []
    for name in ("reviews", "tweets"):
        args = ["--config", str(CONFIGS / "own_task.yaml"), "--config", str(CONFIGS / "methods" / "tapt.yaml")]
        args += [f"--model.encoder_name_or_path={tiny_encoder}", f"--data.dataset={sentiment_folder(tmp_path / name)}"]
        args += [f"--data.data_dir={tmp_path}", f"--data.cache_dir={cache_dir}", *CLI_SMALL]
        callbacks = tartan_cli(args, run=False).trainer.callbacks
        exports += [callback.dirpath for callback in callbacks if isinstance(callback, ExportEncoder)]
    assert exports == [Path("exports/reviews/tapt"), Path("exports/tweets/tapt")]
    glue_rte = Namespace(init_args=Namespace(data_dir=None, dataset="nyu-mll/glue", dataset_config="rte"))
    assert task_name(glue_rte) == "glue_rte"


# ---- the monitored metric ---------------------------------------------------------------------------------


def test_monitor_metric_option_reaches_the_model_and_callbacks(tiny_encoder, cache_dir, tmp_path):
    folder = sentiment_folder(tmp_path / "sentiment")
    cli = tartan_cli(
        [
            f"--config={CONFIGS / 'own_task.yaml'}",
            f"--model.encoder_name_or_path={tiny_encoder}",
            f"--data.dataset={folder}",
            "--data.monitor_metric=accuracy",
            f"--data.cache_dir={cache_dir}",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert cli.datamodule.monitor_metric == cli.model.monitor_metric == "accuracy"
    assert cli.trainer.checkpoint_callback.monitor == "val/accuracy"
    assert [c.monitor for c in cli.trainer.callbacks if type(c).__name__ == "EarlyStopping"] == ["val/accuracy"]


# ---- mistakes -------------------------------------------------------------------------------------------


def test_a_missing_field_names_the_line_the_field_and_what_exists(build, tmp_path):
    folder = csv_task(tmp_path / "task")
    dm = build(data_dir=str(folder), train_file="train.csv", dev_file="dev.csv", test_file="test.csv")
    message = f"{folder / 'train.csv'}:1: no 'text' column (columns: 'id', 'sentence', 'score'; see `text_field`; the"
    with pytest.raises(DataFormatError, match=re.escape(message)):
        dm.label_names
    # the default train_file, train.jsonl, beside the train.csv the user has
    message = f"{folder / 'train.jsonl'} does not exist (check `data_dir` and `train_file`); the folder has 'train.csv'"
    with pytest.raises(DataFormatError, match=re.escape(message)):
        build(data_dir=str(folder)).prepare_data()

    (folder / "train.jsonl").write_text('{"sentence": "fine", "label": "a"}\n{"text": "no sentence", "label": "b"}\n')
    dm = build(data_dir=str(folder), text_field="sentence")
    message = f"{folder / 'train.jsonl'}:2: no 'sentence' field (its fields: 'text', 'label'; see `text_field`)"
    with pytest.raises(DataFormatError, match=re.escape(message)):
        dm.label_names


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["text,label", "fine,1", "not whole,1.0"], ":3: 'label' is '1.0', a decimal number"),
        (["text,label", "fine,1", "", "a, b,1"], ":4: 3 fields where the header has 2 (quote a text holding a comma)"),
        (["text,label", 'fine,1', '"unclosed "quote,1'], ":3: malformed CSV"),
        (["", "fine,1"], ":1: no header row"),
    ],
)
def test_bad_csv_is_reported_with_file_and_line(build, tmp_path, lines, message):
    folder = csv_task(tmp_path / "task")
    (folder / "train.csv").write_text("".join(line + "\n" for line in lines))
    dm = build(data_dir=str(folder), train_file="train.csv", dev_file="dev.csv", test_file="test.csv")
    with pytest.raises(DataFormatError, match=re.escape(f"{folder / 'train.csv'}{message}")):
        dm.label_names


def test_an_unlabeled_test_split_is_an_actionable_error(build, tmp_path):
    folder = sentiment_folder(tmp_path / "glue_like", test_labels=[-1, -1, -1, -1])
    dm = build(dataset=str(folder), aux_corpora={})
    message = f"{folder}[test] row 0: label -1 marks an unlabeled example: the split has no labels; choose a"
    with pytest.raises(DataFormatError, match=re.escape(message) + ".*--data.init_args.test_split"):
        dm.setup("fit")


def test_a_missing_split_names_its_option(build, tmp_path):
    folder = sentiment_folder(tmp_path / "sentiment")
    with pytest.raises(DataFormatError, match="`dev_split`: split 'dev' of"):
        build(dataset=str(folder), dev_split="dev").prepare_data()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--data.dev_split=dev", "`dev_split`: split 'dev' of '{folder}': Unknown split \"dev\""),
        ("--data.dataset={folder}_typo", "`dataset`: '{folder}_typo' is neither a folder nor a dataset reachable on"),
    ],
    ids=["split", "folder"],
)
def test_a_wrong_dataset_option_is_one_line_from_tartan(tiny_encoder, cache_dir, tmp_path, capsys, option, message):
    """As the README promises for bad data: one line naming the option, exit status 2, whether the mistake shows
    when the model is built (the train split) or when the fit starts (the dev split)."""
    folder = sentiment_folder(tmp_path / "sentiment")
    args = ["fit", f"--config={CONFIGS / 'own_task.yaml'}", f"--model.encoder_name_or_path={tiny_encoder}"]
    args += [f"--data.dataset={folder}", f"--data.cache_dir={cache_dir}", f"--trainer.default_root_dir={tmp_path}"]
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_info:  # main() quiets warnings for its process
        main([*args, *CLI_SMALL, option.format(folder=folder)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message.format(folder=folder) in err.splitlines()[-1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"data_dir": None}, "set `data_dir` (the folder of the task's files) or `dataset`"),
        ({"data_dir": __file__}, f"`data_dir`={__file__!r} is a file: it names the folder of the task's files"),
        ({"train_file": "train.xlsx"}, "`train_file`='train.xlsx': unsupported suffix '.xlsx'; the format is read"),
        ({"predict_file": "inputs.doc"}, "`predict_file`='inputs.doc': unsupported suffix '.doc'"),
        ({"dataset": "some/dataset", "train_file": "mine.csv"}, "`train_file`='mine.csv' is not read when `dataset`"),
        ({"test_split": "validation"}, "`test_split`='validation' only applies to a `dataset`"),
        ({"monitor_metric": "f2"}, "`monitor_metric` must be one of ('f1_macro', 'accuracy'), got 'f2'"),
        ({"text_pair_field": "text"}, "`text_pair_field` must differ from `text_field`"),
        ({"aux_corpora": {"hub": {"dataset": "x", "column": "y"}}}, "`aux_corpora['hub']`: unknown keys ['column']"),
        ({"aux_corpora": {"hub": {"split": "train"}}}, "`aux_corpora['hub']` needs a `dataset`"),
    ],
)
def test_option_mistakes_name_the_option(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EndTaskDataModule(**{"data_dir": ".", **options})
