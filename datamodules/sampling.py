"""The training-batch machinery behind exact resumes.

A run resumed from a mid-epoch checkpoint must see exactly the batches the uninterrupted run saw. So every sampler
here fixes its order by the seed and the epoch, serves it through an iterator whose (epoch, position) a
``StatefulDataLoader`` checkpoints, and draws the dev samples and MLM masks from the seed, the epoch and the batch's
position rather than from a global RNG.
"""
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sized

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset
from torch.utils.data import DistributedSampler
from transformers import DataCollatorForLanguageModeling


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


def token_lengths(data: Dataset) -> np.ndarray:
    """Tokens in each row of a tokenised dataset, read off its Arrow ``input_ids`` column: no row is decoded."""
    return pc.list_value_length(data.with_format("arrow")["input_ids"]).to_numpy()


@dataclass(frozen=True)
class LengthGrouping:
    """Reorders an epoch's indices so that rows of similar length share a loader batch, which is padded to its
    longest row: less padding, so faster steps.

    Each run of consecutive indices filling ``mega_batch`` loader batches (a mega-batch, as in HF's
    LengthGroupedSampler) is sorted by length, longest first, and cut into loader batches of ``batch_rows``; then the
    epoch's full batches are shuffled, so lengths do not fall from long to short within each mega-batch. A trailing
    partial batch stays last, where the loader cuts it. The epoch keeps exactly its indices, only their order
    changes. An epoch of fewer than ``4 * mega_batch`` batches is cut into four mega-batches (at least one batch
    each), as HF does: sorting a small epoch whole would give nearly the same batches every epoch. A mega-batch never
    spans more than one pass over the source (``pass_rows``): a short corpus repeats its rows within an epoch, and
    sorting across passes would put a row's copies side by side, in one batch.
    """

    lengths: np.ndarray  # tokens in each row of the source
    batch_rows: int  # rows of a loader batch: all micro-batches of an optimizer step
    mega_batch: int = 50  # loader batches per mega-batch, at most

    def __call__(self, indices: list[int], rng: np.random.Generator, pass_rows: int) -> list[int]:
        span = self.batch_rows * max(1, min(self.mega_batch, len(indices) // self.batch_rows // 4))
        span = min(span, pass_rows)
        ordered: list[int] = []
        for start in range(0, len(indices), span):
            chunk = np.asarray(indices[start : start + span])
            # stable: rows of equal length keep the epoch's random order
            ordered += chunk[np.argsort(-self.lengths[chunk], kind="stable")].tolist()
        full = len(ordered) // self.batch_rows
        batches = [ordered[b * self.batch_rows : (b + 1) * self.batch_rows] for b in range(full)]
        return [index for b in rng.permutation(full) for index in batches[b]] + ordered[full * self.batch_rows :]


class SourceSampler(EpochSampler):
    """This rank's shard of a training source, for an epoch of ``num_batches`` batches.

    The longest source makes one pass, in ``DistributedSampler``'s order. A shorter one makes pass after pass, each in
    a new order, until it fills ``num_batches`` full batches, so no loader restarts within an epoch. With
    ``mask_keys`` each index comes with the key of its position (seed, epoch, rank, position), from which the MLM
    masks of the batch it starts are drawn. With ``grouping`` that order is then grouped by length, by a shuffle
    drawn from the seed, the epoch and the rank, so a resumed run groups alike.
    """

    def __init__(
        self,
        data: Sized,
        batch_size: int,
        num_batches: int,
        num_replicas: int,
        rank: int,
        seed: int,
        mask_keys: bool,
        grouping: Optional[LengthGrouping] = None,
    ) -> None:
        shard = math.ceil(len(data) / num_replicas)
        length = shard if math.ceil(shard / batch_size) == num_batches else num_batches * batch_size
        super().__init__(data, num_replicas, rank, seed, length)
        self.mask_keys = mask_keys
        self.grouping = grouping

    def epoch_indices(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        indices: list[int] = []
        while len(indices) < self.length:
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
            padded = (order * math.ceil(self.total_size / len(order)))[: self.total_size]  # equal shards on all ranks
            indices += padded[self.rank : self.total_size : self.num_replicas]
        if self.grouping is None:
            return indices[: self.length]
        rng = np.random.default_rng((self.seed, epoch, self.rank))
        return self.grouping(indices[: self.length], rng, pass_rows=self.num_samples)

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


class WithMaskKeys(torch.utils.data.Dataset):
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
class SeededMasking:
    """MLM masking of a batch drawn from a generator seeded by the key of its first document: new masks for every
    batch, epoch and seed, yet the same in any process, with any number of workers and after a resume. The global RNG,
    which dropout draws from, is left as it was.

    A batch in which no token drew a mask (a few short documents: four of five tokens each go unmasked about one time in
    twenty-five at 0.15) gets one masked token, drawn alike, so that every MLM batch trains its objective rather than
    log a loss of 0."""

    collator: DataCollatorForLanguageModeling

    def __call__(self, items: list[tuple[dict, MaskKey]]) -> dict:
        seed = int(np.random.SeedSequence(items[0][1]).generate_state(1, np.uint64)[0])
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            batch = dict(self.collator([document for document, _ in items]))
            if not batch["labels"].ne(-100).any():
                self._mask_one_token(batch)
            return batch

    def _mask_one_token(self, batch: dict) -> None:
        tokenizer, ids = self.collator.tokenizer, batch["input_ids"]
        candidates = (~torch.isin(ids, torch.tensor(tokenizer.all_special_ids))).nonzero()  # padding is special
        if len(candidates):
            row, column = candidates[torch.randint(len(candidates), ())]
            batch["labels"][row, column] = ids[row, column]
            ids[row, column] = tokenizer.mask_token_id


@dataclass
class MicroBatches:
    """Collates a step's examples as consecutive micro-batches of ``size``, each on its own."""

    collate: Callable[[list], dict]
    size: int

    def __call__(self, examples: list) -> list[dict]:
        return [self.collate(examples[start : start + self.size]) for start in range(0, len(examples), self.size)]


@dataclass
class PlainDict:
    """HF collators return a ``BatchEncoding`` (a ``UserDict``); the batch contract is plain dicts."""

    collator: Callable[[list], Any]

    def __call__(self, examples: list) -> dict:
        return dict(self.collator(examples))
