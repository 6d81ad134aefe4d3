"""The one data module every TARTAN end task builds on.

A training batch is a dict with one entry per source, each serving one batch per training batch::

    {"end_task": {input_ids, attention_mask, labels},   # labels: class ids
     "<corpus>": {input_ids, attention_mask, labels},   # one per aux MLM corpus, labels: -100 where unmasked
     "meta_dev": {input_ids, attention_mask, labels},   # a random labeled dev sample: META-TARTAN's dev head
     "meta_dev_grad": {input_ids, attention_mask, labels}}  # a second, independent one: its held-out dev gradient

With ``accumulate_grad_batches`` above 1, a training batch is one optimizer step: each source maps to a list of
that many such micro-batches (the epoch's last batch may hold fewer).

An epoch is one pass over the longest source; shorter sources make pass after pass within it. Every training loader
is a ``StatefulDataLoader`` whose position Lightning saves in checkpoints, and everything random in a batch (order,
dev samples, MLM masks) follows from the seed, the epoch and the batch's position, so a run resumed from a
mid-epoch checkpoint sees exactly the batches the uninterrupted run saw.

Validation and test batches are plain ``{input_ids, attention_mask, labels}`` dicts, in file order. Predict
batches are ``{input_ids, attention_mask, line}`` (``line``: the example's line in its file) plus ``labels`` when
every input has a known label, also in file order.
"""
import hashlib
import json
import logging
import math
import os
import urllib.request
import uuid
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, NamedTuple, Optional, Sized

import datasets
import numpy as np
import torch
from datasets import Dataset, load_dataset
from datasets.exceptions import DatasetGenerationError
from pytorch_lightning import LightningDataModule
from pytorch_lightning.utilities import CombinedLoader, rank_zero_info
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import DistributedSampler, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from lightning_tartan.packaged_encoders import local_copy

log = logging.getLogger(__name__)

RESERVED_SOURCES = ("end_task", "meta_dev", "meta_dev_grad")
DSP_URL = "https://allennlp.s3-us-west-2.amazonaws.com/dont_stop_pretraining/data/{task}/{split}.jsonl"


def dsp_urls(task: str) -> dict[str, str]:
    """The labeled splits as published by "Don't Stop Pretraining" (Gururangan et al., 2020)."""
    return {f"{split}.jsonl": DSP_URL.format(task=task, split=split) for split in ("train", "dev", "test")}


class DataFormatError(ValueError):
    """A task file exists but its content cannot be used; the message names the file (and line)."""


class Example(NamedTuple):
    """One example and the line of its file it was read from; ``label`` is None only in inputs to predict."""

    line: int
    text: str
    label: Optional[str]


class EndTaskDataModule(LightningDataModule):
    """Labeled end-task splits, auxiliary MLM corpora and a meta-dev sample for TARTAN training.

    Subclasses only set the class attributes below.

    Examples whose ``text`` is empty (or only whitespace) are dropped from the train split, where there is nothing to
    learn from them, and kept in the dev and test splits as empty inputs (the tokenizer still gives ``[CLS] [SEP]``, the
    model predicts a label and the example counts in the metric, as it does for everyone scoring that split). Each
    split with such examples is reported in one line naming the file and the line numbers. A ``text`` that is not a
    string is an error.
    """

    #: corpus name -> text file (relative to ``data_dir``), used when ``aux_corpora`` is None
    default_aux_corpora: ClassVar[dict[str, str]] = {"tapt": "train.txt"}
    default_max_length: ClassVar[int] = 512
    #: the validation metric a checkpoint callback should monitor
    monitor_metric: ClassVar[str] = "f1_macro"
    #: file name (as configured) -> public URL, fetched by ``prepare_data`` when the file is missing
    urls: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        data_dir: str,
        tokenizer_name_or_path: str = "roberta-base",
        train_file: str = "train.jsonl",
        dev_file: str = "dev.jsonl",
        test_file: str = "test.jsonl",
        predict_file: Optional[str] = None,
        aux_corpora: Optional[dict[str, str]] = None,
        max_length: Optional[int] = None,
        batch_size: int = 64,
        aux_batch_size: int = 64,
        dev_batch_size: int = 32,
        dev_grad_batch_size: int = 64,
        eval_batch_size: int = 64,
        accumulate_grad_batches: int = 1,
        mlm_probability: float = 0.15,
        include_meta_dev: bool = True,
        num_workers: int = 0,
        seed: Optional[int] = None,
        cache_dir: Optional[str] = None,
    ) -> None:
        """
        Args:
            data_dir: folder holding the task files. Only files the task downloads (``urls``) are ever written there,
                so it may be read-only once they exist.
            tokenizer_name_or_path: the tokenizer (hub name or folder); the encoder's, so ids match its embeddings.
            train_file: the labeled training split: JSON lines, each with a string ``text`` and a ``label`` (a
                string or an integer), relative to ``data_dir`` (or absolute). Its labels, sorted (integers as
                numbers), are the classes.
            dev_file: the dev split, in the same format; a label the train split lacks is an error.
            test_file: the test split, in the same format; its labels are checked before a fit, too.
            predict_file: what ``tartan predict`` labels: JSON lines with a string ``text`` (a ``label``, if every
                line has one, must be a train label and is written beside the prediction), or a ``.txt`` file with
                one text per line (blank lines skipped); relative to ``data_dir`` (or absolute). ``None`` labels the
                test split.
            aux_corpora: corpus name -> text file with one document per line (relative to ``data_dir``, or
                absolute); ``None`` uses the task's defaults, ``{}`` trains without auxiliary corpora. A ``tapt``
                corpus missing from ``data_dir`` is derived from the train split's texts into the cache (see
                ``cache_dir``).
            max_length: truncation length in tokens; ``None`` uses the task's default.
            batch_size: end-task examples per training batch (per process under DDP).
            aux_batch_size: documents per training batch from each auxiliary corpus (per process under DDP).
            dev_batch_size: size of the ``meta_dev`` sample META-TARTAN fits its dev head on (the paper's 32).
            dev_grad_batch_size: size of the ``meta_dev_grad`` sample its held-out dev gradient is taken on (the
                paper's 64). Both are drawn afresh for every training batch, without replacement within a sample.
            eval_batch_size: examples per validation, test and predict batch.
            accumulate_grad_batches: micro-batches per training batch, each of the sizes above: a training batch is
                then one optimizer step of a `TartanModule` with the same ``accumulate_grad_batches`` (``tartan``
                links this option to ``--model.accumulate_grad_batches``), so Lightning counts optimizer steps
                wherever it counts batches. Every source then maps to a list of micro-batches.
            mlm_probability: share of a document's tokens the MLM objective masks (of those, eight in ten become the
                mask token, one a random token, one stays).
            include_meta_dev: build the two dev samples (META-TARTAN needs them; other methods ignore them).
            num_workers: loader worker processes per source (0: load in the main process). Batches, masks included,
                are the same for any number.
            seed: shuffling of every source, the dev samples and the MLM masks; ``None`` follows the run's seed
                (``seed_everything``, i.e. ``tartan --seed_everything``), or 0 when none was set.
            cache_dir: where ``datasets`` caches the tokenised splits and a derived TAPT corpus is written; ``None``
                uses the ``datasets`` cache (``HF_DATASETS_CACHE``).
        """
        super().__init__()
        # plain strings in the hyper-parameters: a Path would make every checkpoint unloadable with weights_only
        data_dir, tokenizer_name_or_path = str(data_dir), str(tokenizer_name_or_path)
        train_file, dev_file, test_file = str(train_file), str(dev_file), str(test_file)
        predict_file = None if predict_file is None else str(predict_file)
        cache_dir = None if cache_dir is None else str(cache_dir)
        if aux_corpora is not None:
            aux_corpora = {str(name): str(file) for name, file in aux_corpora.items()}
        self.save_hyperparameters()
        aux_corpora = dict(self.default_aux_corpora if aux_corpora is None else aux_corpora)
        max_length = self.default_max_length if max_length is None else max_length
        batch_sizes = {
            "batch_size": batch_size,
            "aux_batch_size": aux_batch_size,
            "dev_batch_size": dev_batch_size,
            "dev_grad_batch_size": dev_grad_batch_size,
            "eval_batch_size": eval_batch_size,
            "accumulate_grad_batches": accumulate_grad_batches,
        }
        for name, size in batch_sizes.items():
            if size < 1:
                raise ValueError(f"`{name}` must be >= 1, got {size}")
        if max_length < 8:
            raise ValueError(f"`max_length` must be >= 8, got {max_length}")
        if not 0 < mlm_probability < 1:
            raise ValueError(f"`mlm_probability` must be in (0, 1), got {mlm_probability}")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}")
        if seed is not None and seed < 0:
            raise ValueError(f"`seed` must be >= 0, got {seed}")
        for name, file in aux_corpora.items():
            if not name or name in RESERVED_SOURCES:
                raise ValueError(f"`aux_corpora` names must be non-empty and not {RESERVED_SOURCES}, got {name!r}")
            if not file:
                raise ValueError(f"`aux_corpora[{name!r}]` needs a file name")

        self.data_dir = Path(data_dir).expanduser()
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.files = {"train": train_file, "dev": dev_file, "test": test_file}
        self.predict_file = predict_file
        self.aux_corpora = aux_corpora
        self.max_length = max_length
        self.batch_size = batch_size
        self.aux_batch_size = aux_batch_size
        self.dev_batch_size = dev_batch_size
        self.dev_grad_batch_size = dev_grad_batch_size
        self.eval_batch_size = eval_batch_size
        self.accumulate_grad_batches = accumulate_grad_batches
        self.mlm_probability = mlm_probability
        self.include_meta_dev = include_meta_dev
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir

        self.tokenizer: Optional[PreTrainedTokenizerBase] = None
        self.splits: dict[str, Dataset] = {}  # "train" / "dev" / "test" / "predict", tokenised
        self.corpora: dict[str, Dataset] = {}  # aux corpus name -> tokenised documents
        self._examples: dict[str, list[Example]] = {}  # split -> its checked examples, read once
        self._run_seed: Optional[int] = None

    # ---- what the model needs at instantiation, without tokenising ----------------------------------

    @cached_property
    def label_names(self) -> list[str]:
        """The sorted train-split labels; index = class id. Integer labels sort as numbers, so labels 0..n-1 keep
        their ids. Read once, before any tokenisation."""
        self._fetch(self.files["train"])  # the model needs this before Lightning calls prepare_data
        return sorted({example.label for example in self._labeled("train")}, key=_label_order)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def aux_names(self) -> list[str]:
        return list(self.aux_corpora)

    # ---- files --------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Fetch missing files from the task's URLs and derive a missing TAPT corpus; no network call when every
        file is present."""
        for file in self.files.values():
            self._fetch(file)
        self._derive_tapt_corpus()
        for name, file in self.aux_corpora.items():
            if self.corpus_file(name) == self._path(file):
                self._fetch(file)

    def corpus_file(self, name: str) -> Path:
        """The text file corpus ``name`` is read from: its file in ``data_dir``, except for a ``tapt`` corpus missing
        there (and from ``urls``), which is derived from the train split into the cache."""
        derived = self._derived_tapt_file() if name == "tapt" else None
        return derived if derived is not None else self._path(self.aux_corpora[name])

    def _path(self, file: str) -> Path:
        return self.data_dir / Path(file).expanduser()  # an absolute `file` replaces data_dir

    def _fetch(self, file: str) -> None:
        path = self._path(file)
        if path.exists():
            return
        if file not in self.urls:
            raise FileNotFoundError(
                f"{path} does not exist and {type(self).__name__} has no URL for it"
                " (check `data_dir`, the file options and `aux_corpora`)"
            )
        rank_zero_only(log.info)(f"Downloading {self.urls[file]} to {path}")
        with urllib.request.urlopen(self.urls[file], timeout=60) as response:
            _write_atomic(path, response.read())

    def _derived_tapt_file(self) -> Optional[Path]:
        """Where the TAPT corpus is derived to, or None when none is derived. The TAPT corpus is by definition the
        task's training texts; derived data belongs in the cache, keyed by the train split's path, size and
        modification time, so an edited split derives a new corpus and the data folder is never written."""
        file = self.aux_corpora.get("tapt")
        train = self._path(self.files["train"])
        if file is None or file in self.urls or self._path(file).exists() or not train.is_file():
            return None
        stat = train.stat()
        key = hashlib.sha256(f"{train.resolve()}\n{stat.st_size}\n{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        cache = Path(self.cache_dir).expanduser() if self.cache_dir else Path(datasets.config.HF_DATASETS_CACHE)
        return cache / "tartan_tapt_corpora" / key / Path(file).name

    def _derive_tapt_corpus(self) -> None:
        derived = self._derived_tapt_file()
        if derived is None or derived.exists():
            return
        texts = (" ".join(example.text.split()) + "\n" for example in self._labeled("train"))
        _write_atomic(derived, "".join(texts).encode())
        train = self._path(self.files["train"])
        rank_zero_info(
            f"Derived the TAPT corpus (the training texts, one per line) from {train} into {derived};"
            f" {self.data_dir} is left unchanged"
        )

    # ---- reading and checking -----------------------------------------------------------------------

    def _labeled(self, split: str) -> list[Example]:
        """The split's examples, read and checked once. Empty texts are dropped from train and kept elsewhere
        (see the class docstring); either is reported in one line."""
        if split not in self._examples:
            path = self._path(self.files[split])
            examples = _read_jsonl(path)
            empty = [example.line for example in examples if not example.text.strip()]
            if empty:
                kept = split != "train"
                outcome = "kept as an empty input" if kept else "dropped: there is nothing to learn from"
                rank_zero_info(f"{path}: {_count(empty, 'example')} with empty text ({_lines(empty)}) {outcome}")
                if not kept:
                    examples = [example for example in examples if example.text.strip()]
            if not examples:
                raise DataFormatError(f"{path} holds no example with text")
            self._examples[split] = examples
        return self._examples[split]

    def _check_labels(self, split: str) -> None:
        """Every label of `split` is a train label: read from the file alone, so a fit checks the test split before
        training rather than at ``tartan test``, after the whole fit."""
        classes = set(self.label_names)  # the train split is read (and reported on) first
        _check_known_labels(self._path(self.files[split]), self._labeled(split), classes)

    # ---- tokenisation -------------------------------------------------------------------------------

    def setup(self, stage: Optional[str] = None) -> None:
        """Check the labels of every split the stage's run uses, then tokenise what it needs; ``datasets`` caches the
        tokenised data on disk, keyed on tokenizer and max_length."""
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(local_copy(self.tokenizer_name_or_path))
        checked = {"fit": ["dev", "test"], "validate": ["dev"], "test": ["test"], "predict": []}
        needed = {"fit": ["train", "dev"], "validate": ["dev"], "test": ["test"], "predict": []}
        for split in checked.get(stage, ["dev", "test"]):
            self._check_labels(split)
        for split in needed.get(stage, ["train", "dev", "test"]):
            if split not in self.splits:
                self.splits[split] = self._tokenize_labeled(split)
        if stage == "predict" and "predict" not in self.splits:
            self.splits["predict"] = self._tokenize_predict_inputs()
        if stage in ("fit", None):
            self._run_seed = None  # a new fit follows the seed set now (a resumed checkpoint restores its own)
            self._derive_tapt_corpus()  # for a setup without prepare_data
            for name in self.aux_corpora:
                if name not in self.corpora:
                    self.corpora[name] = self._tokenize_corpus(self.corpus_file(name))

    def _tokenize_labeled(self, split: str) -> Dataset:
        path = self._path(self.files[split])
        examples = self._labeled(split)
        raw = load_dataset("json", data_files=str(path), split="train", cache_dir=self.cache_dir)
        if len(raw) > len(examples):  # the train split's empty texts
            desc = f"Dropping empty texts in {path.name}"
            raw = raw.filter(_non_blank, batched=True, input_columns="text", desc=desc)
        label2id = {label: i for i, label in enumerate(self.label_names)}
        return raw.map(
            _encode_labeled,
            batched=True,
            remove_columns=raw.column_names,
            fn_kwargs={"tokenizer": self.tokenizer, "max_length": self.max_length, "label2id": label2id},
            desc=f"Tokenizing {path.name}",
        )

    def _predict_inputs(self) -> tuple[Path, list[Example]]:
        """The file ``tartan predict`` labels and its examples: ``predict_file``, or else the test split."""
        if self.predict_file is None:
            return self._path(self.files["test"]), self._labeled("test")
        path = self._path(self.predict_file)
        if path.suffix == ".txt":
            _check_file(path)
            with path.open("rb") as lines:
                texts = [(lineno, _decode(raw, path, lineno).rstrip("\r\n")) for lineno, raw in enumerate(lines, 1)]
            examples = [Example(lineno, text, None) for lineno, text in texts if text.strip()]
        else:
            examples = _read_jsonl(path, require_label=False)
        if not examples:
            raise DataFormatError(f"{path} holds no text to predict")
        if all(example.label is not None for example in examples):
            _check_known_labels(path, examples, set(self.label_names))
        return path, examples

    def _tokenize_predict_inputs(self) -> Dataset:
        path, examples = self._predict_inputs()
        columns: dict[str, list] = {"text": [e.text for e in examples], "line": [e.line for e in examples]}
        label2id = {label: i for i, label in enumerate(self.label_names)}
        if all(example.label is not None for example in examples):
            columns["labels"] = [label2id[example.label] for example in examples]
        encode = {"tokenizer": self.tokenizer, "max_length": self.max_length}
        raw = Dataset.from_dict(columns)
        desc = f"Tokenizing {path.name}"
        return raw.map(_encode_texts, batched=True, remove_columns=["text"], fn_kwargs=encode, desc=desc)

    def _tokenize_corpus(self, path: Path) -> Dataset:
        _check_file(path)
        try:
            lines = load_dataset("text", data_files=str(path), split="train", cache_dir=self.cache_dir)
        except DatasetGenerationError as err:
            if isinstance(err.__cause__, UnicodeDecodeError):
                _check_utf8(path)
            raise
        docs = lines.filter(_non_blank, batched=True, input_columns="text", desc=f"Dropping blank lines in {path.name}")
        if len(docs) == 0:
            raise DataFormatError(f"{path} has no non-blank lines to train on")
        if len(docs) < len(lines):
            rank_zero_only(log.info)(f"Skipped {len(lines) - len(docs)} blank lines in {path}")
        return docs.map(
            _encode_documents,
            batched=True,
            remove_columns=docs.column_names,
            fn_kwargs={"tokenizer": self.tokenizer, "max_length": self.max_length},
            desc=f"Tokenizing {path.name}",
        )

    # ---- loaders ------------------------------------------------------------------------------------

    def train_dataloader(self) -> CombinedLoader:
        """One batch of every source per training batch, for as many batches as the longest source has; samplers are
        ours, so the order is set per epoch and a loader restored from a checkpoint continues its epoch."""
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        seed = self.run_seed
        masking = _SeededMasking(DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=self.mlm_probability))
        sources = {"end_task": (self.splits["train"], self.batch_size)}
        sources.update({name: (docs, self.aux_batch_size) for name, docs in self.corpora.items()})
        num_batches = max(math.ceil(math.ceil(len(data) / world_size) / size) for data, size in sources.values())
        # each source gets its own seed: the TAPT corpus is the train texts in the same order, and equal
        # seeds over equal lengths would pair every end-task batch with the same texts to reconstruct
        loaders = {}
        for i, (name, (data, batch_size)) in enumerate(sources.items()):
            corpus = name != "end_task"
            sampler = SourceSampler(data, batch_size, num_batches, world_size, rank, seed + i, mask_keys=corpus)
            if corpus:
                loaders[name] = self._step_loader(_WithMaskKeys(data), batch_size, masking, sampler, seed)
            else:
                loaders[name] = self._step_loader(data, batch_size, self._padding_collator(), sampler, seed)
        if self.include_meta_dev:
            dev = self.splits["dev"]
            samples = {"meta_dev": self.dev_batch_size, "meta_dev_grad": self.dev_grad_batch_size}
            for offset, (name, size) in enumerate(samples.items(), start=len(sources)):
                sampler = DevSampleSampler(dev, size, num_batches, seed=seed + offset)
                loaders[name] = self._step_loader(dev, size, self._padding_collator(), sampler, seed)
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _step_loader(
        self, data: Sized, batch_size: int, collate: Callable, sampler: Sampler, seed: int
    ) -> StatefulDataLoader:
        """A training source's loader: one batch per optimizer step, ``accumulate_grad_batches`` micro-batches of
        ``batch_size`` each (a plain batch without accumulation). The sampler's order is the same either way, and
        each micro-batch is padded and masked exactly as a batch of its own would be."""
        if self.accumulate_grad_batches == 1:
            return self._loader(data, batch_size, collate, sampler, seed)
        grouped = _MicroBatches(collate, batch_size)
        return self._loader(data, batch_size * self.accumulate_grad_batches, grouped, sampler, seed)

    @property
    def run_seed(self) -> int:
        """``seed``, or the run's seed when it is ``None``: fixed when fit starts, and restored from a checkpoint
        (``state_dict``), so a run resumed under another seed continues the original order."""
        if self._run_seed is None:
            self._run_seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        return self._run_seed

    def state_dict(self) -> dict[str, Any]:
        return {"run_seed": self.run_seed, "num_workers": self.num_workers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The run's seed, and its loaders' worker count: their saved positions (which Lightning restores into the
        loaders ``train_dataloader`` builds next) only load into as many workers, and batches are the same for any."""
        self._run_seed = state_dict["run_seed"]
        saved = state_dict.get("num_workers", self.num_workers)
        if saved != self.num_workers:
            rank_zero_info(
                f"Resuming with num_workers={saved}, as the checkpoint's data loaders had"
                f" (num_workers={self.num_workers} was set); the batches are the same"
            )
            self.num_workers = saved

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.splits["dev"], self.eval_batch_size, self._padding_collator())

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.splits["test"], self.eval_batch_size, self._padding_collator())

    def predict_dataloader(self) -> StatefulDataLoader:
        """`tartan predict` labels ``predict_file`` (or the test split), in file order."""
        return self._loader(self.splits["predict"], self.eval_batch_size, self._padding_collator())

    def _padding_collator(self) -> "_PlainDict":
        return _PlainDict(DataCollatorWithPadding(self.tokenizer))

    def _loader(
        self, data: Sized, batch_size: int, collate: Callable, sampler: Optional[Sampler] = None, seed: int = 0
    ) -> StatefulDataLoader:
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            return StatefulDataLoader(
                data,
                batch_size=batch_size,
                sampler=sampler,
                collate_fn=collate,
                # a new iterator draws its worker seed from here, not from the global RNG that dropout uses (and that
                # a checkpoint restores)
                generator=torch.Generator().manual_seed(seed),
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,  # the same workers from one epoch to the next
            )


class EpochSampler(DistributedSampler):
    """Indices fixed by the seed and the epoch, served by an iterator a ``StatefulDataLoader`` checkpoints.

    The iterator carries the epoch it was made for and its position, so a loader restored from a mid-epoch
    checkpoint continues that epoch where it stopped: Lightning restores loaders before it calls ``set_epoch``, too
    late for a sampler that reads its epoch as iteration starts. One restored at the end of an epoch starts the next.
    Subclasses say what an epoch holds.
    """

    def __init__(self, data: Sized, num_replicas: int, rank: int, seed: int, length: int) -> None:
        super().__init__(data, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> "_EpochIterator":
        return _EpochIterator(self, self.epoch)

    def epoch_indices(self, epoch: int) -> list[int]:
        """The ``length`` dataset indices of ``epoch``, in order."""
        raise NotImplementedError

    def item(self, index: int, epoch: int, position: int) -> Any:
        """What the loader's dataset is indexed with for ``index`` at ``position`` of ``epoch``."""
        return index


class _EpochIterator(Iterator):
    """One epoch of an ``EpochSampler``; its state (epoch, position) is what a ``StatefulDataLoader`` saves."""

    def __init__(self, sampler: EpochSampler, epoch: int) -> None:
        self.sampler = sampler
        self._start(epoch, 0)

    def _start(self, epoch: int, position: int) -> None:
        self.epoch, self.position = epoch, position
        self.indices = self.sampler.epoch_indices(epoch)

    def __next__(self) -> Any:
        if self.position >= len(self.indices):
            raise StopIteration
        item = self.sampler.item(self.indices[self.position], self.epoch, self.position)
        self.position += 1
        return item

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        epoch = state_dict["epoch"]
        self._start(epoch, state_dict["position"])
        if self.position >= len(self.indices):
            # saved at the epoch's last batch: the resumed run goes on with the next epoch, and Lightning builds no
            # new iterator for it
            self._start(epoch + 1, 0)


class SourceSampler(EpochSampler):
    """This rank's shard of a training source, for an epoch of ``num_batches`` batches.

    The longest source makes one pass, in ``DistributedSampler``'s order. A shorter one makes pass after pass, each in
    a new order, until it fills ``num_batches`` full batches, so no loader restarts within an epoch. With
    ``mask_keys`` each index comes with the key of its position (seed, epoch, rank, position), from which the MLM
    masks of the batch it starts are drawn.
    """

    def __init__(
        self, data: Sized, batch_size: int, num_batches: int, num_replicas: int, rank: int, seed: int, mask_keys: bool
    ) -> None:
        shard = math.ceil(len(data) / num_replicas)
        length = shard if math.ceil(shard / batch_size) == num_batches else num_batches * batch_size
        super().__init__(data, num_replicas, rank, seed, length)
        self.mask_keys = mask_keys

    def epoch_indices(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        indices: list[int] = []
        while len(indices) < self.length:
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
            padded = (order * math.ceil(self.total_size / len(order)))[: self.total_size]  # equal shards on all ranks
            indices += padded[self.rank : self.total_size : self.num_replicas]
        return indices[: self.length]

    def item(self, index: int, epoch: int, position: int) -> Any:
        return (index, (self.seed, epoch, self.rank, position)) if self.mask_keys else index


class DevSampleSampler(EpochSampler):
    """A fresh random dev sample for every training batch, as the paper draws them, the same on every rank.

    Each consecutive block of ``sample_size`` indices is one sample drawn without replacement (with replacement
    only when the split is smaller than a sample); ``num_draws`` blocks cover an epoch of the longest source,
    so the loader never restarts within an epoch. The draws depend only on ``seed`` and the epoch (Lightning
    calls ``set_epoch``), so a resumed run draws the same samples. A ``DistributedSampler`` with one replica,
    so Lightning leaves it unsharded under DDP.
    """

    def __init__(self, dev: Sized, sample_size: int, num_draws: int, seed: int) -> None:
        super().__init__(dev, num_replicas=1, rank=0, seed=seed, length=sample_size * num_draws)
        self.sample_size = sample_size

    def epoch_indices(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        n = len(self.dataset)
        indices: list[int] = []
        for _ in range(self.length // self.sample_size):
            if n >= self.sample_size:
                indices += torch.randperm(n, generator=generator)[: self.sample_size].tolist()
            else:
                indices += torch.randint(n, (self.sample_size,), generator=generator).tolist()
        return indices


MaskKey = tuple[int, ...]


class _WithMaskKeys(torch.utils.data.Dataset):
    """A tokenised corpus indexed by a ``SourceSampler``'s ``(index, mask key)`` items; returns the document and key.

    A bare index (Lightning's ``overfit_batches`` swaps in a ``SequentialSampler``) is its own key.
    """

    def __init__(self, docs: Dataset) -> None:
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, item: tuple[int, MaskKey] | int) -> tuple[dict, MaskKey]:
        index, key = item if isinstance(item, tuple) else (item, (item,))
        return self.docs[index], key


@dataclass
class _SeededMasking:
    """MLM masking of a batch drawn from a generator seeded by the key of its first document: new masks for every
    batch, epoch and seed, yet the same in any process, with any number of workers and after a resume. The global RNG,
    which dropout draws from, is left as it was."""

    collator: DataCollatorForLanguageModeling

    def __call__(self, items: list[tuple[dict, MaskKey]]) -> dict:
        seed = int(np.random.SeedSequence(items[0][1]).generate_state(1, np.uint64)[0])
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return dict(self.collator([document for document, _ in items]))


@dataclass
class _MicroBatches:
    """Collates a step's examples as consecutive micro-batches of ``size``, each on its own."""

    collate: Callable[[list], dict]
    size: int

    def __call__(self, examples: list) -> list[dict]:
        return [self.collate(examples[start : start + self.size]) for start in range(0, len(examples), self.size)]


@dataclass
class _PlainDict:
    """HF collators return a ``BatchEncoding`` (a ``UserDict``); the batch contract is plain dicts."""

    collator: Callable[[list], Any]

    def __call__(self, examples: list) -> dict:
        return dict(self.collator(examples))


# Module-level so `datasets` fingerprints them (with tokenizer and max_length from fn_kwargs) for its cache.
def _encode_labeled(batch: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, label2id: dict) -> dict:
    encoded = tokenizer(batch["text"], truncation=True, max_length=max_length, return_token_type_ids=False)
    encoded["labels"] = [label2id[str(label)] for label in batch["label"]]
    return encoded


def _encode_texts(batch: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    return tokenizer(batch["text"], truncation=True, max_length=max_length, return_token_type_ids=False)


def _non_blank(texts: list[str]) -> list[bool]:
    return [bool(text.strip()) for text in texts]


def _encode_documents(batch: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    # the special-tokens mask lets the MLM collator skip [CLS]/[SEP]/<s>/</s> without recomputing them
    return tokenizer(
        batch["text"],
        truncation=True,
        max_length=max_length,
        return_token_type_ids=False,
        return_special_tokens_mask=True,
    )


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (run `prepare_data()` or check `data_dir`)")
    if path.stat().st_size == 0:
        raise DataFormatError(f"{path} is empty")


def _read_jsonl(path: Path, require_label: bool = True) -> list[Example]:
    """Check every line in plain Python, so a bad file fails with its line number instead of inside `datasets`.

    Blank lines are skipped (as the JSON loader does); texts may be empty (the caller decides). Without
    ``require_label``, a line may lack ``label`` (its Example's label is None).
    """
    _check_file(path)
    examples = []
    with path.open("rb") as lines:
        for lineno, raw in enumerate(lines, start=1):
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(example, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(example).__name__}")
            for key in ("text", "label") if require_label else ("text",):
                if key not in example:
                    raise DataFormatError(f"{path}:{lineno}: no {key!r} field")
            text, label = example["text"], example.get("label")
            if not isinstance(text, str):
                raise DataFormatError(f"{path}:{lineno}: 'text' must be a string, got {json.dumps(text)[:40]}")
            if label is None and not require_label:
                examples.append(Example(lineno, text, None))
                continue
            if isinstance(label, int) and not isinstance(label, bool):
                label = str(label)  # class ids as labels: their names are the numbers
            if not isinstance(label, str) or not label:
                raise DataFormatError(
                    f"{path}:{lineno}: 'label' must be a non-empty string or an integer, got {json.dumps(label)[:40]}"
                )
            examples.append(Example(lineno, text, label))
    if not examples:
        raise DataFormatError(f"{path} holds no examples")
    return examples


def _label_order(label: str) -> tuple[int, int, str]:
    """Numbers first, in numeric order, then the other labels alphabetically."""
    number = label.isdigit() or (label.startswith("-") and label[1:].isdigit())
    return (0, int(label), "") if number else (1, 0, label)


def _check_known_labels(path: Path, examples: list[Example], classes: set[str]) -> None:
    for example in examples:
        if example.label not in classes:
            raise DataFormatError(f"{path}:{example.line}: label {example.label!r} never occurs in the train split")


def _decode(line: bytes, path: Path, lineno: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(
            f"{path}:{lineno}: not valid UTF-8 (byte 0x{line[err.start]:02x} at byte {err.start + 1} of the line);"
            " save the file as UTF-8, e.g. `iconv -f <its encoding> -t UTF-8`"
        ) from None


def _check_utf8(path: Path) -> None:
    """Raise a `DataFormatError` naming the first line of `path` that is not UTF-8, if any."""
    with path.open("rb") as lines:
        for lineno, line in enumerate(lines, start=1):
            _decode(line, path, lineno)


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _lines(numbers: list[int], shown: int = 10) -> str:
    """'line 22', 'lines 3, 6', or the first `shown` and how many more."""
    listed = ", ".join(map(str, numbers[:shown]))
    more = f" and {len(numbers) - shown} more" if len(numbers) > shown else ""
    return f"line{'' if len(numbers) == 1 else 's'} {listed}{more}"


def _write_atomic(path: Path, content: bytes) -> None:
    """Readers (and other ranks) see either no file or the whole file, with the permissions the umask gives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)
