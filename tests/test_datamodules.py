"""Data modules: real task data, the combined training batch, DDP sharding, caching, and bad input."""
import io
import json
import logging
import math
import re
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from jsonargparse import ArgumentParser
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import DistributedSampler
from transformers import AutoTokenizer

from datamodules import (
    ChemProtDataModule,
    CitationIntentDataModule,
    DataFormatError,
    EndTaskDataModule,
    HyperPartisanDataModule,
    SciERCDataModule,
)

REAL_TASKS = [
    # (class, folder, train / dev / test sizes, number of labels, monitored metric)
    (CitationIntentDataModule, "citation_intent", (1688, 114, 139), 6, "f1_macro"),
    (SciERCDataModule, "sciie", (3219, 455, 974), 7, "f1_macro"),
    (ChemProtDataModule, "chemprot", (4169, 2427, 3469), 13, "accuracy"),
]
SMALL = {
    "max_length": 64,
    "batch_size": 8,
    "aux_batch_size": 16,
    "dev_batch_size": 16,
    "dev_grad_batch_size": 24,
    "eval_batch_size": 32,
}


@pytest.fixture
def make(tiny_encoder, cache_dir):
    """Build a data module with the tiny tokenizer, short sequences and small batches unless overridden."""

    def make(cls=EndTaskDataModule, data_dir=".", **kwargs):
        kwargs = {"tokenizer_name_or_path": tiny_encoder, "cache_dir": cache_dir, **SMALL, **kwargs}
        return cls(data_dir=str(data_dir), **kwargs)

    return make


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected network call: {args}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def write_jsonl(path: Path, examples) -> Path:
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in examples))
    return path


def write_task(folder: Path, train=None, dev=None, test=None, corpus="a small corpus line\n") -> Path:
    """A valid three-split task with a TAPT corpus; pass a split to replace its examples."""
    folder.mkdir(parents=True, exist_ok=True)
    default = [{"text": f"example number {i}", "label": "ab"[i % 2]} for i in range(6)]
    for name, examples in (("train", train), ("dev", dev), ("test", test)):
        write_jsonl(folder / f"{name}.jsonl", default if examples is None else examples)
    (folder / "train.txt").write_text(corpus)
    return folder


# ---- real data -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "folder", "sizes", "num_labels", "metric"), REAL_TASKS)
def test_real_task_splits(make, data_root, cls, folder, sizes, num_labels, metric):
    dm = make(cls, data_root / folder, aux_corpora={})
    # what LightningCLI links into the model is there before any tokenisation
    assert dm.num_labels == num_labels
    assert dm.label_names == sorted(dm.label_names) and len(set(dm.label_names)) == num_labels
    assert dm.monitor_metric == metric
    assert dm.tokenizer is None and not dm.splits

    dm.setup()
    assert tuple(len(dm.splits[split]) for split in ("train", "dev", "test")) == sizes
    for split in ("train", "dev", "test"):
        labels = torch.tensor(dm.splits[split]["labels"])
        assert labels.min() >= 0 and labels.max() < num_labels
    # every train label is used, so the sorted vocabulary is exactly the train labels
    assert torch.tensor(dm.splits["train"]["labels"]).unique().numel() == num_labels


@pytest.mark.parametrize(("cls", "folder"), [(c, f) for c, f, *_ in REAL_TASKS])
def test_default_corpora_and_max_length(data_root, cls, folder):
    dm = cls(data_dir=str(data_root / folder))
    assert dm.aux_names == ["tapt", "dapt"]
    assert dm.aux_corpora == {"tapt": "train.txt", "dapt": "domain.1xTAPT.txt"}
    assert dm.max_length == 512


def test_combined_training_batch(make, data_root):
    dm = make(CitationIntentDataModule, data_root / "citation_intent")
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader)
    torch.manual_seed(0)
    iterator = iter(loader)
    batches = [next(iterator)[0] for _ in range(3)]

    batch = batches[0]
    assert set(batch) == {"end_task", "tapt", "dapt", "meta_dev", "meta_dev_grad"}
    sizes = {"end_task": 8, "tapt": 16, "dapt": 16, "meta_dev": 16, "meta_dev_grad": 24}
    for name, part in batch.items():
        assert type(part) is dict and set(part) == {"input_ids", "attention_mask", "labels"}
        assert part["input_ids"].shape == part["attention_mask"].shape
        assert part["input_ids"].shape[0] == sizes[name] and part["input_ids"].shape[1] <= 64
    for name in ("end_task", "meta_dev", "meta_dev_grad"):
        labels = batch[name]["labels"]
        assert labels.shape == (sizes[name],) and labels.dtype == torch.long
        assert labels.min() >= 0 and labels.max() < dm.num_labels

    tokenizer = dm.tokenizer
    special_ids = torch.tensor(tokenizer.all_special_ids)
    masked = real = replaced_by_mask = 0
    for part in (b[name] for b in batches for name in ("tapt", "dapt")):
        labels, input_ids, attention = part["labels"], part["input_ids"], part["attention_mask"]
        is_masked = labels != -100
        original = torch.where(is_masked, labels, input_ids)
        special = torch.isin(original, special_ids) | (attention == 0)
        assert not (is_masked & special).any(), "a special or pad token was masked"
        assert not is_masked[attention == 0].any()
        masked += is_masked.sum().item()
        real += (~special).sum().item()
        replaced_by_mask += (input_ids[is_masked] == tokenizer.mask_token_id).sum().item()
    assert 0.10 < masked / real < 0.20
    assert 0.7 < replaced_by_mask / masked < 0.9  # 80% [MASK], the rest random or kept


def test_epoch_is_the_longest_source_and_others_cycle(make, data_root):
    dm = make(CitationIntentDataModule, data_root / "citation_intent")
    dm.setup("fit")
    loader = dm.train_dataloader()
    iter(loader)
    lengths = {name: len(dl) for name, dl in loader.iterables.items()}
    assert lengths["end_task"] == math.ceil(1688 / 8)  # drop_last=False
    # one dev sample per training batch: the dev loaders never restart within an epoch
    assert lengths["meta_dev"] == lengths["meta_dev_grad"] == lengths["end_task"] == len(loader)


def test_no_meta_dev_and_no_corpora(make, data_root):
    dm = make(CitationIntentDataModule, data_root / "citation_intent", aux_corpora={}, include_meta_dev=False)
    assert dm.aux_names == []
    dm.setup("fit")
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert set(batch) == {"end_task"}


def test_ddp_sharding(make, data_root):
    """Two simulated ranks: end-task and corpus shards are disjoint, the dev samples are shared."""
    orders = []
    for rank in range(2):
        dm = make(CitationIntentDataModule, data_root / "citation_intent")
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        dm.setup("fit")
        loaders = dm.train_dataloader().iterables
        orders.append({name: list(dl.sampler) for name, dl in loaders.items()})

    for name in ("end_task", "tapt", "dapt"):
        first, second = orders[0][name], orders[1][name]
        assert len(first) == len(second)
        size = len(dm.splits["train"]) if name == "end_task" else len(dm.corpora[name])
        # DistributedSampler pads an odd-sized set with one repeated index
        assert len(set(first) & set(second)) == size % 2
        assert set(first) | set(second) == set(range(size))
    for name in ("meta_dev", "meta_dev_grad"):
        assert orders[0][name] == orders[1][name]


@pytest.mark.parametrize(("name", "size"), [("meta_dev", 16), ("meta_dev_grad", 24)])
def test_dev_samples_are_fresh_for_every_batch(make, data_root, name, size):
    """As the paper draws them: each sample without repeats, each batch a new draw, the two samples independent."""
    dm = make(CitationIntentDataModule, data_root / "citation_intent", dev_batch_size=16, dev_grad_batch_size=24)
    dm.setup("fit")
    loaders = dm.train_dataloader().iterables
    indices = list(loaders[name].sampler)
    samples = [indices[i : i + size] for i in range(0, len(indices), size)]
    assert all(len(set(sample)) == size for sample in samples)
    assert len({tuple(sorted(sample)) for sample in samples}) == len(samples)  # no sample comes back
    assert set(indices) == set(range(114))
    other = list(loaders["meta_dev_grad" if name == "meta_dev" else "meta_dev"].sampler)
    assert indices[:16] != other[:16]
    sampler = loaders[name].sampler
    sampler.set_epoch(1)
    assert list(sampler) != indices


def test_dev_samples_smaller_split_than_sample_draw_with_replacement(make, data_root):
    dm = make(CitationIntentDataModule, data_root / "citation_intent", dev_grad_batch_size=200)
    dm.setup("fit")
    indices = list(dm.train_dataloader().iterables["meta_dev_grad"].sampler)
    assert len(indices) % 200 == 0 and set(indices) <= set(range(114))


def test_seed_follows_the_run_seed_unless_given(make, data_root, monkeypatch):
    """`seed_everything` (`tartan --seed_everything`) drives data order and dev samples; an explicit seed wins;
    a checkpoint's seed (``state_dict``) wins over both, so a resumed run continues its own order."""

    def orders(**kwargs):
        dm = make(CitationIntentDataModule, data_root / "citation_intent", **kwargs)
        dm.setup("fit")
        return dm, {name: list(dl.sampler)[:48] for name, dl in dm.train_dataloader().iterables.items()}

    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    dm1, seed1 = orders()
    monkeypatch.setenv("PL_GLOBAL_SEED", "2")
    _, seed2 = orders()
    assert all(seed1[name] != seed2[name] for name in seed1)
    _, explicit = orders(seed=1)
    assert explicit == seed1

    resumed = make(CitationIntentDataModule, data_root / "citation_intent")
    resumed.setup("fit")
    resumed.load_state_dict(dm1.state_dict())
    assert {name: list(dl.sampler)[:48] for name, dl in resumed.train_dataloader().iterables.items()} == seed1


def test_training_order_is_reproducible_per_epoch(make, data_root):
    dm = make(CitationIntentDataModule, data_root / "citation_intent", aux_corpora={})
    dm.setup("fit")
    sampler = dm.train_dataloader().iterables["end_task"].sampler
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == epoch0 != epoch1
    fresh = make(CitationIntentDataModule, data_root / "citation_intent", aux_corpora={})
    fresh.setup("fit")
    assert list(fresh.train_dataloader().iterables["end_task"].sampler) == epoch0


def test_new_iterators_leave_the_global_rng_alone(make, data_root):
    """Dropout and masking draw from the global RNG, which a resumed run restores: iterators must not draw."""
    dm = make(CitationIntentDataModule, data_root / "citation_intent")
    dm.setup("fit")
    state = torch.get_rng_state()
    iter(dm.train_dataloader())
    next(iter(dm.val_dataloader()))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(("split", "loader_fn"), [("dev", "val_dataloader"), ("test", "test_dataloader")])
def test_eval_loaders_follow_file_order(make, data_root, split, loader_fn):
    folder = data_root / "citation_intent"
    dm = make(CitationIntentDataModule, folder, aux_corpora={})
    dm.setup("validate" if split == "dev" else "test")
    batches = list(getattr(dm, loader_fn)())
    assert type(batches[0]) is dict and batches[0]["input_ids"].shape[0] == 32

    examples = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert labels == [dm.label_names.index(e["label"]) for e in examples]
    expected = dm.tokenizer(examples[0]["text"], truncation=True, max_length=64)["input_ids"]
    first = batches[0]["input_ids"][0][batches[0]["attention_mask"][0].bool()]
    assert first.tolist() == expected


def test_second_setup_is_served_from_cache(tiny_encoder, data_root, tmp_path):
    def setup(max_length):
        dm = CitationIntentDataModule(
            data_dir=str(data_root / "citation_intent"),
            tokenizer_name_or_path=tiny_encoder,
            max_length=max_length,
            cache_dir=str(tmp_path),
        )
        start = time.perf_counter()
        dm.setup("fit")
        datasets = [*dm.splits.values(), *dm.corpora.values()]
        files = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.arrow")}
        return time.perf_counter() - start, [d.cache_files for d in datasets], files

    cold, cold_caches, cold_files = setup(64)
    warm, warm_caches, warm_files = setup(64)
    assert warm_caches == cold_caches
    assert warm_files == cold_files  # nothing written, nothing rewritten
    assert warm < cold
    # the tokenised cache is keyed on max_length (and the tokenizer): another length is tokenised anew
    _, other_caches, other_files = setup(32)
    assert other_files.keys() > warm_files.keys()
    assert not {f["filename"] for c in other_caches for f in c} & {f["filename"] for c in warm_caches for f in c}


@pytest.mark.parametrize(("cls", "folder"), [(c, f) for c, f, *_ in REAL_TASKS])
def test_prepare_data_makes_no_network_call_when_files_exist(data_root, no_network, cls, folder):
    cls(data_dir=str(data_root / folder)).prepare_data()


def test_prepare_data_downloads_missing_files(tmp_path, monkeypatch):
    examples = [{"text": f"article {i} " * 5, "label": "true" if i % 2 else "false"} for i in range(4)]
    body = "".join(json.dumps(e) + "\n" for e in examples).encode()
    fetched = []

    def fake_urlopen(url, timeout=None):
        fetched.append(url)
        return io.BytesIO(body)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    dm = HyperPartisanDataModule(data_dir=str(tmp_path / "hyperpartisan"))
    dm.prepare_data()
    base = "https://allennlp.s3-us-west-2.amazonaws.com/dont_stop_pretraining/data/hyperpartisan_news"
    assert fetched == [f"{base}/{split}.jsonl" for split in ("train", "dev", "test")]
    assert sorted(p.name for p in (tmp_path / "hyperpartisan").iterdir()) == [
        "dev.jsonl",
        "test.jsonl",
        "train.jsonl",
        "train.txt",
    ]
    assert (tmp_path / "hyperpartisan" / "train.txt").read_text().splitlines() == [
        " ".join(e["text"].split()) for e in examples
    ]


def test_hyperpartisan_format(make, tmp_path, no_network):
    long_text = "the senator said that " * 400  # about 2000 tokens
    train = [
        {"text": long_text if i % 2 else f"short piece {i}", "label": "true" if i % 3 else "false"} for i in range(9)
    ]
    folder = tmp_path / "hyperpartisan"
    folder.mkdir()
    for split in ("train", "dev", "test"):
        write_jsonl(folder / f"{split}.jsonl", train)
    dm = make(HyperPartisanDataModule, folder, max_length=None)
    assert dm.max_length == 512 and dm.monitor_metric == "f1_macro"
    assert dm.label_names == ["false", "true"] and dm.num_labels == 2

    dm.prepare_data()  # derives the TAPT corpus from the training articles
    assert len((folder / "train.txt").read_text().splitlines()) == len(train)
    dm.setup("fit")
    lengths = [len(ids) for ids in dm.splits["train"]["input_ids"]]
    assert max(lengths) == 512 and min(lengths) < 16
    assert max(len(ids) for ids in dm.corpora["tapt"]["input_ids"]) == 512
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert set(batch) == {"end_task", "tapt", "meta_dev", "meta_dev_grad"}


def test_config_builds_from_yaml_like_dict(data_root):
    """LightningCLI builds data modules through jsonargparse from the type hints; data_dir stays required."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ChemProtDataModule, "data")
    with pytest.raises(Exception, match="data_dir"):
        parser.parse_object({"data": {}})
    config = {"data_dir": str(data_root / "chemprot"), "aux_corpora": {"tapt": "train.txt"}, "max_length": 128}
    dm = parser.instantiate_classes(parser.parse_object({"data": config})).data
    assert isinstance(dm, ChemProtDataModule)
    assert (dm.aux_names, dm.max_length, dm.num_labels, dm.monitor_metric) == (["tapt"], 128, 13, "accuracy")


class BatchProbe(LightningModule):
    """Stands in for the TARTAN module: checks what the Trainer hands over."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_keys, self.val_keys = set(), set()

    def training_step(self, batch, batch_idx):
        self.train_keys |= set(batch)
        return self.weight * sum(part["input_ids"].float().mean() for part in batch.values())

    def validation_step(self, batch, batch_idx):
        self.val_keys |= set(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_keeps_our_samplers_and_sets_their_epoch(make, tmp_path):
    examples = [{"text": f"example number {i}", "label": "ab"[i % 2]} for i in range(40)]
    folder = write_task(tmp_path / "task", train=examples, corpus="".join(f"doc {i}\n" for i in range(30)))
    dm = make(data_dir=folder, batch_size=4, aux_batch_size=4, dev_batch_size=2)
    model = BatchProbe()
    trainer = Trainer(
        max_epochs=2, limit_val_batches=1, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert model.train_keys == {"end_task", "tapt", "meta_dev", "meta_dev_grad"}
    assert model.val_keys == {"input_ids", "attention_mask", "labels"}
    assert trainer.global_step == 2 * math.ceil(40 / 4)  # an epoch is the longest source
    for name, loader in trainer.train_dataloader.items():
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.epoch == 1, name


# ---- options and bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("batch_size", 0),
        ("aux_batch_size", 0),
        ("dev_batch_size", -1),
        ("dev_grad_batch_size", 0),
        ("eval_batch_size", 0),
        ("mlm_probability", 0.0),
        ("mlm_probability", 1.0),
        ("max_length", 4),
        ("num_workers", -1),
        ("aux_corpora", {"meta_dev": "train.txt"}),
        ("aux_corpora", {"meta_dev_grad": "train.txt"}),
    ],
)
def test_invalid_options_name_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        EndTaskDataModule(data_dir=".", **{option: value})


BAD_SPLITS = [
    # (which file, its lines, what the message must say besides the path)
    ("train", [], "is empty"),
    ("train", ['{"text": "fine", "label": "a"}', '{"text": "broken", "label": }'], ":2: malformed JSON"),
    ("train", ['{"label": "a"}'], ":1: no 'text'"),
    ("dev", ['{"text": "fine", "label": "a"}', "", '{"text": "no label"}'], ":3: no 'label'"),
    ("train", ['{"text": "fine", "label": "a"}', '{"text": "  \\t ", "label": "a"}'], ":2: 'text' is empty"),
    ("test", ['{"text": "", "label": "a"}'], ":1: 'text' is empty"),
    ("dev", ['{"text": "fine", "label": "a"}', '{"text": "unseen", "label": "zzz"}'], ":2: label 'zzz' never occurs"),
    ("test", ["", "  "], "holds no examples"),
]


@pytest.mark.parametrize(("split", "lines", "message"), BAD_SPLITS)
def test_bad_labeled_file_is_reported_with_file_and_line(make, tmp_path, split, lines, message):
    folder = write_task(tmp_path / "task")
    path = folder / f"{split}.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    dm = make(data_dir=folder, aux_corpora={})
    with pytest.raises(DataFormatError) as error:
        dm.setup()
    assert f"{path}" in str(error.value) and message in str(error.value)


@pytest.mark.parametrize("missing", ["train.jsonl", "dev.jsonl", "train.txt"])
def test_missing_file_is_reported_with_its_path(make, tmp_path, missing):
    folder = write_task(tmp_path / "task")
    (folder / missing).unlink()
    dm = make(data_dir=folder, aux_corpora={"extra": "train.txt"})  # not "tapt", which prepare_data derives
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError, match=re.escape(str(folder / missing))):
            step()


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_corpus_without_usable_lines_is_reported(make, tmp_path, content):
    folder = write_task(tmp_path / "task", corpus=content)
    dm = make(data_dir=folder)
    with pytest.raises(DataFormatError, match=re.escape(str(folder / "train.txt"))):
        dm.setup("fit")


def test_blank_corpus_lines_are_skipped_and_counted(make, tmp_path, caplog):
    folder = write_task(tmp_path / "task", corpus="first doc\n\n   \nsecond doc\n\n")
    dm = make(data_dir=folder)
    with caplog.at_level(logging.INFO, logger="datamodules"):
        dm.setup("fit")
    assert len(dm.corpora["tapt"]) == 2
    assert f"Skipped 3 blank lines in {folder / 'train.txt'}" in caplog.text


def test_custom_corpora_resolve_in_data_dir_or_absolute(make, tmp_path):
    folder = write_task(tmp_path / "task")
    elsewhere = tmp_path / "other.txt"
    elsewhere.write_text("one\ntwo\nthree\n")
    dm = make(data_dir=folder, aux_corpora={"mine": "train.txt", "theirs": str(elsewhere)})
    assert dm.aux_names == ["mine", "theirs"]
    dm.setup("fit")
    assert len(dm.corpora["mine"]) == 1 and len(dm.corpora["theirs"]) == 3
    tokenizer = AutoTokenizer.from_pretrained(dm.tokenizer_name_or_path)
    assert dm.corpora["theirs"][0]["input_ids"] == tokenizer("one")["input_ids"]
