"""Deterministic hand-made TARTAN batches for the core tests, independent of the datamodules."""
import torch
from torch.utils.data import DataLoader

VOCAB_LOW, VOCAB_HIGH = 1000, 2000  # ordinary WordPiece ids, clear of special tokens


def make_batches(n: int, batch_size: int = 4, length: int = 12, num_labels: int = 3, seed: int = 0) -> list[dict]:
    """`n` training batches with `end_task`, `tapt`, `dapt`, `meta_dev` and `meta_dev_grad`; MLM masks every 4th
    position, so any split of a batch along its rows has the same number of masked tokens per row."""
    generator = torch.Generator().manual_seed(seed)

    def ids() -> torch.Tensor:
        return torch.randint(VOCAB_LOW, VOCAB_HIGH, (batch_size, length), generator=generator)

    def labeled() -> dict:
        return {
            "input_ids": ids(),
            "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
            "labels": torch.randint(0, num_labels, (batch_size,), generator=generator),
        }

    def mlm() -> dict:
        input_ids = ids()
        labels = torch.full_like(input_ids, -100)
        labels[:, 1::4] = input_ids[:, 1::4]
        input_ids[:, 1::4] = 103  # [MASK]
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    return [
        {"end_task": labeled(), "tapt": mlm(), "dapt": mlm(), "meta_dev": labeled(), "meta_dev_grad": labeled()}
        for _ in range(n)
    ]


def with_padding(batch: dict) -> dict:
    """`batch` with its rows padded as a collator pads a batch of unequal lengths: row i ends i positions early
    (pad token 0, attention 0, no MLM label)."""
    def padded(source: dict) -> dict:
        source = {key: value.clone() for key, value in source.items()}
        for row in range(1, len(source["input_ids"])):
            source["input_ids"][row, -row:] = 0
            source["attention_mask"][row, -row:] = 0
            if source["labels"].dim() == 2:
                source["labels"][row, -row:] = -100
        return source

    return {name: padded(source) for name, source in batch.items()}


def shard(batch: dict, rank: int, world_size: int, dev_samples_too: bool = False) -> dict:
    """Rows of every source split across ranks, but the dev samples, which are the same everywhere (as the data
    modules draw them) unless `dev_samples_too` (as a `DistributedSampler` of one's own would split them)."""
    def part(source: dict) -> dict:
        rows = len(source["input_ids"]) // world_size
        return {key: value[rank * rows : (rank + 1) * rows] for key, value in source.items()}

    def kept(name: str) -> bool:
        return name.startswith("meta_dev") and not dev_samples_too

    return {name: source if kept(name) else part(source) for name, source in batch.items()}


def group(batches: list[dict], accumulate: int) -> list[dict]:
    """Consecutive batches as the micro-batches of one optimizer step each: every source maps to a list."""
    if accumulate == 1:
        return batches
    steps = [batches[start : start + accumulate] for start in range(0, len(batches), accumulate)]
    return [{name: [micro[name] for micro in step] for name in step[0]} for step in steps]


def loader(batches: list[dict], accumulate: int = 1) -> DataLoader:
    """One training batch per optimizer step, of `accumulate` consecutive `batches`."""
    # Its own generator keeps the global RNG (dropout) untouched by iterator creation, as the datamodules do.
    return DataLoader(group(batches, accumulate), batch_size=None, generator=torch.Generator())
