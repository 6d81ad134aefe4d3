"""The one data module every TARTAN end task builds on.

A training batch is a dict with one entry per source, cycled to the longest one::

    {"end_task": {input_ids, attention_mask, labels},   # labels: class ids
     "<corpus>": {input_ids, attention_mask, labels},   # one per aux MLM corpus, labels: -100 where unmasked
     "meta_dev": {input_ids, attention_mask, labels},   # a random labeled dev sample: META-TARTAN's dev head
     "meta_dev_grad": {input_ids, attention_mask, labels}}  # a second, independent one: its held-out dev gradient

Validation and test batches are plain ``{input_ids, attention_mask, labels}`` dicts, in file order.
"""
import json
import logging
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch
from datasets import Dataset, load_dataset
from pytorch_lightning import LightningDataModule
from pytorch_lightning.utilities import CombinedLoader
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

RESERVED_SOURCES = ("end_task", "meta_dev", "meta_dev_grad")
DSP_URL = "https://allennlp.s3-us-west-2.amazonaws.com/dont_stop_pretraining/data/{task}/{split}.jsonl"


def dsp_urls(task: str) -> dict[str, str]:
    """The labeled splits as published by "Don't Stop Pretraining" (Gururangan et al., 2020)."""
    return {f"{split}.jsonl": DSP_URL.format(task=task, split=split) for split in ("train", "dev", "test")}


class DataFormatError(ValueError):
    """A task file exists but its content cannot be used; the message names the file (and line)."""


class EndTaskDataModule(LightningDataModule):
    """Labeled end-task splits, auxiliary MLM corpora and a meta-dev sample for TARTAN training.

    Subclasses only set the class attributes below.
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
        aux_corpora: Optional[dict[str, str]] = None,
        max_length: Optional[int] = None,
        batch_size: int = 64,
        aux_batch_size: int = 64,
        dev_batch_size: int = 32,
        dev_grad_batch_size: int = 64,
        eval_batch_size: int = 64,
        mlm_probability: float = 0.15,
        include_meta_dev: bool = True,
        num_workers: int = 0,
        seed: Optional[int] = None,
        cache_dir: Optional[str] = None,
    ) -> None:
        """
        Args:
            data_dir: folder holding the task files (may be read-only once all files exist).
            aux_corpora: corpus name -> text file with one document per line; ``None`` uses the task's
                defaults, ``{}`` trains without auxiliary corpora.
            max_length: truncation length in tokens; ``None`` uses the task's default.
            dev_batch_size: size of the ``meta_dev`` sample META-TARTAN fits its dev head on (the paper's 32).
            dev_grad_batch_size: size of the ``meta_dev_grad`` sample its held-out dev gradient is taken on (the
                paper's 64). Both are drawn afresh for every training batch, without replacement within a sample.
            include_meta_dev: build the two dev samples (META-TARTAN needs them; other methods ignore them).
            seed: shuffling of every source and the dev samples; ``None`` follows the run's seed
                (``seed_everything``, i.e. ``tartan --seed_everything``), or 0 when none was set.
            cache_dir: where ``datasets`` caches the tokenised splits; ``None`` uses its default cache.
        """
        super().__init__()
        self.save_hyperparameters()
        aux_corpora = dict(self.default_aux_corpora if aux_corpora is None else aux_corpora)
        max_length = self.default_max_length if max_length is None else max_length
        batch_sizes = {
            "batch_size": batch_size,
            "aux_batch_size": aux_batch_size,
            "dev_batch_size": dev_batch_size,
            "dev_grad_batch_size": dev_grad_batch_size,
            "eval_batch_size": eval_batch_size,
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
        for name, file in aux_corpora.items():
            if not name or name in RESERVED_SOURCES:
                raise ValueError(f"`aux_corpora` names must be non-empty and not {RESERVED_SOURCES}, got {name!r}")
            if not file:
                raise ValueError(f"`aux_corpora[{name!r}]` needs a file name")

        self.data_dir = Path(data_dir).expanduser()
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.files = {"train": train_file, "dev": dev_file, "test": test_file}
        self.aux_corpora = aux_corpora
        self.max_length = max_length
        self.batch_size = batch_size
        self.aux_batch_size = aux_batch_size
        self.dev_batch_size = dev_batch_size
        self.dev_grad_batch_size = dev_grad_batch_size
        self.eval_batch_size = eval_batch_size
        self.mlm_probability = mlm_probability
        self.include_meta_dev = include_meta_dev
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir

        self.tokenizer: Optional[PreTrainedTokenizerBase] = None
        self.splits: dict[str, Dataset] = {}  # "train" / "dev" / "test", tokenised
        self.corpora: dict[str, Dataset] = {}  # aux corpus name -> tokenised documents
        self._run_seed: Optional[int] = None

    # ---- what the model needs at instantiation, without tokenising ----------------------------------

    @cached_property
    def label_names(self) -> list[str]:
        """The sorted train-split labels; index = class id. Read once, before any tokenisation."""
        self._fetch(self.files["train"])  # the model needs this before Lightning calls prepare_data
        return sorted({label for _, _, label in _read_jsonl(self._path(self.files["train"]))})

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def aux_names(self) -> list[str]:
        return list(self.aux_corpora)

    # ---- files --------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Fetch missing files from the task's URLs; makes no network call when every file is present."""
        for file in self.files.values():
            self._fetch(file)
        for name, file in self.aux_corpora.items():
            path, train = self._path(file), self._path(self.files["train"])
            if name == "tapt" and not path.exists() and file not in self.urls and train.exists():
                # the TAPT corpus is by definition the task's training texts, one per line
                texts = (" ".join(text.split()) + "\n" for _, text, _ in _read_jsonl(train))
                _write_atomic(path, "".join(texts).encode())
                rank_zero_only(log.info)(f"Derived the TAPT corpus {path} from {train}")
            self._fetch(file)

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

    # ---- tokenisation -------------------------------------------------------------------------------

    def setup(self, stage: Optional[str] = None) -> None:
        """Tokenise what ``stage`` needs; ``datasets`` caches it on disk, keyed on tokenizer and max_length."""
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
        needed = {"fit": ["train", "dev"], "validate": ["dev"], "test": ["test"], "predict": ["test"]}
        for split in needed.get(stage, ["train", "dev", "test"]):
            if split not in self.splits:
                self.splits[split] = self._tokenize_labeled(self.files[split])
        if stage in ("fit", None):
            self._run_seed = None  # a new fit follows the seed set now (a resumed checkpoint restores its own)
            for name, file in self.aux_corpora.items():
                if name not in self.corpora:
                    self.corpora[name] = self._tokenize_corpus(file)

    def _tokenize_labeled(self, file: str) -> Dataset:
        path = self._path(file)
        label2id = {label: i for i, label in enumerate(self.label_names)}
        if file != self.files["train"]:  # the train split defines the vocabulary, so it is valid by construction
            for lineno, _, label in _read_jsonl(path):
                if label not in label2id:
                    raise DataFormatError(f"{path}:{lineno}: label {label!r} never occurs in the train split")
        raw = load_dataset("json", data_files=str(path), split="train", cache_dir=self.cache_dir)
        return raw.map(
            _encode_labeled,
            batched=True,
            remove_columns=raw.column_names,
            fn_kwargs={"tokenizer": self.tokenizer, "max_length": self.max_length, "label2id": label2id},
            desc=f"Tokenizing {path.name}",
        )

    def _tokenize_corpus(self, file: str) -> Dataset:
        path = self._path(file)
        _check_file(path)
        lines = load_dataset("text", data_files=str(path), split="train", cache_dir=self.cache_dir)
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
        """Every source cycles until the longest is exhausted; samplers are ours so order is set per epoch."""
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        seed = self.run_seed
        mlm = _PlainDict(DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=self.mlm_probability))
        # each source gets its own seed: the TAPT corpus is the train texts in the same order, and equal
        # seeds over equal lengths would pair every end-task batch with the same texts to reconstruct
        sources = {"end_task": (self.splits["train"], self.batch_size, self._padding_collator())}
        sources.update({name: (docs, self.aux_batch_size, mlm) for name, docs in self.corpora.items()})
        loaders = {}
        for i, (name, (data, batch_size, collate)) in enumerate(sources.items()):
            sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=True, seed=seed + i)
            loaders[name] = self._loader(data, batch_size, collate, sampler, seed)
        if self.include_meta_dev:
            batches = max(len(loader) for loader in loaders.values())
            dev = self.splits["dev"]
            samples = {"meta_dev": self.dev_batch_size, "meta_dev_grad": self.dev_grad_batch_size}
            for offset, (name, size) in enumerate(samples.items(), start=len(sources)):
                sampler = DevSampleSampler(dev, size, batches, seed=seed + offset)
                loaders[name] = self._loader(dev, size, self._padding_collator(), sampler, seed)
        return CombinedLoader(loaders, mode="max_size_cycle")

    @property
    def run_seed(self) -> int:
        """``seed``, or the run's seed when it is ``None``: fixed when fit starts, and restored from a checkpoint
        (``state_dict``), so a run resumed under another seed continues the original order."""
        if self._run_seed is None:
            self._run_seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        return self._run_seed

    def state_dict(self) -> dict[str, Any]:
        return {"run_seed": self.run_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._run_seed = state_dict["run_seed"]

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.splits["dev"], self.eval_batch_size, self._padding_collator())

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits["test"], self.eval_batch_size, self._padding_collator())

    def predict_dataloader(self) -> DataLoader:
        """`tartan predict` labels the test split, in file order."""
        return self.test_dataloader()

    def _padding_collator(self) -> "_PlainDict":
        return _PlainDict(DataCollatorWithPadding(self.tokenizer))

    def _loader(
        self, data: Dataset, batch_size: int, collate: Callable, sampler: Optional[Sampler] = None, seed: int = 0
    ) -> DataLoader:
        return DataLoader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate,
            # a new iterator draws its worker seed from here, not from the global RNG that dropout and MLM
            # masking use (and that a checkpoint restores)
            generator=torch.Generator().manual_seed(seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,  # shorter sources restart many times per epoch
        )


class DevSampleSampler(DistributedSampler):
    """A fresh random dev sample for every training batch, as the paper draws them, the same on every rank.

    Each consecutive block of ``sample_size`` indices is one sample drawn without replacement (with replacement
    only when the split is smaller than a sample); ``num_draws`` blocks cover an epoch of the longest source,
    so the loader never restarts within an epoch. The draws depend only on ``seed`` and the epoch (Lightning
    calls ``set_epoch``), so a resumed run draws the same samples. A ``DistributedSampler`` with one replica,
    so Lightning leaves it unsharded under DDP.
    """

    def __init__(self, dev: Dataset, sample_size: int, num_draws: int, seed: int) -> None:
        super().__init__(dev, num_replicas=1, rank=0, shuffle=True, seed=seed)
        self.sample_size = sample_size
        self.num_samples = self.total_size = sample_size * num_draws

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.dataset)
        for _ in range(self.num_samples // self.sample_size):
            if n >= self.sample_size:
                yield from torch.randperm(n, generator=generator)[: self.sample_size].tolist()
            else:
                yield from torch.randint(n, (self.sample_size,), generator=generator).tolist()


@dataclass
class _PlainDict:
    """HF collators return a ``BatchEncoding`` (a ``UserDict``); the batch contract is plain dicts."""

    collator: Callable[[list], Any]

    def __call__(self, examples: list) -> dict:
        return dict(self.collator(examples))


# Module-level so `datasets` fingerprints them (with tokenizer and max_length from fn_kwargs) for its cache.
def _encode_labeled(batch: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, label2id: dict) -> dict:
    encoded = tokenizer(batch["text"], truncation=True, max_length=max_length, return_token_type_ids=False)
    encoded["labels"] = [label2id[label] for label in batch["label"]]
    return encoded


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


def _read_jsonl(path: Path) -> list[tuple[int, str, str]]:
    """Check every line in plain Python, so a bad file fails with its line number instead of inside `datasets`.

    Blank lines are skipped (as the JSON loader does). Returns (line number, text, label) per example.
    """
    _check_file(path)
    examples = []
    with path.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(example, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(example).__name__}")
            for key in ("text", "label"):
                if key not in example:
                    raise DataFormatError(f"{path}:{lineno}: no {key!r} field")
            text, label = example["text"], example["label"]
            if not isinstance(text, str) or not text.strip():
                raise DataFormatError(f"{path}:{lineno}: 'text' is empty or not a string")
            if not isinstance(label, str) or not label:
                raise DataFormatError(f"{path}:{lineno}: 'label' must be a non-empty string, got {label!r}")
            examples.append((lineno, text, label))
    if not examples:
        raise DataFormatError(f"{path} holds no examples")
    return examples


def _write_atomic(path: Path, content: bytes) -> None:
    """Readers (and other ranks) see either no file or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(content)
    os.replace(tmp.name, path)
