"""Data modules: real task data, the combined training batch, DDP sharding, caching, and bad input."""
import io
import json
import logging
import math
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from jsonargparse import ArgumentParser
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
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
from lightning_tartan import TartanModule

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


def same_batches(first: dict, second: dict) -> bool:
    """Two training batches hold the same sources with equal tensors."""

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)

    return first.keys() == second.keys() and all(same(first[name], second[name]) for name in first)


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


def test_accumulation_groups_the_very_micro_batches_of_a_step_into_one_training_batch(make, data_root):
    """With accumulate_grad_batches=2 a training batch is one optimizer step: each source holds the two batches the
    loader would serve one by one without accumulation (same rows, padding and MLM masks), and the epoch's last step
    holds what is left."""
    plain = make(CitationIntentDataModule, data_root / "citation_intent")
    grouped = make(CitationIntentDataModule, data_root / "citation_intent", accumulate_grad_batches=2)
    for dm in (plain, grouped):
        dm.setup("fit")
    singles = [batch for batch, _, _ in plain.train_dataloader()]
    steps = [batch for batch, _, _ in grouped.train_dataloader()]
    assert len(singles) == 211 and len(steps) == 106  # 1,688 training examples in batches of 8
    for index, step in enumerate(steps):
        counts = {name: len(micro_batches) for name, micro_batches in step.items()}
        expected = 2 if index < 105 else 1
        assert counts == dict.fromkeys(singles[0], expected)
        for offset in range(expected):
            micro_batch = {name: micro_batches[offset] for name, micro_batches in step.items()}
            assert same_batches(micro_batch, singles[2 * index + offset])


def grouped_epoch(make, data_root, group_by_length: bool, **kwargs) -> tuple[dict, dict]:
    """One epoch of ACL-ARC's end task and TAPT corpus at max_length 128: each source's sampler items and batches."""
    dm = make(CitationIntentDataModule, data_root / "citation_intent", max_length=128, aux_corpora={"tapt": "train.txt"},
              include_meta_dev=False, group_by_length=group_by_length, **kwargs)  # fmt: skip
    dm.setup("fit")
    loaders = dm.train_dataloader().iterables
    return {name: list(dl.sampler) for name, dl in loaders.items()}, {name: list(dl) for name, dl in loaders.items()}


def padded_positions(batches: list[dict]) -> int:
    """Rows x padded length, summed over the batches: the positions the encoder computes."""
    return sum(batch["input_ids"].numel() for batch in batches)


def test_group_by_length_keeps_every_row_and_cuts_padding(make, data_root):
    """Grouped, an epoch holds the same rows (the corpus's MLM mask keys at the same positions) in batches of
    similar lengths, longest first: 43% fewer padded positions for the end task and 51% for TAPT when measured."""
    plain_items, plain = grouped_epoch(make, data_root, group_by_length=False)
    grouped_items, grouped = grouped_epoch(make, data_root, group_by_length=True)
    plain_tapt, grouped_tapt = zip(*plain_items["tapt"]), zip(*grouped_items["tapt"])
    (plain_rows, plain_keys), (grouped_rows, grouped_keys) = plain_tapt, grouped_tapt
    assert grouped_keys == plain_keys
    assert sorted(grouped_rows) == sorted(plain_rows) and grouped_rows != plain_rows
    assert sorted(grouped_items["end_task"]) == sorted(plain_items["end_task"]) == list(range(1688))
    for name in ("end_task", "tapt"):
        assert len(grouped[name]) == len(plain[name]) == 211
        for batch in grouped[name]:
            lengths = batch["attention_mask"].sum(1)
            assert torch.equal(lengths, lengths.sort(descending=True).values)
        assert padded_positions(grouped[name]) < 0.7 * padded_positions(plain[name])


def test_group_by_length_pairs_other_rows_every_epoch(make, data_root):
    """A small epoch (27 batches of 64) is sorted in four runs, not whole. Sorted whole, every epoch would cut the
    same length-ordered rows into nearly the same batches: a row would share 76% of its batch-mates with the last
    epoch (measured); in four runs it shares 17%."""
    dm = make(CitationIntentDataModule, data_root / "citation_intent", batch_size=64, aux_corpora={},
              include_meta_dev=False, group_by_length=True)  # fmt: skip
    dm.setup("fit")
    sampler = dm.train_dataloader().iterables["end_task"].sampler

    def batch_mates(epoch: int) -> dict[int, set[int]]:
        indices = sampler.epoch_indices(epoch)
        batches = [set(indices[start : start + 64]) for start in range(0, len(indices), 64)]
        return {row: batch - {row} for batch in batches for row in batch}

    before, after = batch_mates(0), batch_mates(1)
    shared = [len(before[row] & after[row]) / len(before[row]) for row in before if before[row]]
    assert sum(shared) / len(shared) < 0.3


def test_group_by_length_never_puts_a_short_corpus_rows_copies_in_one_batch(make, data_root, tmp_path):
    """A 40-line corpus makes many passes in an epoch of the end task; sorted across passes, a row's copies would sit
    side by side (up to 11 in a batch of 16 when measured). Sorted pass by pass, no batch holds a row twice."""
    short = tmp_path / "short.txt"
    short.write_text("".join("word " * (i + 1) + f"document {i}\n" for i in range(40)))  # distinct lengths
    dm = make(CitationIntentDataModule, data_root / "citation_intent", batch_size=16, aux_corpora={"short": str(short)},
              include_meta_dev=False, group_by_length=True)  # fmt: skip
    dm.setup("fit")
    indices = [index for index, _ in dm.train_dataloader().iterables["short"].sampler]
    batches = [indices[start : start + 16] for start in range(0, len(indices), 16)]
    assert len(batches) == 106 and all(len(set(batch)) == len(batch) for batch in batches)


def test_group_by_length_with_accumulation_cuts_each_step_into_valid_micro_batches(make, data_root):
    """A loader batch is the step's rows (16 of the end task, 32 of TAPT), sorted longest first and cut into two
    micro-batches of the source's batch size, each padded to its own longest row; the epoch's last step holds one."""
    items, grouped = grouped_epoch(make, data_root, group_by_length=True, accumulate_grad_batches=2)
    assert sorted(items["end_task"]) == list(range(1688))
    for name, size in (("end_task", 8), ("tapt", 16)):
        steps = grouped[name]
        assert len(steps) == 106 and [len(step) for step in steps] == [2] * 105 + [1]
        for step in steps:
            for micro_batch in step:
                assert micro_batch["input_ids"].shape[0] == size
                assert micro_batch["attention_mask"][:, -1].any()  # no column of padding only
            lengths = torch.cat([micro_batch["attention_mask"].sum(1) for micro_batch in step])
            assert torch.equal(lengths, lengths.sort(descending=True).values)


def test_epoch_is_the_longest_source_and_shorter_ones_reshuffle_for_every_pass(make, data_root, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("".join(f"document {i}\n" for i in range(40)))
    corpora = {"tapt": "train.txt", "short": str(short)}
    dm = make(CitationIntentDataModule, data_root / "citation_intent", aux_corpora=corpora)
    dm.setup("fit")
    loader = dm.train_dataloader()
    iter(loader)
    lengths = {name: len(dl) for name, dl in loader.iterables.items()}
    assert lengths["end_task"] == math.ceil(1688 / 8)  # drop_last=False
    # one batch of every source and one dev sample per training batch: no loader restarts within an epoch
    assert set(lengths.values()) == {len(loader)}
    assert len(list(loader.iterables["end_task"].sampler)) == 1688  # the longest source: one pass, nothing repeated
    indices = [index for index, _ in loader.iterables["short"].sampler]
    assert len(indices) == len(loader) * 16  # full batches of 16 from one pass after another
    passes = [indices[start : start + 40] for start in range(0, len(indices) - 40, 40)]
    assert all(sorted(one) == list(range(40)) for one in passes)
    assert len({tuple(one) for one in passes}) == len(passes)  # each pass in a new order


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
        # a corpus sampler pairs each index with its masking key
        orders.append({name: [i[0] if name in dm.corpora else i for i in dl.sampler] for name, dl in loaders.items()})

    for name in ("end_task", "tapt", "dapt"):
        size = len(dm.splits["train"]) if name == "end_task" else len(dm.corpora[name])
        shard = math.ceil(size / 2)
        assert len(orders[0][name]) == len(orders[1][name]) >= shard
        first, second = orders[0][name][:shard], orders[1][name][:shard]  # one pass; a shorter source makes more
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
    dm = HyperPartisanDataModule(data_dir=str(tmp_path / "hyperpartisan"), cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    base = "https://allennlp.s3-us-west-2.amazonaws.com/dont_stop_pretraining/data/hyperpartisan_news"
    assert fetched == [f"{base}/{split}.jsonl" for split in ("train", "dev", "test")]
    assert sorted(p.name for p in (tmp_path / "hyperpartisan").iterdir()) == ["dev.jsonl", "test.jsonl", "train.jsonl"]
    # the TAPT corpus is derived data: it goes to the cache, not into the data folder
    tapt = dm.corpus_file("tapt")
    assert tapt.is_relative_to(tmp_path / "cache")
    assert tapt.read_text().splitlines() == [" ".join(e["text"].split()) for e in examples]


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
    assert len(dm.corpus_file("tapt").read_text().splitlines()) == len(train)
    dm.setup("fit")
    lengths = [len(ids) for ids in dm.splits["train"]["input_ids"]]
    assert max(lengths) == 512 and min(lengths) < 16
    assert max(len(ids) for ids in dm.corpora["tapt"]["input_ids"]) == 512
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert set(batch) == {"end_task", "tapt", "meta_dev", "meta_dev_grad"}


def test_config_builds_from_yaml_like_dict(data_root):
    """LightningCLI builds data modules through jsonargparse from the type hints; a task needs its data_dir (or a
    dataset), named when neither is given."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ChemProtDataModule, "data")
    with pytest.raises(ValueError, match="`data_dir`.*`dataset`"):
        parser.instantiate_classes(parser.parse_object({"data": {}}))
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


class BatchRecorder(BatchProbe):
    """Keeps every training batch it is handed."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch)
        return super().training_step(batch, batch_idx)


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


def test_overfit_batches_serves_the_same_batches_every_epoch(make, tmp_path):
    """Lightning's `overfit_batches` swaps our samplers for sequential ones; the corpus batches keep their masks."""
    examples = [{"text": f"example number {i}", "label": "ab"[i % 2]} for i in range(40)]
    corpus = "".join(f"doc {i} of the corpus\n" for i in range(30))
    folder = write_task(tmp_path / "task", train=examples, corpus=corpus)
    dm = make(data_dir=folder, batch_size=4, aux_batch_size=4, dev_batch_size=2)
    model = BatchRecorder()
    trainer = Trainer(
        max_epochs=2, overfit_batches=2, limit_val_batches=0, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert len(model.seen) == 4
    assert same_batches(model.seen[0], model.seen[2]) and same_batches(model.seen[1], model.seen[3])
    assert (model.seen[0]["tapt"]["labels"] != -100).any()


# ---- resuming and MLM masks ------------------------------------------------------------------------------


@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_loaders_resume_where_they_stopped(make, data_root, tmp_path, num_workers, group_by_length):
    """What Lightning does with a mid-epoch checkpoint: each loader's state is saved, then loaded into a new data
    module's loaders before the epoch is set. Every source, both dev samples and the MLM masks continue exactly,
    in a later epoch and across a short corpus's passes, with or without length grouping."""
    short = tmp_path / "short.txt"
    short.write_text("".join(f"short document {i}\n" for i in range(20)))  # more than one pass per batch of 16

    def loader() -> CombinedLoader:
        corpora = {"tapt": "train.txt", "short": str(short)}
        dm = make(CitationIntentDataModule, data_root / "citation_intent", aux_corpora=corpora, num_workers=num_workers,
                  group_by_length=group_by_length)  # fmt: skip
        dm.setup("fit")
        return dm.train_dataloader()

    def set_epoch(combined: CombinedLoader, epoch: int) -> None:
        for dl in combined.flattened:
            dl.sampler.set_epoch(epoch)

    original = loader()
    set_epoch(original, 1)
    batches = iter(original)
    for _ in range(3):
        next(batches)
    states = [dl.state_dict() for dl in original.flattened]
    expected = [next(batches)[0] for _ in range(3)]

    resumed = loader()
    for dl, state in zip(resumed.flattened, states):
        dl.load_state_dict(state)
    batches = iter(resumed)
    set_epoch(resumed, 1)
    actual = [next(batches)[0] for _ in range(3)]
    assert set(actual[0]) == {"end_task", "tapt", "short", "meta_dev", "meta_dev_grad"}
    assert all(same_batches(a, e) for a, e in zip(actual, expected))


def small_task(tmp_path: Path) -> Path:
    """40 labeled examples (10 batches of 4) and a 30-document TAPT corpus."""
    examples = [{"text": f"example number {i}", "label": "ab"[i % 2]} for i in range(40)]
    return write_task(tmp_path / "task", train=examples, corpus="".join(f"doc {i}\n" for i in range(30)))


def record_batches(dm, max_steps: int, checkpoint_every: int, checkpoint_dir: Path, ckpt_path=None) -> BatchRecorder:
    """Fit a `BatchRecorder` on `dm` (resuming from `ckpt_path`), writing `checkpoints/step.ckpt` every
    `checkpoint_every` steps; the recorder holds the batches it was handed."""
    checkpoint = ModelCheckpoint(checkpoint_dir / "checkpoints", filename="step", every_n_train_steps=checkpoint_every)
    trainer = Trainer(
        max_steps=max_steps, limit_val_batches=0, accelerator="cpu", logger=False, callbacks=[checkpoint],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    model = BatchRecorder()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def test_resume_from_a_checkpoint_at_the_end_of_an_epoch_starts_the_next_epoch(make, tmp_path):
    """Lightning restores the loaders of an end-of-epoch checkpoint and builds no new iterator for the next epoch:
    restored at their end, they start it themselves."""
    folder = small_task(tmp_path)

    def fit(ckpt_path=None) -> BatchRecorder:
        dm = make(data_dir=folder, batch_size=4, aux_batch_size=4, dev_batch_size=2, dev_grad_batch_size=2)
        return record_batches(dm, max_steps=13, checkpoint_every=10, checkpoint_dir=tmp_path, ckpt_path=ckpt_path)

    uninterrupted = fit()
    assert len(uninterrupted.seen) == 13  # an epoch is 10 batches: the checkpoint is the first epoch's last step
    resumed = fit(tmp_path / "checkpoints" / "step.ckpt")
    assert len(resumed.seen) == 3
    assert all(same_batches(a, e) for a, e in zip(resumed.seen, uninterrupted.seen[10:]))


def test_each_rank_resumes_its_own_shard_from_rank_zeros_loader_states(make, data_root):
    """Under DDP only rank 0 writes the checkpoint, so every rank loads rank 0's loader states."""

    def loader(rank: int) -> CombinedLoader:
        dm = make(CitationIntentDataModule, data_root / "citation_intent")
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        dm.setup("fit")
        return dm.train_dataloader()

    rank0, rank1 = loader(0), loader(1)
    batches0, batches1 = iter(rank0), iter(rank1)
    for _ in range(3):
        next(batches0), next(batches1)
    states = [dl.state_dict() for dl in rank0.flattened]
    expected = [next(batches1)[0] for _ in range(2)]

    resumed = loader(1)
    for dl, state in zip(resumed.flattened, states):
        dl.load_state_dict(state)
    batches = iter(resumed)
    assert all(same_batches(next(batches)[0], batch) for batch in expected)


def test_repeated_texts_are_reported_and_kept(make, tmp_path, caplog):
    """A text under two labels in train, and dev texts seen in training (ACL-ARC's published splits have both):
    said in a line each, since dev and test scores on them measure memory; nothing is dropped."""
    train = [{"text": "same words", "label": "a"}, {"text": "same words", "label": "b"}]
    train += [{"text": f"other {i}", "label": "ab"[i % 2]} for i in range(4)]
    dev = [{"text": "other 1", "label": "b"}, {"text": "new text", "label": "a"}]
    folder = write_task(tmp_path / "task", train=train, dev=dev, test=[{"text": "fresh", "label": "a"}])
    dm = make(data_dir=folder, aux_corpora={})
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert "train.jsonl: 2 examples (lines 1, 2) share their text with an example of another label" in caplog.text
    assert "dev.jsonl: 1 of 2 examples (line 1) repeat a text of the train split" in caplog.text
    assert not any("test.jsonl" in line and "repeat" in line for line in caplog.text.splitlines())
    assert (len(dm.splits["train"]), len(dm.splits["dev"])) == (6, 2)


def test_resume_under_another_num_workers_keeps_the_checkpoints(make, tmp_path, caplog):
    """A loader's saved position only loads into as many workers as it had; batches do not depend on the number."""
    folder = small_task(tmp_path)

    def fit(num_workers: int, ckpt_path=None) -> BatchRecorder:
        dm = make(data_dir=folder, batch_size=4, aux_batch_size=4, dev_batch_size=2, num_workers=num_workers)
        return record_batches(dm, max_steps=6, checkpoint_every=4, checkpoint_dir=tmp_path, ckpt_path=ckpt_path)

    uninterrupted = fit(num_workers=0)
    with caplog.at_level(logging.INFO):
        resumed = fit(num_workers=2, ckpt_path=tmp_path / "checkpoints" / "step.ckpt")
    assert all(same_batches(a, e) for a, e in zip(resumed.seen, uninterrupted.seen[4:], strict=True))
    assert "num_workers=0" in caplog.text


def test_mlm_masks_follow_seed_epoch_and_batch_not_process_rng_or_workers(make, data_root, tmp_path):
    """A corpus of one sentence repeated: whatever differs between its batches is masking."""
    same = tmp_path / "same.txt"
    same.write_text("the same sentence about citing related work, once more\n" * 64)

    def masked(seed=0, epoch=0, num_workers=0, global_seed=0) -> list[dict]:
        corpora = {"same": str(same)}
        dm = make(CitationIntentDataModule, data_root / "citation_intent", aux_corpora=corpora, include_meta_dev=False,
                  seed=seed, num_workers=num_workers)  # fmt: skip
        dm.setup("fit")
        loader = dm.train_dataloader()
        for dl in loader.flattened:
            dl.sampler.set_epoch(epoch)
        torch.manual_seed(global_seed)
        batches = iter(loader)
        return [next(batches)[0]["same"] for _ in range(2)]

    first, second = masked()
    assert not torch.equal(first["labels"], second["labels"])  # a new mask for every batch
    for same_masks in (masked(global_seed=1), masked(num_workers=2)):
        assert same_batches({"same": same_masks[0]}, {"same": first})
        assert same_batches({"same": same_masks[1]}, {"same": second})
    for other in (masked(seed=1), masked(epoch=1)):
        assert not torch.equal(other[0]["labels"], first["labels"])


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
    ("train", ['{"text": "fine", "label": "a"}', '{"text": null, "label": "a"}'], ":2: 'text' must be a string"),
    ("test", ['{"text": ["a", "list"], "label": "a"}'], ":1: 'text' must be a string"),
    ("train", ['{"text": "", "label": "a"}', '{"text": " ", "label": "b"}'], "holds no example with text"),
    ("dev", ['{"text": "fine", "label": "a"}', '{"text": "unseen", "label": "zzz"}'], ":2: label 'zzz' never occurs"),
    ("test", ["", "  "], "holds no examples"),
    ("train", ['{"text": "fine", "label": 1.5}'], ":1: 'label' must be a non-empty string, an integer or a boolean, "
     "got 1.5 (a task gives each example one class: no regression)"),
    ("train", ['{"text": "fine", "label": ["a", "b"]}'], 'got ["a", "b"] (a task gives each example one class: no '
     "multi-label)"),
    ("dev", ['{"text": "fine", "label": true}'], ":1: label 'true' never occurs in the train split"),
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
    """The count is printed as Lightning prints its notes, with no logging set up by the user."""
    folder = write_task(tmp_path / "task", corpus="first doc\n\n   \nsecond doc\n\n")
    dm = make(data_dir=folder)
    dm.setup("fit")  # no caplog.at_level: only what a run shows by default is captured
    assert len(dm.corpora["tapt"]) == 2
    assert f"{folder / 'train.txt'}: 3 blank lines skipped" in caplog.text


def test_texts_and_documents_cut_at_max_length_are_counted(make, tmp_path, caplog):
    """Truncation loses a long document's end: each source says how many of its rows reach max_length."""
    long_text = " ".join(f"word{i}" for i in range(200))
    train = [{"text": long_text if i == 0 else f"example {i}", "label": "ab"[i % 2]} for i in range(6)]
    folder = write_task(tmp_path / "task", train=train, corpus=f"short doc\n{long_text}\n{long_text}\nshort\n")
    dm = make(data_dir=folder, max_length=16)
    dm.setup("fit")
    cut = "1 of 6 texts reach max_length=16 tokens, where longer ones are cut"
    assert f"{folder / 'train.jsonl'}: {cut}" in caplog.text
    assert "train.txt: 2 of 4 documents reach max_length=16 tokens" in caplog.text
    assert "dev.jsonl" not in caplog.text  # nothing cut there: no line


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


def test_empty_texts_are_dropped_from_train_and_kept_in_evaluation_splits(make, tmp_path, caplog):
    """An empty training text teaches nothing; an evaluation example left out would change the metric."""
    examples = [{"text": f"example number {i}", "label": "ab"[i % 2]} for i in range(6)]
    train = [*examples[:2], {"text": "", "label": "a"}, *examples[2:4], {"text": " \t ", "label": "b"}, *examples[4:]]
    dev = [*examples[:3], {"text": "", "label": "b"}]
    folder = write_task(tmp_path / "task", train=train, dev=dev)
    dm = make(data_dir=folder, aux_corpora={})
    with caplog.at_level(logging.INFO):
        dm.setup()
    assert [len(dm.splits[split]) for split in ("train", "dev", "test")] == [6, 4, 6]
    tokenizer = dm.tokenizer
    assert dm.splits["dev"][3] == {
        "input_ids": [tokenizer.cls_token_id, tokenizer.sep_token_id],
        "attention_mask": [1, 1],
        "labels": dm.label_names.index("b"),
    }
    reports = [record.getMessage() for record in caplog.records if "empty text" in record.getMessage()]
    assert reports == [
        f"{folder / 'train.jsonl'}: 2 examples with empty text (lines 3, 6) dropped: there is nothing to learn from",
        f"{folder / 'dev.jsonl'}: 1 example with empty text (line 4) kept as an empty input",
    ]


def test_hyperpartisan_dev_split_with_an_empty_article_loads(make, tmp_path, no_network, caplog):
    """The published dev split has an article with empty text (dev.jsonl line 22, id 432); it is scored like any."""
    articles = [{"id": i, "text": f"article {i} on the election", "label": ["false", "true"][i % 2]} for i in range(30)]
    dev = [*articles[:21], {"id": 432, "text": "", "label": "false"}, *articles[21:]]
    folder = write_task(tmp_path / "hyperpartisan", train=articles, dev=dev, test=articles)
    dm = make(HyperPartisanDataModule, folder)
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
        dm.setup()
    assert len(dm.splits["dev"]) == len(dev)
    assert dm.splits["dev"][21]["input_ids"] == [dm.tokenizer.cls_token_id, dm.tokenizer.sep_token_id]
    assert f"{folder / 'dev.jsonl'}: 1 example with empty text (line 22) kept as an empty input" in caplog.text
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == len(dev)


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_non_utf8_split_is_reported_with_file_and_line(make, tmp_path, split):
    folder = write_task(tmp_path / "task")
    path = folder / f"{split}.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = '{"text": "caf\u00e9 au lait", "label": "a"}\n'.encode("latin-1")  # Latin-1, not UTF-8
    path.write_bytes(b"".join(lines))
    dm = make(data_dir=folder, aux_corpora={})
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:3: ") + ".*UTF-8.*0xe9"):
        dm.setup("fit")


def test_non_utf8_corpus_is_reported_with_file_and_line(make, tmp_path):
    folder = write_task(tmp_path / "task")
    path = folder / "train.txt"
    path.write_bytes(b"first document\nsecond document\n\nthe third \xff\xfe document\nfourth\n")
    dm = make(data_dir=folder)
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:4: ") + ".*UTF-8.*0xff"):
        dm.setup("fit")


def test_a_byte_order_mark_is_not_part_of_the_first_text(make, tmp_path, monkeypatch):
    """Windows editors start UTF-8 files with a byte-order mark: JSON lines, corpora and predict files read as
    without one. The tokenizer here keeps every character (as RoBERTa's byte-level BPE does; BERT's drops it), so a
    mark left in a text would show as an unknown token."""
    from tokenizers import normalizers

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("\ufeffa text to label\n")
    (tmp_path / "plain.txt").write_text("a text to label\n")
    tokenized = {}
    for name, mark in (("plain", ""), ("marked", "\ufeff")):
        folder = write_task(tmp_path / name, corpus=f"{mark}a small corpus line\n")
        for split in ("train", "dev", "test"):
            path = folder / f"{split}.jsonl"
            path.write_text(mark + path.read_text())
        dm = make(data_dir=folder, predict_file="mine.txt" if mark else "plain.txt")
        dm.tokenizer = AutoTokenizer.from_pretrained(dm.tokenizer_name_or_path)
        dm.tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
        dm.setup("fit")
        dm.setup("predict")
        tokenized[name] = [dm.splits[split]["input_ids"] for split in ("train", "dev", "predict")]
        tokenized[name].append(dm.corpora["tapt"]["input_ids"])
    assert tokenized["marked"] == tokenized["plain"]
    assert dm.tokenizer.unk_token_id not in tokenized["plain"][2][0]  # the check can see an unknown token


def test_missing_files_are_one_error_naming_the_path_and_option(make, tmp_path, monkeypatch, no_network):
    """A missing split, corpus or predict file stops with a `DataFormatError` (the `tartan` command's one-line
    errors) that says which option put it there; a relative predict file is looked for where the user is first.
    A task with published splits does not download the one missing beside a user's own."""
    monkeypatch.chdir(tmp_path)
    folder = write_task(tmp_path / "task")
    (folder / "test.jsonl").unlink()
    missing_test = re.escape(f"{folder / 'test.jsonl'} does not exist") + ".*`test_file`"
    with pytest.raises(DataFormatError, match=missing_test) as own:
        make(data_dir=folder).prepare_data()
    # nothing is downloaded for one's own task, so nothing advises deleting files to download published splits
    assert "download" not in str(own.value) and "delete" not in str(own.value)
    beside = re.escape(f"{folder / 'train.jsonl'} does not exist beside")  # no_network: no download is tried
    (folder / "train.jsonl").unlink()
    with pytest.raises(DataFormatError, match=beside):
        make(CitationIntentDataModule, folder).label_names  # what the model reads, before Lightning's prepare_data
    write_task(folder)
    (folder / "test.jsonl").unlink()
    with pytest.raises(DataFormatError, match=re.escape(f"{folder / 'test.jsonl'} does not exist beside")):
        make(CitationIntentDataModule, folder).prepare_data()
    folder = write_task(tmp_path / "task")
    missing_corpus = make(data_dir=folder, aux_corpora={"tapt": "train.txt", "web": "web.txt"})
    with pytest.raises(DataFormatError, match=re.escape("web.txt") + ".*`aux_corpora\\['web'\\]`"):
        missing_corpus.prepare_data()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / "web.txt"))):  # still a FileNotFoundError
        missing_corpus.setup("fit")

    (tmp_path / "mine.txt").write_text("a text of my own\n")
    dm = make(data_dir=folder, aux_corpora={}, predict_file="mine.txt")
    dm.setup("predict")
    assert len(dm.splits["predict"]) == 1
    dm = make(data_dir=folder, aux_corpora={}, predict_file="gone.txt")
    with pytest.raises(DataFormatError, match=f"neither {re.escape(str(tmp_path / 'gone.txt'))} nor"):
        dm.setup("predict")


def test_a_predict_file_labeled_in_part_says_its_gold_labels_are_not_written(make, tmp_path, caplog):
    folder = write_task(tmp_path / "task")
    inputs = [{"text": "known", "label": "a"}, {"text": "unknown"}, {"text": "also known", "label": "b"}]
    write_jsonl(tmp_path / "partly.jsonl", inputs)
    dm = make(data_dir=folder, aux_corpora={}, predict_file=str(tmp_path / "partly.jsonl"))
    dm.setup("predict")
    assert "labels" not in dm.splits["predict"].column_names and len(dm.splits["predict"]) == 3
    assert "partly.jsonl: 2 of 3 inputs have a label; predictions are written without `gold` labels" in caplog.text


def test_a_failed_download_is_one_error_naming_the_file_and_url(make, tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    folder = tmp_path / "citation_intent"
    with pytest.raises(DataFormatError, match=re.escape(f"{folder / 'train.jsonl'} does not exist and downloading")):
        make(CitationIntentDataModule, folder).prepare_data()


def test_max_length_beyond_the_tokenizers_is_cut_to_it(make, tmp_path):
    """The default 512 with an encoder of fewer positions would fail inside its position embeddings at the first
    long row: the data module truncates to the tokenizer's `model_max_length` instead, and says so."""
    long_text = " ".join(["word"] * 100)
    folder = write_task(tmp_path / "task", train=[{"text": long_text, "label": "ab"[i % 2]} for i in range(4)])
    dm = make(data_dir=folder, max_length=512)
    dm.tokenizer = AutoTokenizer.from_pretrained(dm.tokenizer_name_or_path, model_max_length=16)
    with pytest.warns(UserWarning, match="max_length=512 is longer than the tokenizer's model_max_length=16"):
        dm.setup("fit")
    assert max(len(ids) for ids in dm.splits["train"]["input_ids"]) == 16
    assert max(len(ids) for ids in dm.corpora["tapt"]["input_ids"]) <= 16


def test_a_single_class_train_split_is_refused_naming_its_file(make, tmp_path):
    folder = write_task(tmp_path / "task", train=[{"text": f"text {i}", "label": "a"} for i in range(4)])
    with pytest.raises(DataFormatError, match=re.escape(f"{folder / 'train.jsonl'}: every example has the label 'a'")):
        make(data_dir=folder).label_names


def test_labels_written_alike_get_the_same_ids_whatever_order_they_come_in(make, tmp_path):
    """"1", "01" and "001" are one number written three ways: their class ids must not depend on which came first
    (a later `tartan test` process would otherwise name the checkpoint's classes differently)."""
    orders = (["1", "01", "001", "b"], ["001", "b", "01", "1"], ["b", "01", "1", "001"])
    names = []
    for index, order in enumerate(orders):
        train = [{"text": f"text {i}", "label": label} for i, label in enumerate(order)]
        names.append(make(data_dir=write_task(tmp_path / f"task{index}", train=train)).label_names)
    assert names[0] == names[1] == names[2] and names[0][-1] == "b"


def test_test_label_unseen_in_train_stops_fit_before_any_tokenisation(make, tmp_path):
    folder = write_task(tmp_path / "task", test=[{"text": "fine", "label": "a"}, {"text": "new", "label": "zzz"}])
    dm = make(data_dir=folder, aux_corpora={})
    with pytest.raises(DataFormatError, match=re.escape(f"{folder / 'test.jsonl'}:2: label 'zzz' never occurs")):
        dm.setup("fit")
    assert not dm.splits


def test_labels_differing_only_in_case_or_spaces_are_refused_naming_their_lines(make, tmp_path):
    """A spreadsheet's "Positive" and a stray "negative " would silently be classes of their own: the error names
    each spelling with the line it first occurs on."""
    labels = ["positive", "negative", "Positive", "negative", "negative "]
    train = [{"text": f"text {i}", "label": label} for i, label in enumerate(labels)]
    folder = write_task(tmp_path / "task", train=train)
    with pytest.raises(DataFormatError) as caught:
        make(data_dir=folder).label_names
    message, train_file = str(caught.value), folder / "train.jsonl"
    assert f"'positive' ({train_file}:1), 'Positive' ({train_file}:3) differ only in case, spaces" in message
    # the same word with its accent composed (NFC) and decomposed (NFD), or with a zero-width space: alike on screen
    for index, variant in enumerate(("ne\u0301gatif", "n\u00e9gatif\u200b")):
        labels = ["n\u00e9gatif", "positif", variant]
        train = [{"text": f"text {i}", "label": label} for i, label in enumerate(labels)]
        with pytest.raises(DataFormatError, match=f"'n\u00e9gatif' .*:1\\), {re.escape(repr(variant))} .*differ only"):
            make(data_dir=write_task(tmp_path / f"encoded{index}", train=train)).label_names
    # a dev label spelt unlike the train label says which one the train split has
    dev = [{"text": "fine", "label": "a"}, {"text": "typo", "label": "B "}]
    dm = make(data_dir=write_task(tmp_path / "dev_typo", dev=dev), aux_corpora={})
    hint = ":2: label 'B ' never occurs in the train split (the train split has 'b'"
    with pytest.raises(DataFormatError, match=re.escape(hint)):
        dm.setup("validate")


def test_a_missing_tapt_corpus_named_by_the_user_is_an_error_not_the_training_texts(make, tmp_path, no_network):
    """Only the default `tapt: train.txt` stands for the training texts; a mistyped path to one's own TAPT text is
    reported, not silently replaced."""
    folder = write_task(tmp_path / "task")
    dm = make(data_dir=folder, aux_corpora={"tapt": "tapt_corpus.txt"})
    with pytest.raises(DataFormatError, match=re.escape(f"{folder / 'tapt_corpus.txt'} does not exist")) as caught:
        dm.prepare_data()
    assert "only `tapt: train.txt` is derived from the train split" in str(caught.value)
    with pytest.raises(DataFormatError, match=re.escape(f"{folder / 'tapt_corpus.txt'} does not exist")):
        dm.setup("fit")  # from Python, without prepare_data


def test_derived_tapt_corpus_goes_to_the_cache_and_leaves_the_data_folder_alone(make, tmp_path, caplog, no_network):
    folder = write_task(tmp_path / "task")
    (folder / "train.txt").unlink()

    def snapshot() -> dict:
        return {path.name: (path.stat().st_mtime_ns, path.stat().st_mode) for path in folder.iterdir()}

    before = snapshot()
    cache = tmp_path / "cache"
    dm = make(data_dir=folder, cache_dir=str(cache))
    with caplog.at_level(logging.INFO):
        dm.prepare_data()
        dm.setup("fit")
    assert snapshot() == before
    assert len(dm.corpora["tapt"]) == 6
    tapt = dm.corpus_file("tapt")
    assert tapt.is_relative_to(cache)
    derived = [record.getMessage() for record in caplog.records if "TAPT corpus" in record.getMessage()]
    assert len(derived) == 1
    assert str(folder / "train.jsonl") in derived[0] and str(tapt) in derived[0]

    # a changed train split derives a new corpus; an unchanged one reuses it
    write_jsonl(folder / "train.jsonl", [{"text": f"new text {i}", "label": "ab"[i % 2]} for i in range(8)])
    changed = make(data_dir=folder, cache_dir=str(cache))
    changed.setup("fit")
    assert changed.corpus_file("tapt") != tapt and len(changed.corpora["tapt"]) == 8
    assert make(data_dir=folder, cache_dir=str(cache)).corpus_file("tapt") == changed.corpus_file("tapt")


def test_boolean_labels_are_two_classes(make, tmp_path):
    """A yes/no task labelled with JSON (or Parquet) booleans: classes "false" and "true", as JSON spells them."""
    train = [{"text": f"example number {i}", "label": i % 2 == 0} for i in range(6)]
    folder = write_task(tmp_path / "task", train=train, dev=train[:3], test=train[3:])
    dm = make(data_dir=folder, aux_corpora={})
    dm.setup()
    assert dm.label_names == ["false", "true"] and dm.splits["train"]["labels"] == [1, 0, 1, 0, 1, 0]


def test_integer_labels_keep_their_ids(make, tmp_path):
    """A user's task labelled 0..n-1 (here 0, 1, 2, 10): classes in numeric order, so class id i is label i where
    the labels are 0..n-1, and every split's labels map to those ids."""
    labels = [0, 1, 2, 10, 2, 1]
    train = [{"text": f"example number {i}", "label": label} for i, label in enumerate(labels)]
    folder = write_task(tmp_path / "task", train=train, dev=train[:4], test=train[2:])
    dm = make(data_dir=folder, aux_corpora={})
    dm.setup()
    assert dm.label_names == ["0", "1", "2", "10"]
    assert dm.splits["train"]["labels"] == [0, 1, 2, 3, 2, 1]
    assert dm.splits["test"]["labels"] == [2, 3, 2, 1]


def test_label_names_given_fix_the_classes_and_check_every_split(make, tmp_path):
    """`label_names` chosen by the user: their order is the class ids, a class no train example has is kept (the
    model predicts it), and a train label outside them is refused naming its file and line."""
    train = [{"text": f"example number {i}", "label": "ab"[i % 2]} for i in range(6)]
    dev = [*train[:2], {"text": "a rare one", "label": "c"}]
    folder = write_task(tmp_path / "task", train=train, dev=dev)
    unlisted = ":3: label 'c' never occurs in the train split; a class no training example has is kept by listing"
    with pytest.raises(DataFormatError, match=re.escape(unlisted)):
        make(data_dir=folder, aux_corpora={}).setup("fit")
    dm = make(data_dir=folder, aux_corpora={}, label_names=["b", "c", "a"])
    dm.setup("fit")
    assert dm.num_labels == 3 and dm.splits["train"]["labels"] == [2, 0, 2, 0, 2, 0]
    assert dm.splits["dev"]["labels"] == [2, 0, 1]

    refused = make(data_dir=folder, aux_corpora={}, label_names=["a", "c"])
    with pytest.raises(DataFormatError, match=re.escape(f"{folder / 'train.jsonl'}:2: label 'b' is not one of the "
                                                        "model's classes ['a', 'c'] (`label_names`)")):
        refused.setup("fit")


@pytest.mark.parametrize(("label_names", "message"), [
    (["only"], "two or more classes"),
    ("ab", "two or more classes"),
    (["Positive", "positive "], "['Positive', 'positive '] are alike"),
])
def test_label_names_that_cannot_be_classes_are_refused(make, tmp_path, label_names, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make(data_dir=write_task(tmp_path / "task"), label_names=label_names)


def test_predicting_new_texts_with_known_classes_reads_no_labeled_split(make, tmp_path, no_network):
    """Labeling a file with a trained model's classes, on a machine without the task's data: nothing is read from
    the (absent) splits and nothing is downloaded, even for a task whose splits are published."""
    folder = tmp_path / "citation_intent"  # empty: the published splits would be downloaded into it
    folder.mkdir()
    (tmp_path / "new.txt").write_text("we use their parser\n\nas in prior work\n")
    classes = ["Background", "CompareOrContrast", "Extends", "Future", "Motivation", "Uses"]
    dm = make(CitationIntentDataModule, folder, predict_file=str(tmp_path / "new.txt"), label_names=classes)
    model = TartanModule.from_datamodule(dm, encoder_name_or_path=dm.tokenizer_name_or_path, weighting="none")
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    batches = trainer.predict(model, datamodule=dm)
    assert [line for batch in batches for line in batch["line"].tolist()] == [1, 3] and not list(folder.iterdir())


def test_every_mlm_batch_of_short_documents_masks_a_token(make, tmp_path):
    """One-word documents, two per batch: about half the batches would draw no mask at 0.15 (and train nothing,
    logging a loss of 0); each gets one masked token, with its id as the label."""
    folder = write_task(tmp_path / "task", corpus="".join(f"word{i % 7}\n" for i in range(64)))
    dm = make(data_dir=folder, aux_batch_size=2, include_meta_dev=False)
    dm.setup("fit")
    tokenizer = dm.tokenizer
    originals = {tuple(tokenizer(f"word{i}")["input_ids"]) for i in range(7)}
    batches = [batch["tapt"] for batch, _, _ in dm.train_dataloader()]
    assert len(batches) == 32  # an epoch is one pass over the longest source, the corpus
    for batch in batches:
        masked = batch["labels"].ne(-100)
        assert masked.any(dim=None)
        restored = torch.where(masked, batch["labels"], batch["input_ids"])
        rows = [tuple(row[mask].tolist()) for row, mask in zip(restored, batch["attention_mask"].bool())]
        assert set(rows) <= originals


@pytest.mark.parametrize(("labels", "message"), [
    (["neg", "pos", 1, "neg"], "labels are names ('neg' at line 1) and integers (1 at line 3)"),
    ([True, "maybe"], "labels are booleans (True at line 1) and names ('maybe' at line 2)"),
])
def test_labels_that_mix_names_and_numbers_in_one_file_are_refused(make, tmp_path, labels, message):
    """A stray integer (or boolean) among class names would be a class of its own."""
    train = [{"text": f"example number {i}", "label": label} for i, label in enumerate(labels)]
    folder = write_task(tmp_path / "task", train=train)
    with pytest.raises(DataFormatError, match=re.escape(f"{folder / 'train.jsonl'}: {message}")):
        make(data_dir=folder).label_names


def test_labels_written_as_numbers_and_as_their_digits_are_one_class(make, tmp_path):
    train = [{"text": f"example number {i}", "label": label} for i, label in enumerate([0, "1", 1, "0"])]
    folder = write_task(tmp_path / "task", train=train)
    assert make(data_dir=folder).label_names == ["0", "1"]
