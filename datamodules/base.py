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
batches are ``{input_ids, attention_mask, line}`` (``line``: the example's line in its file, or its row in a Parquet
file or Hub split) plus ``labels`` when every input has a known label, also in file order. A sentence-pair task
(``text_pair_field``) adds the tokenizer's ``token_type_ids`` to every labeled batch.
"""
import hashlib
import inspect
import json
import math
import os
import urllib.request
import uuid
import warnings
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Sized, Union
from urllib.error import URLError

import datasets
import torch
from datasets import Dataset, load_dataset
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher
from huggingface_hub.utils import HFValidationError
from pytorch_lightning import LightningDataModule
from pytorch_lightning.utilities import CombinedLoader, rank_zero_info, rank_zero_warn
from torch.utils.data import Sampler
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

from datamodules.reading import (
    DataFormatError,
    Example,
    Fields,
    MissingDataFile,
    Source,
    Split,
    check_distinct_labels,
    check_file,
    check_known_labels,
    check_utf8,
    decode,
    is_empty,
    label_key,
    label_order,
    names,
    read_file,
    read_table,
)
from datamodules.sampling import (
    DevSampleSampler,
    LengthGrouping,
    MicroBatches,
    PlainDict,
    SeededMasking,
    SourceSampler,
    WithMaskKeys,
    token_lengths,
)
from lightning_tartan.heads import EncoderInputMismatch
from lightning_tartan.module import MONITOR_METRICS
from lightning_tartan.packaged_encoders import local_copy
from lightning_tartan.weighting import END_TASK, META_DEV, META_DEV_GRAD, RESERVED_SOURCES

#: labeled-split formats, by file suffix (``predict_file`` also reads ``.txt``: one text per line)
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
#: the keys of an ``aux_corpora`` entry read with ``datasets.load_dataset``
HUB_CORPUS_KEYS = ("dataset", "config", "split", "text_field")
#: a tokenizer's `model_max_length` this large means no known limit (transformers sets 1e30 when none is saved)
NO_MODEL_MAX_LENGTH = 1_000_000
#: the ``tapt`` corpus file that, when missing, stands for the task's training texts and is derived from them
DERIVED_TAPT_FILE = "train.txt"
DSP_URL = "https://allennlp.s3-us-west-2.amazonaws.com/dont_stop_pretraining/data/{task}/{split}.jsonl"


def dsp_urls(task: str) -> dict[str, str]:
    """The labeled splits as published by "Don't Stop Pretraining" (Gururangan et al., 2020)."""
    return {f"{split}.jsonl": DSP_URL.format(task=task, split=split) for split in ("train", "dev", "test")}


#: a corpus of ``aux_corpora``: a text file, or a Hub dataset (``HUB_CORPUS_KEYS``)
AuxCorpus = Union[str, dict[str, Optional[str]]]


class EndTaskDataModule(LightningDataModule):
    """Labeled end-task splits, auxiliary MLM corpora and a meta-dev sample for TARTAN training.

    Subclasses only set the class attributes below. The labeled splits are task files in ``data_dir`` (JSON lines,
    CSV, TSV or Parquet, by suffix) or the splits of a Hugging Face Hub dataset (``dataset``); either is read through
    one checked reader, so a bad example fails naming its file and line (or its row) and the option to change.

    Examples whose text is empty (or only whitespace) are dropped from the train split, where there is nothing to
    learn from them, and kept in the dev and test splits as empty inputs (the tokenizer still gives ``[CLS] [SEP]``, the
    model predicts a label and the example counts in the metric, as it does for everyone scoring that split). Each
    split with such examples is reported in one line naming the file and the line numbers. A text that is not a
    string is an error. In a sentence-pair task an example is empty when both of its texts are.
    """

    #: corpus name -> text file (relative to ``data_dir``), used when ``aux_corpora`` is None
    default_aux_corpora: ClassVar[dict[str, str]] = {"tapt": "train.txt"}
    default_max_length: ClassVar[int] = 512
    #: the validation metric a checkpoint callback monitors unless ``monitor_metric`` is given
    default_monitor_metric: ClassVar[str] = "f1_macro"
    #: file name (as configured) -> public URL, fetched by ``prepare_data`` when the file is missing
    urls: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        data_dir: Optional[str] = None,
        tokenizer_name_or_path: str = "roberta-base",
        train_file: str = "train.jsonl",
        dev_file: str = "dev.jsonl",
        test_file: Optional[str] = "test.jsonl",
        predict_file: Optional[str] = None,
        predict_text_field: Optional[str] = None,
        aux_corpora: Optional[dict[str, AuxCorpus]] = None,
        max_length: Optional[int] = None,
        batch_size: int = 64,
        aux_batch_size: int = 64,
        dev_batch_size: int = 32,
        dev_grad_batch_size: int = 64,
        eval_batch_size: int = 64,
        accumulate_grad_batches: int = 1,
        group_by_length: bool = False,
        mlm_probability: float = 0.15,
        include_meta_dev: bool = True,
        num_workers: int = 0,
        seed: Optional[int] = None,
        cache_dir: Optional[str] = None,
        dataset: Optional[str] = None,
        dataset_config: Optional[str] = None,
        train_split: str = "train",
        dev_split: str = "validation",
        test_split: Optional[str] = "test",
        text_field: str = "text",
        text_pair_field: Optional[str] = None,
        label_field: str = "label",
        label_names: Optional[Sequence[str]] = None,
        monitor_metric: Optional[str] = None,
    ) -> None:
        """
        Args:
            data_dir: folder holding the task files. Only files the task downloads (``urls``) are ever written there,
                so it may be read-only once they exist. Not needed with ``dataset`` (relative corpus files then
                resolve in it, or in the working directory without it); one of the two is required.
            tokenizer_name_or_path: the tokenizer (hub name or folder); the encoder's, so ids match its embeddings.
            train_file: the labeled training split, relative to ``data_dir`` (or absolute), in a format its suffix
                names: ``.jsonl``/``.json`` (JSON lines, one object per line), ``.csv`` (standard quoting) or ``.tsv``
                (tab-separated, no quoting: IANA TSV), both with a header row naming the columns, or ``.parquet``.
                Each example has a string text (``text_field``) and a label (``label_field``: a class name, an
                integer id or a boolean; a decimal number such as ``1.0`` is an error). Its labels, sorted (integers
                as numbers), are the classes (two that differ only in case or spaces are an error); a Parquet label
                column of type ``ClassLabel`` gives them by its names instead.
            dev_file: the dev split, in any of these formats; a label the train split lacks is an error.
            test_file: the test split, likewise; its labels are checked before a fit, too. ``None``: the task has
                none (``tartan test`` then has nothing to score, and ``predict`` needs ``predict_file``).
            predict_file: what ``tartan predict`` labels: a file in any of these formats whose examples need only the
                text (labels, if every example has one, must be train labels and are written beside the
                predictions), or a ``.txt`` file with one text per line (blank lines skipped); a path from the
                working directory, or else relative to ``data_dir``. ``None`` labels the test split.
            predict_text_field: the field holding the text in ``predict_file``, when it is not ``text_field`` (new
                texts to label often come from elsewhere); ``None``: ``text_field``.
            aux_corpora: corpus name -> text file with one document per line (relative to ``data_dir``, or
                absolute), or a dataset as ``{dataset: <Hub name, folder or data file>, config: <its
                configuration>, split: <default "train">, text_field: <default "text">}``, read with
                ``datasets.load_dataset`` (a .jsonl, .csv, .tsv or .parquet file whole); blank texts are skipped,
                with a report. ``None`` uses the task's defaults, ``{}`` trains without auxiliary
                corpora. The corpus ``tapt: train.txt``, when the file is missing from ``data_dir``, is derived
                from the train split's texts into the cache (see ``cache_dir``); any other missing file is an error,
                so a mistyped path is never silently replaced.
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
            group_by_length: order each epoch of the end task and of every auxiliary corpus so that rows of similar
                length share a training batch (each run of 50 batches, or a quarter of a shorter epoch, is sorted by
                length, cut into batches, and the batches are shuffled; the dev samples and evaluation loaders are
                left alone). A batch is padded to its longest row, so this cuts padding and makes steps faster at
                real lengths. The batches hold other combinations of rows, so results differ from an ungrouped run
                by sampling noise only; every epoch still holds the same rows, and resuming stays exact. Off by
                default, so the published results stand.
            mlm_probability: share of a document's tokens the MLM objective masks (of those, eight in ten become the
                mask token, one a random token, one stays); a batch in which no token drew a mask gets one.
            include_meta_dev: build the two dev samples (META-TARTAN needs them; other methods ignore them).
                `TartanModule` sets it from its weighting when it is fitted on this data module.
            num_workers: loader worker processes per source (0: load in the main process). Batches, masks included,
                are the same for any number.
            seed: shuffling of every source, the dev samples and the MLM masks; ``None`` follows the run's seed
                (``seed_everything``, i.e. ``tartan --seed_everything``), or 0 when none was set.
            cache_dir: where ``datasets`` caches downloaded and tokenised data and a derived TAPT corpus is written;
                ``None`` uses the ``datasets`` cache (``HF_DATASETS_CACHE``).
            dataset: read the labeled splits with ``datasets.load_dataset(dataset, dataset_config)`` instead of from
                files: a Hugging Face Hub dataset (e.g. ``SetFit/sst2``) or a local folder in its layout (e.g.
                ``data/train-00000-of-00001.parquet``). The ``*_file`` options then stay at their defaults (an error
                otherwise, rather than a file silently not read); a ``ClassLabel`` label column gives the classes
                by its names, ids kept.
            dataset_config: the dataset's configuration (its subset, e.g. ``sst2`` of ``nyu-mll/glue``).
            train_split: the split of ``dataset`` to train on. Split strings go to ``load_dataset(split=...)``, so a
                slice works, e.g. ``train[:90%]`` (with ``dev_split: train[90%:]`` for a dataset without a dev split).
            dev_split: the split of ``dataset`` that model selection and META-TARTAN's dev samples use.
            test_split: the split of ``dataset`` to test on. It must be labeled: Hub test splits often are not
                (GLUE's labels are -1), which is an error naming this option. ``None``: no test split.
            text_field: the field (JSON key or column) holding the text.
            text_pair_field: the field holding a second text, for sentence-pair tasks (entailment, paraphrase): the
                pair is tokenised together, ``tokenizer(text, text_pair)``, and batches keep the tokenizer's
                ``token_type_ids`` so BERT-style encoders tell the two segments apart. The TAPT corpus derived from
                the training split has one line per example, the two texts joined by a space.
            label_field: the field holding the label.
            label_names: the classes, index = class id, when they are known already: a trained model's, which
                ``tartan validate``, ``test`` and ``predict`` take from ``--ckpt_path`` (so labeling new texts needs
                no training data), or a class order of your own (a class the train split lacks included). Every
                split's labels must be among them. ``None`` reads them from the train split.
            monitor_metric: the dev metric that selects checkpoints and stops early, one of
                ``lightning_tartan.module.MONITOR_METRICS``; ``None`` uses the task's (macro-F1; accuracy for
                ChemProt). ``tartan`` links it to the model and its callbacks.
        """
        super().__init__()
        # plain strings in the hyper-parameters: a Path would make every checkpoint unloadable with weights_only
        data_dir = None if data_dir is None else str(data_dir)
        tokenizer_name_or_path = str(tokenizer_name_or_path)
        for option, value in {"dev_file": dev_file, "dev_split": dev_split}.items():
            if value is None:
                raise ValueError(
                    f"`{option}` (--data.init_args.{option}) is required: the dev split selects checkpoints and stops "
                    "training early (and META-TARTAN draws its dev samples from it); hold out part of the training "
                    "data as one"
                )
        train_file, dev_file = str(train_file), str(dev_file)
        test_file = None if test_file is None else str(test_file)
        predict_file = None if predict_file is None else str(predict_file)
        cache_dir = None if cache_dir is None else str(cache_dir)
        dataset = None if dataset is None else str(dataset)
        if aux_corpora is not None:
            aux_corpora = {str(name): _plain_corpus(str(name), corpus) for name, corpus in aux_corpora.items()}
        if label_names is not None:
            label_names = _checked_label_names(label_names)
        # Lightning's loggers merge these with the model's hyper-parameters, which must agree on every shared key: the
        # model's monitor_metric and label_names are the resolved ones, so defaults (None) are left out here (they
        # resolve alike on load)
        unset = {"monitor_metric": monitor_metric, "label_names": label_names}
        self.save_hyperparameters(ignore=[name for name, value in unset.items() if value is None])
        aux_corpora = dict(self.default_aux_corpora if aux_corpora is None else aux_corpora)
        max_length = self.default_max_length if max_length is None else max_length
        monitor_metric = self.default_monitor_metric if monitor_metric is None else monitor_metric
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
        if monitor_metric not in MONITOR_METRICS:
            raise ValueError(f"`monitor_metric` must be one of {MONITOR_METRICS}, got {monitor_metric!r}")
        for name, file in aux_corpora.items():
            if not name or name in RESERVED_SOURCES:
                raise ValueError(f"`aux_corpora` names must be non-empty and not {RESERVED_SOURCES}, got {name!r}")
            if not file:
                raise ValueError(f"`aux_corpora[{name!r}]` needs a file name")
            if isinstance(file, str) and Path(file).suffix.lower() in FILE_SUFFIXES:
                raise ValueError(
                    f"`aux_corpora[{name!r}]`: {file!r} would be read as plain text, one document per line, its syntax "
                    f"and other fields included; name the field its texts are in: {{{name}: {{dataset: {file}, "
                    "text_field: text}}"
                )
        options = {"train_file": train_file, "dev_file": dev_file, **({"test_file": test_file} if test_file else {})}
        splits = {"dataset_config": dataset_config, "train_split": train_split, "dev_split": dev_split}
        _check_source(data_dir, dataset, options, {**splits, "test_split": test_split})
        if predict_file is not None:
            _check_suffix("predict_file", predict_file, (*FILE_SUFFIXES, ".txt"))
        elif predict_text_field is not None:
            raise ValueError("`predict_text_field` names the text field of `predict_file`, which is not set")
        fields = {"text_field": text_field, "label_field": label_field}
        for name, field in fields.items():
            if not field:
                raise ValueError(f"`{name}` must name a field, got {field!r}")
        if text_pair_field is not None and text_pair_field in fields.values():
            raise ValueError(
                f"`text_pair_field` must differ from `text_field` and `label_field`, got {text_pair_field!r}"
            )

        self.data_dir = None if data_dir is None else Path(data_dir).expanduser()
        self.tokenizer_name_or_path = tokenizer_name_or_path
        #: labeled split -> its file; without "test" when ``test_file`` is None
        self.files = {"train": train_file, "dev": dev_file, **({"test": test_file} if test_file is not None else {})}
        self.predict_file = predict_file
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.hub_splits = {"train": train_split, "dev": dev_split, **({"test": test_split} if test_split else {})}
        self.fields = Fields(text_field, text_pair_field, label_field)
        self._given_label_names = label_names
        #: the fields of ``predict_file``
        self.predict_fields = self.fields
        if predict_text_field:
            self.predict_fields = self.fields._replace(text=predict_text_field, text_option="predict_text_field")
        self.monitor_metric = monitor_metric
        self.aux_corpora = aux_corpora
        self.max_length = max_length
        self.batch_size = batch_size
        self.aux_batch_size = aux_batch_size
        self.dev_batch_size = dev_batch_size
        self.dev_grad_batch_size = dev_grad_batch_size
        self.eval_batch_size = eval_batch_size
        self.accumulate_grad_batches = accumulate_grad_batches
        self.group_by_length = group_by_length
        self.mlm_probability = mlm_probability
        self.include_meta_dev = include_meta_dev
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir

        self.tokenizer: Optional[PreTrainedTokenizerBase] = None
        self.splits: dict[str, Dataset] = {}  # "train" / "dev" / "test" / "predict", tokenised
        self.corpora: dict[str, Dataset] = {}  # aux corpus name -> tokenised documents
        self._read: dict[str, Split] = {}  # split -> its checked examples, read once
        self._run_seed: Optional[int] = None

    # ---- what the model needs at instantiation, without tokenising ----------------------------------

    @cached_property
    def label_names(self) -> list[str]:
        """The classes; index = class id. The ``label_names`` option, else the sorted train-split labels (integer
        labels sort as numbers, so labels 0..n-1 keep their ids), or the names of a ``ClassLabel`` label column, ids
        kept. Read once, before any tokenisation."""
        if self._given_label_names is not None:
            return list(self._given_label_names)
        if self.dataset is None and not self._path(self.files["train"]).exists():
            self._fetch_splits(["train"])  # the model needs the classes before Lightning calls prepare_data
        train = self._split("train")
        if train.class_names is not None:
            return list(train.class_names)
        check_distinct_labels(train.source, train.examples)
        labels = sorted({example.label for example in train.examples}, key=label_order)
        if len(labels) < 2:
            raise DataFormatError(
                f"{train.source.name}: every example has the label {labels[0]!r}; a classifier needs two or more"
            )
        return labels

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def has_test_split(self) -> bool:
        return "test" in (self.files if self.dataset is None else self.hub_splits)

    def _no_test_split(self, purpose: str) -> str:
        option = "test_file" if self.dataset is None else "test_split"
        return f"the task has no test split {purpose} (`{option}` is None: --data.init_args.{option} null)"

    @property
    def aux_names(self) -> list[str]:
        return list(self.aux_corpora)

    # ---- files --------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Fetch missing files from the task's URLs (or download the Hub dataset and corpora) and derive a missing
        TAPT corpus; no network call when every file is present. Only a fit needs every split and the corpora: with
        the classes known (``label_names``), validating, testing and predicting read only the split they score or
        label, and predicting a ``predict_file`` no split at all."""
        stage = self.trainer.state.fn.value if self.trainer is not None else "fit"
        needed = {"fit": ["train", "dev", "test"], "validate": ["dev"], "test": ["test"], "predict": []}[stage]
        if stage == "predict" and self.predict_file is None:
            needed = ["test"]
        if self._given_label_names is None:
            needed = ["train", *needed]
        labeled = self.files if self.dataset is None else self.hub_splits
        needed = [split for split in dict.fromkeys(needed) if split in labeled]
        if self.dataset is None:
            self._fetch_splits(needed)
        else:
            for split in needed:
                name = self.hub_splits[split]
                self._load_hub(self.dataset, self.dataset_config, name, f"`{split}_split`", "`dataset`")
        if stage != "fit":
            return
        self._derive_tapt_corpus()
        for name, corpus in self.aux_corpora.items():
            if isinstance(corpus, dict):
                self._corpus_table(name, corpus)
            elif self.corpus_file(name) == self._path(corpus):
                derived = f"; only `tapt: {DERIVED_TAPT_FILE}` is derived from the train split"
                self._fetch(corpus, f"aux_corpora[{name!r}]", derived if name == "tapt" else "")

    def corpus_file(self, name: str) -> Path:
        """The text file corpus ``name`` is read from: its file in ``data_dir``, except for ``tapt: train.txt`` missing
        there (and from ``urls``), which is derived from the train split into the cache. A Hub corpus has none."""
        corpus = self.aux_corpora[name]
        if isinstance(corpus, dict):
            raise ValueError(f"`aux_corpora[{name!r}]` is read from the dataset {corpus['dataset']!r}, not a file")
        derived = self._derived_tapt_file() if name == "tapt" else None
        return derived if derived is not None else self._path(corpus)

    def _path(self, file: str) -> Path:
        # an absolute `file` replaces data_dir; without data_dir, a relative one is in the working directory
        return (self.data_dir or Path()) / Path(file).expanduser()

    def _fetch_splits(self, needed: list[str]) -> None:
        """When a `needed` split is missing, download all the task's labeled splits into a folder that holds none of
        them. A folder with some is one's own data (or an interrupted download), never completed with published
        splits."""
        missing = {split: file for split, file in self.files.items() if not self._path(file).exists()}
        missing_needed = [split for split in needed if split in missing]
        if not missing_needed:
            return
        if not self.urls:  # one's own task: nothing to download
            split = missing_needed[0]
            path = self._path(missing[split])
            no_test = "; a task without a test split sets `test_file` to null" if split == "test" else ""
            raise MissingDataFile(
                f"{path} does not exist (check `data_dir` and `{split}_file`){_other_formats(path)}{no_test}"
            )
        if len(missing) < len(self.files):
            split = missing_needed[0]
            file = missing[split]
            raise MissingDataFile(
                f"{self._path(file)} does not exist beside the other splits (check `{split}_file`); published splits "
                "are downloaded only into a folder that holds none of them (delete the others to download them all)"
            )
        for split, file in missing.items():
            self._fetch(file, f"{split}_file")

    def _fetch(self, file: str, option: str, hint: str = "") -> None:
        path = self._path(file)
        if path.exists():
            return
        if file not in self.urls:
            raise MissingDataFile(
                f"{path} does not exist (check `data_dir` and `{option}`: a relative path is read in `data_dir`{hint})"
            )
        rank_zero_info(f"Downloading {self.urls[file]} to {path}")
        try:
            with urllib.request.urlopen(self.urls[file], timeout=60) as response:
                _write_atomic(path, response.read())
        except URLError as err:
            raise MissingDataFile(
                f"{path} does not exist and downloading it from {self.urls[file]} failed ({err.reason})"
            ) from None

    def _load_hub(
        self, name: str, config: Optional[str], split: str, option: str, dataset_option: Optional[str] = None
    ) -> Dataset:
        """``load_dataset(name, config, split=split)``; a split it lacks (or a bad slice) names ``option``, a dataset
        that cannot be found (a mistyped folder, say) names ``dataset_option`` (by default ``option``)."""
        try:
            return load_dataset(name, config, split=split, cache_dir=self.cache_dir)
        except (FileNotFoundError, ConnectionError, HFValidationError) as err:
            where, reason = dataset_option or option, str(err).splitlines()[0]
            if Path(name).expanduser().exists():
                raise MissingDataFile(f"{where}: {name!r} holds nothing `load_dataset` can read ({reason})") from None
            raise MissingDataFile(
                f"{where}: {name!r} is neither a folder nor a dataset reachable on the Hugging Face Hub ({reason})"
            ) from None
        except ValueError as err:
            raise DataFormatError(f"{option}: split {split!r} of {name!r}: {err}") from None

    def _cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else Path(datasets.config.HF_DATASETS_CACHE)

    def _derived_tapt_file(self) -> Optional[Path]:
        """Where the TAPT corpus is derived to, or None when none is derived. The TAPT corpus is by definition the
        task's training texts; derived data belongs in the cache, keyed by a hash of the derived text itself (so an
        edited split, or another Hub revision, derives a new corpus), and the data folder is never written."""
        file = self.aux_corpora.get("tapt")
        if file != DERIVED_TAPT_FILE or file in self.urls or self._path(file).exists():
            return None
        if self.dataset is None and not self._path(self.files["train"]).is_file():
            return None
        key = hashlib.sha256(self._tapt_text()).hexdigest()[:16]
        return self._cache_root() / "tartan_tapt_corpora" / key / Path(file).name

    def _tapt_text(self) -> bytes:
        """The training texts, one per line (a pair's two texts joined by a space), whitespace normalised."""
        lines = (" ".join((e.text + " " + (e.text_pair or "")).split()) + "\n" for e in self._labeled("train"))
        return "".join(lines).encode()

    def _derive_tapt_corpus(self) -> None:
        derived = self._derived_tapt_file()
        if derived is None or derived.exists():
            return
        _write_atomic(derived, self._tapt_text())
        unchanged = "" if self.data_dir is None else f"; {self.data_dir} is left unchanged"
        rank_zero_info(
            f"Derived the TAPT corpus (the training texts, one per line) from {self._split('train').source.name}"
            f" into {derived}{unchanged}"
        )

    # ---- reading and checking -----------------------------------------------------------------------

    def _split(self, split: str) -> "Split":
        """The split's examples and where they come from, read and checked once. Empty texts are dropped from train
        and kept elsewhere (see the class docstring); either is reported in one line."""
        if split not in self._read:
            if self.dataset is None:
                option = f"{split}_file"
                read = read_file(self._path(self.files[split]), self.fields, True, option, self.cache_dir)
            else:
                option, name = f"{split}_split", self.hub_splits[split]
                table = self._load_hub(self.dataset, self.dataset_config, name, f"`{option}`", "`dataset`")
                read = read_table(table, Source(f"{self.dataset}[{name}]", rows=True), self.fields, True, option)
            examples = read.examples
            empty = [example.line for example in examples if is_empty(example)]
            if empty:
                kept = split != "train"
                outcome = "kept as an empty input" if kept else "dropped: there is nothing to learn from"
                where, count = read.source, _count(empty, "example")
                rank_zero_info(f"{where.name}: {count} with empty text ({where.lines(empty)}) {outcome}")
                if not kept:
                    examples = [example for example in examples if not is_empty(example)]
            if not examples:
                raise DataFormatError(f"{read.source.name} holds no example with text")
            self._read[split] = replace(read, examples=examples)
        return self._read[split]

    def _labeled(self, split: str) -> list[Example]:
        return self._split(split).examples

    def _check_labels(self, split: str) -> None:
        """Every label of `split` is a class: read from the file alone, so a fit checks the test split before
        training rather than at ``tartan test``, after the whole fit."""
        classes = self.label_names  # the train split is read (and reported on) first
        read = self._split(split)
        check_known_labels(read.source, read.examples, classes, given=self._given_label_names is not None)

    # ---- tokenisation -------------------------------------------------------------------------------

    def setup(self, stage: Optional[str] = None) -> None:
        """Check the labels of every split the stage's run uses, then tokenise what it needs; the tokenised data is
        cached on disk, keyed on the examples, tokenizer and max_length."""
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(local_copy(self.tokenizer_name_or_path))
            self._check_tokenizer()
        self._fit_max_length_to_the_tokenizer()
        if stage == "test" and not self.has_test_split:
            raise DataFormatError(self._no_test_split("to test on"))
        checked = {"fit": ["train", "dev", "test"], "validate": ["dev"], "test": ["test"], "predict": []}
        needed = {"fit": ["train", "dev"], "validate": ["dev"], "test": ["test"], "predict": []}
        for split in checked.get(stage, ["train", "dev", "test"]):
            if split == "train" and self._given_label_names is None:
                continue  # its labels are the classes
            if split != "test" or self.has_test_split:
                self._check_labels(split)
        for split in needed.get(stage, ["train", "dev", "test"]):
            if split == "test" and not self.has_test_split:
                continue
            if split not in self.splits:
                self.splits[split] = self._tokenize_labeled(split)
        if stage == "predict" and "predict" not in self.splits:
            self.splits["predict"] = self._tokenize_predict_inputs()
        if stage in ("fit", None):
            self._report_repeated_texts()
            self._run_seed = None  # a new fit follows the seed set now (a resumed checkpoint restores its own)
            self._derive_tapt_corpus()  # for a setup without prepare_data
            for name, corpus in self.aux_corpora.items():
                if name not in self.corpora:
                    if isinstance(corpus, dict):
                        self.corpora[name] = self._tokenize_hub_corpus(name, corpus)
                    else:
                        self.corpora[name] = self._tokenize_corpus(self.corpus_file(name), f"aux_corpora[{name!r}]")

    def _check_tokenizer(self) -> None:
        """Batches pad on the right, since the classifier reads each row's first token, and need a pad token; the
        masked-LM objectives need a mask token. Refused here, before any text is tokenized, naming the fix."""
        tokenizer, name = self.tokenizer, self.tokenizer_name_or_path
        if tokenizer.pad_token is None:
            raise EncoderInputMismatch(
                f"the tokenizer {name!r} has no pad token, which batches of texts of different lengths need: give it "
                "one of its own tokens (tokenizer.pad_token = tokenizer.unk_token, say: padded positions are masked "
                "out) and save it (tokenizer.save_pretrained(folder)), or pick another `tokenizer_name_or_path`"
            )
        if tokenizer.mask_token is None and self.aux_corpora:
            raise EncoderInputMismatch(
                f"the tokenizer {name!r} has no mask token, which the masked-LM objectives on aux_corpora "
                f"{list(self.aux_corpora)} need: use a masked-LM encoder's tokenizer, or fine-tune without corpora "
                "(aux_corpora={} and weighting 'none': --data.init_args.aux_corpora '{}' --model.weighting none)"
            )
        if tokenizer.padding_side != "right":
            rank_zero_info(
                f"The tokenizer {name!r} pads on the {tokenizer.padding_side}; padding on the right instead, as the "
                "classifier reads each row's first token"
            )
            tokenizer.padding_side = "right"

    def _report_repeated_texts(self) -> None:
        """Say, in a line each, which training texts carry two labels and which dev and test examples repeat a
        training text (their scores then measure memory more than generalisation); nothing is dropped. ACL-ARC's
        published splits have both."""
        train = self._split("train")
        labels: dict[tuple, set[str]] = {}
        for example in train.examples:
            labels.setdefault((example.text, example.text_pair), set()).add(example.label)
        conflicting = [
            example.line for example in train.examples if len(labels[example.text, example.text_pair]) > 1
        ]
        if conflicting:
            rank_zero_info(
                f"{train.source.name}: {_count(conflicting, 'example')} ({train.source.lines(conflicting)}) share "
                "their text with an example of another label"
            )
        for split in ("dev", "test") if self.has_test_split else ("dev",):
            read = self._split(split)
            repeated = [example.line for example in read.examples if (example.text, example.text_pair) in labels]
            if repeated:
                rank_zero_info(
                    f"{read.source.name}: {len(repeated)} of {_count(read.examples, 'example')} "
                    f"({read.source.lines(repeated)}) repeat a text of the train split"
                )

    def _fit_max_length_to_the_tokenizer(self) -> None:
        """Truncate to the tokenizer's `model_max_length` when it is shorter than `max_length` (the default 512 with
        a 128-position encoder, say): longer rows would fail deep inside the encoder's position embeddings."""
        limit = self.tokenizer.model_max_length
        if limit < min(self.max_length, NO_MODEL_MAX_LENGTH):
            rank_zero_warn(
                f"max_length={self.max_length} is longer than the tokenizer's model_max_length={limit}: truncating to "
                f"{limit}; set `max_length` to {limit} or less to silence this"
            )
            self.max_length = limit

    def _tokenize_labeled(self, split: str) -> Dataset:
        read = self._split(split)
        label2id = {label: i for i, label in enumerate(self.label_names)}
        columns = self._text_columns(read.examples)
        columns["labels"] = [label2id[example.label] for example in read.examples]
        return self._tokenize(columns, read.source, cached=True)

    def _text_columns(self, examples: list[Example]) -> dict[str, list]:
        columns: dict[str, list] = {"text": [example.text for example in examples]}
        if self.fields.text_pair is not None:
            columns["text_pair"] = [example.text_pair for example in examples]
        return columns

    def _tokenize(self, columns: dict[str, list], source: "Source", cached: bool) -> Dataset:
        """Tokenise the ``text`` (and ``text_pair``) column; the others pass through. With ``cached``, the result is
        an Arrow file in the cache keyed on the content, tokenizer and max_length, so a second setup reads it."""
        texts = [name for name in ("text", "text_pair") if name in columns]
        encode = {"tokenizer": self.tokenizer, "max_length": self.max_length, "pairs": "text_pair" in columns}
        cache: dict[str, Any] = {}
        if cached:
            digest = hashlib.sha256(json.dumps([columns, self.max_length]).encode())
            digest.update(Hasher.hash(self.tokenizer).encode())
            key = digest.hexdigest()[:32]
            folder = self._cache_root() / "tartan_tokenized"
            folder.mkdir(parents=True, exist_ok=True)
            cache = {"cache_file_name": str(folder / f"{key}.arrow"), "new_fingerprint": key}
        tokenized = Dataset.from_dict(columns).map(
            _encode_texts,
            batched=True,
            remove_columns=texts,
            fn_kwargs=encode,
            desc=f"Tokenizing {Path(source.name).name if not source.rows else source.name}",
            **cache,
        )
        self._report_cut(tokenized, source.name, "text")
        return tokenized

    def _predict_inputs(self) -> tuple["Source", list[Example]]:
        """What ``tartan predict`` labels and its examples: ``predict_file``, or else the test split."""
        if self.predict_file is None:
            if not self.has_test_split:
                raise DataFormatError(self._no_test_split("to label: set `predict_file` (--data.predict_file)"))
            read = self._split("test")
            return read.source, read.examples
        path = self._predict_path()
        if path.suffix.lower() == ".txt":
            with path.open("rb") as lines:
                texts = [(lineno, decode(raw, path, lineno).rstrip("\r\n")) for lineno, raw in enumerate(lines, 1)]
            examples = [Example(lineno, text, None) for lineno, text in texts if text.strip()]
            source = Source(str(path))
            blank = [lineno for lineno, text in texts if not text.strip()]
            if blank:
                rank_zero_info(f"{path}: {_count(blank, 'blank line')} ({source.lines(blank)}) skipped, not labeled")
        else:
            read = read_file(path, self.predict_fields, False, "predict_file", self.cache_dir)
            source, examples = read.source, read.examples
        if not examples:
            raise DataFormatError(f"{path} holds no text to predict")
        if all(example.label is not None for example in examples):
            check_known_labels(source, examples, self.label_names, given=self._given_label_names is not None)
        return source, examples

    def _predict_path(self) -> Path:
        """``predict_file`` where a shell user means it, from the working directory, and else in ``data_dir``."""
        given = Path(self.predict_file).expanduser()
        if given.is_absolute() or given.is_file():
            return given
        in_data_dir = self._path(self.predict_file)
        if not in_data_dir.is_file():
            raise MissingDataFile(
                f"predict_file={self.predict_file!r}: neither {given.resolve()} nor {in_data_dir} exists"
            )
        return in_data_dir

    def _tokenize_predict_inputs(self) -> Dataset:
        source, examples = self._predict_inputs()
        columns = self._text_columns(examples)
        if self.fields.text_pair is not None and any(example.text_pair is None for example in examples):
            raise DataFormatError(f"{source.name}: a sentence-pair task predicts pairs, not one text per line")
        columns["line"] = [example.line for example in examples]
        label2id = {label: i for i, label in enumerate(self.label_names)}
        labeled = sum(example.label is not None for example in examples)
        if labeled == len(examples):
            columns["labels"] = [label2id[example.label] for example in examples]
        elif labeled:
            rank_zero_info(
                f"{source.name}: {labeled} of {_count(examples, 'input')} have a label; predictions are written "
                "without `gold` labels, which need every input to have one"
            )
        return self._tokenize(columns, source, cached=False)

    def _tokenize_corpus(self, path: Path, option: str) -> Dataset:
        check_file(path, option)
        try:
            lines = load_dataset(  # utf-8-sig: an editor's byte-order mark is not part of the first document
                "text", data_files=str(path), split="train", cache_dir=self.cache_dir, encoding="utf-8-sig"
            )
        except DatasetGenerationError as err:
            if isinstance(err.__cause__, UnicodeDecodeError):
                check_utf8(path)
            raise
        docs = lines.filter(_non_blank, batched=True, input_columns="text", desc=f"Dropping blank lines in {path.name}")
        if len(docs) == 0:
            raise DataFormatError(f"{path} has no non-blank lines to train on")
        if len(docs) < len(lines):
            rank_zero_info(f"{path}: {_count(range(len(lines) - len(docs)), 'blank line')} skipped")
        return self._tokenize_documents(docs, path.name)

    def _tokenize_hub_corpus(self, name: str, corpus: dict[str, str]) -> Dataset:
        """A corpus of ``aux_corpora`` given as a dataset: its ``text_field`` column, blank texts skipped."""
        split, field = corpus.get("split", "train"), corpus.get("text_field", "text")
        table = self._corpus_table(name, corpus)
        where = f"`aux_corpora[{name!r}]` ({corpus['dataset']}[{split}])"
        if field not in table.column_names:
            columns = names(table.column_names)
            raise DataFormatError(f"{where}: no {field!r} column (columns: {columns}); set its text_field")
        texts = table.select_columns([field])
        if field != "text":
            texts = texts.rename_column(field, "text")
        docs = texts.filter(_non_blank, batched=True, input_columns="text", desc=f"Dropping blank texts in {name}")
        if len(docs) == 0:
            raise DataFormatError(f"{where} has no non-blank texts to train on")
        if len(docs) < len(texts):
            rank_zero_info(f"{where}: {_count(range(len(texts) - len(docs)), 'blank text')} skipped")
        return self._tokenize_documents(docs, name)

    def _corpus_table(self, name: str, corpus: dict[str, str]) -> Dataset:
        """A corpus given as a dataset: a data file (JSON Lines, CSV, TSV or Parquet) whole, or a split of a Hub
        dataset or folder."""
        path = Path(corpus["dataset"]).expanduser()
        suffix = path.suffix.lower()
        if not (path.is_file() and suffix in FILE_SUFFIXES):
            split, option = corpus.get("split", "train"), f"`aux_corpora[{name!r}]`"
            return self._load_hub(corpus["dataset"], corpus.get("config"), split, option)
        builder = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}.get(suffix, "json")
        options = {"delimiter": "\t"} if suffix == ".tsv" else {}
        return load_dataset(builder, data_files=str(path), split="train", cache_dir=self.cache_dir, **options)

    def _tokenize_documents(self, docs: Dataset, name: str) -> Dataset:
        tokenized = docs.map(
            _encode_documents,
            batched=True,
            remove_columns=docs.column_names,
            fn_kwargs={"tokenizer": self.tokenizer, "max_length": self.max_length},
            desc=f"Tokenizing {name}",
        )
        self._report_cut(tokenized, name, "document")
        return tokenized

    def _report_cut(self, tokenized: Dataset, where: str, noun: str) -> None:
        """Say how many rows reach `max_length`, where longer texts lose their ends: nothing is cut without a word."""
        full = int((token_lengths(tokenized) >= self.max_length).sum())
        if full:
            rank_zero_info(
                f"{where}: {full} of {_count(tokenized, noun)} reach max_length={self.max_length} tokens, where longer "
                "ones are cut (--data.init_args.max_length)"
            )

    # ---- loaders ------------------------------------------------------------------------------------

    def train_dataloader(self) -> CombinedLoader:
        """One batch of every source per training batch, for as many batches as the longest source has; samplers are
        ours, so the order is set per epoch and a loader restored from a checkpoint continues its epoch."""
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        seed = self.run_seed
        sources = {END_TASK: (self.splits["train"], self.batch_size)}
        sources.update({name: (docs, self.aux_batch_size) for name, docs in self.corpora.items()})
        num_batches = max(math.ceil(math.ceil(len(data) / world_size) / size) for data, size in sources.values())
        # each source gets its own seed: the TAPT corpus is the train texts in the same order, and equal
        # seeds over equal lengths would pair every end-task batch with the same texts to reconstruct
        loaders = {}
        for i, (name, (data, batch_size)) in enumerate(sources.items()):
            corpus = name != END_TASK
            grouping = self._length_grouping(data, batch_size)
            sampler = SourceSampler(data, batch_size, num_batches, world_size, rank, seed + i, corpus, grouping)
            if corpus:  # a tokenizer without a mask token fine-tunes without corpora
                masking = SeededMasking(
                    DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=self.mlm_probability)
                )
                loaders[name] = self._step_loader(WithMaskKeys(data), batch_size, masking, sampler, seed)
            else:
                loaders[name] = self._step_loader(data, batch_size, self._padding_collator(), sampler, seed)
        if self.include_meta_dev:
            dev = self.splits["dev"]
            samples = {META_DEV: self.dev_batch_size, META_DEV_GRAD: self.dev_grad_batch_size}
            for offset, (name, size) in enumerate(samples.items(), start=len(sources)):
                sampler = DevSampleSampler(dev, size, num_batches, seed=seed + offset)
                loaders[name] = self._step_loader(dev, size, self._padding_collator(), sampler, seed)
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _length_grouping(self, data: Dataset, batch_size: int) -> Optional[LengthGrouping]:
        """With ``group_by_length``, the grouping of a source whose loader batch is one optimizer step's
        micro-batches, so each micro-batch is cut from rows of similar length."""
        if not self.group_by_length:
            return None
        return LengthGrouping(token_lengths(data), batch_size * self.accumulate_grad_batches)

    def _step_loader(
        self, data: Sized, batch_size: int, collate: Callable, sampler: Sampler, seed: int
    ) -> StatefulDataLoader:
        """A training source's loader: one batch per optimizer step, ``accumulate_grad_batches`` micro-batches of
        ``batch_size`` each (a plain batch without accumulation). The sampler's order is the same either way, and
        each micro-batch is padded and masked exactly as a batch of its own would be."""
        if self.accumulate_grad_batches == 1:
            return self._loader(data, batch_size, collate, sampler, seed)
        grouped = MicroBatches(collate, batch_size)
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

    def _padding_collator(self) -> "PlainDict":
        return PlainDict(DataCollatorWithPadding(self.tokenizer))

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


# Module-level so `datasets` fingerprints them (with tokenizer and max_length from fn_kwargs) for its cache.
def _encode_texts(batch: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, pairs: bool = False) -> dict:
    if pairs:  # token_type_ids tell BERT-style encoders the two segments apart
        return tokenizer(batch["text"], batch["text_pair"], truncation=True, max_length=max_length)
    return tokenizer(batch["text"], truncation=True, max_length=max_length, return_token_type_ids=False)


def _non_blank(texts: list[Optional[str]]) -> list[bool]:
    return [isinstance(text, str) and bool(text.strip()) for text in texts]


def _encode_documents(batch: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    # the special-tokens mask lets the MLM collator skip [CLS]/[SEP]/<s>/</s> without recomputing them
    return tokenizer(
        batch["text"],
        truncation=True,
        max_length=max_length,
        return_token_type_ids=False,
        return_special_tokens_mask=True,
    )


def _check_suffix(option: str, file: str, suffixes: tuple[str, ...]) -> None:
    suffix = Path(file).suffix.lower()
    if suffix not in suffixes:
        raise DataFormatError(
            f"`{option}`={file!r}: unsupported suffix {suffix or '(none)'!r}; the format is read from the suffix,"
            f" one of {', '.join(suffixes)}"
        )


def _check_source(data_dir: Optional[str], dataset: Optional[str], files: dict[str, str], splits: dict) -> None:
    """Exactly one place to read the labeled splits from, and no option that would be silently ignored."""
    defaults = {name: p.default for name, p in inspect.signature(EndTaskDataModule.__init__).parameters.items()}
    if data_dir is None and dataset is None:
        raise ValueError(
            "set `data_dir` (the folder of the task's files) or `dataset` (a Hugging Face Hub dataset, or a folder in"
            " its layout); with `tartan`, a task config sets it: --config configs/tasks/<task>.yaml"
        )
    if data_dir is not None and Path(data_dir).expanduser().is_file():
        raise ValueError(
            f"`data_dir`={data_dir!r} is a file: it names the folder of the task's files, and `train_file`, "
            "`dev_file` and `test_file` the files in it"
        )
    if dataset is None:
        for option, value in splits.items():
            if value != defaults[option]:
                raise ValueError(f"`{option}`={value!r} only applies to a `dataset`, which is not set")
        for option, file in files.items():
            _check_suffix(option, file, FILE_SUFFIXES)
        return
    for option, file in files.items():
        if file != defaults[option]:
            raise ValueError(
                f"`{option}`={file!r} is not read when `dataset` is set: the labeled splits are `train_split`,"
                " `dev_split` and `test_split` of the dataset"
            )


def _plain_corpus(name: str, corpus: Union[str, Mapping[str, Any]]) -> AuxCorpus:
    """An ``aux_corpora`` entry as plain strings (hyper-parameters stay loadable with ``weights_only``), checked."""
    if not isinstance(corpus, Mapping):
        return str(corpus)
    unknown = sorted(set(map(str, corpus)) - set(HUB_CORPUS_KEYS))
    if unknown:
        raise ValueError(f"`aux_corpora[{name!r}]`: unknown keys {unknown}; a dataset corpus takes {HUB_CORPUS_KEYS}")
    if not corpus.get("dataset"):
        raise ValueError(
            f"`aux_corpora[{name!r}]` needs a `dataset` (a Hub dataset name or a folder), got {dict(corpus)!r}"
        )
    return {str(key): str(value) for key, value in corpus.items() if value is not None}


def _other_formats(path: Path) -> str:
    """A hint naming the files beside `path` with its name and another suffix (``train.csv`` for ``train.jsonl``)."""
    found = sorted(
        other.name for other in path.parent.glob(f"{path.stem}.*") if other.suffix.lower() in FILE_SUFFIXES
    ) if path.parent.is_dir() else []
    return f"; the folder has {names(found)}: name it with that option" if found else ""


def _checked_label_names(label_names: Sequence[Any]) -> list[str]:
    """The ``label_names`` option as strings, as labels are read; two or more, no two alike to a reader."""
    if isinstance(label_names, str) or len(label_names) < 2:
        raise ValueError(f"`label_names` must list two or more classes, got {label_names!r}")
    classes = [str(name) for name in label_names]
    keys = [label_key(name) for name in classes]
    alike = sorted({name for name, key in zip(classes, keys) if keys.count(key) > 1})
    if alike:
        raise ValueError(f"`label_names` must name each class once, one way; {alike} are alike (case, spaces)")
    return classes


def _count(items: Sized, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _write_atomic(path: Path, content: bytes) -> None:
    """Readers (and other ranks) see either no file or the whole file, with the permissions the umask gives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)
