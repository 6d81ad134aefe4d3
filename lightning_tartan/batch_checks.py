"""The checks that name what a batch from a data module of one's own gets wrong, before the step runs.

`TartanModule.on_before_batch_transfer` runs them on every batch while it is still on the host, where reading it
costs no wait for the device. Without them, a mistake either fails deep inside torch or the encoder (a list of
labels, float labels, rows longer than the encoder's positions, an evaluation batch in the training format) or,
worse, trains the wrong thing without a word: a corpus the model was not told about is never trained, and an MLM
batch whose inputs were not masked trains the encoder to copy its input.
"""
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_tartan.heads import EncoderInputMismatch, position_limit
from lightning_tartan.weighting import META_DEV, META_DEV_GRAD, RESERVED_SOURCES

#: below this many labelled tokens, an MLM micro-batch whose labelled inputs are all unmasked may be chance (each
#: labelled token stays unmasked one time in ten); at this many, that chance is 1e-20
MIN_LABELLED_TO_CHECK_MASKING = 20
FORMAT = "see the batch format in the README, 'With a LightningDataModule of your own'"


class BatchFormatError(ValueError):
    """A batch that is not in the format `TartanModule` takes; the message names the source and what to change."""


def check_training_sources(
    sources: Sequence[str], needed: Sequence[str], aux_objectives: Sequence[str], trains_mlm: bool
) -> None:
    """A training batch holds every source the step reads (`needed`), and a multitask run trains every corpus its
    batches bring: one the model was not told about would be loaded and never trained. (Fine-tuning alone, weighting
    "none", takes batches with corpora and leaves them out.)"""
    missing = [name for name in needed if name not in sources]
    if missing:
        dev = " (META-TARTAN's dev samples)" if {META_DEV, META_DEV_GRAD} & set(missing) else ""
        raise BatchFormatError(
            f"the training batch has no {missing}{dev}, which this weighting reads; its sources: {sorted(sources)}; "
            f"{FORMAT}"
        )
    unknown = sorted(set(sources) - set(RESERVED_SOURCES) - set(aux_objectives))
    if unknown and trains_mlm:
        raise BatchFormatError(
            f"the training batch holds {unknown}, which aux_objectives={list(aux_objectives)} does not name, so it "
            "would never be trained: add it to aux_objectives (TartanModule(..., aux_objectives=[...]), or "
            "TartanModule.from_datamodule), or leave it out of the batch"
        )


def check_evaluation_batch(batch: Any) -> None:
    """Validation, test and predict batches are one flat dict of tensors, not one entry per source."""
    if not isinstance(batch, Mapping):
        raise BatchFormatError(
            f"an evaluation batch is a dict {{input_ids, attention_mask, labels}} (labels optional to predict), not a "
            f"{type(batch).__name__}; {FORMAT}"
        )
    if "input_ids" not in batch:
        shape = " (this one maps sources to batches, as a training batch does)" if _maps_sources(batch) else ""
        raise BatchFormatError(
            f"an evaluation batch is {{input_ids, attention_mask, labels}} (labels optional to predict){shape}; "
            f"its keys: {sorted(batch)}; {FORMAT}"
        )


def checked_source(
    name: str, source: Mapping[str, Any], labeled: bool, mlm: bool, encoder: nn.Module, num_labels: int
) -> dict[str, Any]:
    """One micro-batch of source `name` (or an evaluation batch, `name` "evaluation"), checked against the `encoder`
    it is for, with integer labels of any width as int64 (what torch's losses take). `labeled`: it must hold class
    ids, one per row (a predict batch may, and then they are checked alike); `mlm`: it must hold MLM labels (token
    ids at masked positions, -100 elsewhere) for inputs that were masked."""
    where = f"batch source {name!r}" if name != "evaluation" else "the evaluation batch"
    for key in ("input_ids", "attention_mask"):
        if key not in source:
            raise BatchFormatError(f"{where} has no {key!r} (its keys: {sorted(source)}); {FORMAT}")
        if not isinstance(source[key], Tensor):
            raise BatchFormatError(f"{where}: {key!r} must be a tensor, got {type(source[key]).__name__}")
    inputs, mask = source["input_ids"], source["attention_mask"]
    if inputs.dim() != 2 or inputs.is_floating_point() or inputs.dtype == torch.bool:
        raise BatchFormatError(
            f"{where}: 'input_ids' must be token ids, integers of shape (rows, tokens), got {inputs.dtype} of shape "
            f"{tuple(inputs.shape)}"
        )
    if mask.shape != inputs.shape:
        raise BatchFormatError(
            f"{where}: 'attention_mask' has shape {tuple(mask.shape)}, not that of 'input_ids', {tuple(inputs.shape)}"
        )
    if mask.device.type == "cpu" and mask.numel():
        left_padded = (mask[:, 0].eq(0) & mask.ne(0).any(dim=1)).nonzero().flatten().tolist()
        if left_padded:
            raise BatchFormatError(
                f"{where}: rows {left_padded[:5]}{'...' if len(left_padded) > 5 else ''} start with padding "
                "(attention_mask 0 at their first token): pad on the right (tokenizer.padding_side = 'right'), as "
                "the classifier reads each row's first token"
            )
    limit = position_limit(encoder)
    if limit is not None and inputs.shape[-1] > limit:
        raise EncoderInputMismatch(
            f"{where} holds rows of {inputs.shape[-1]} tokens, more than the encoder's {limit} positions: "
            f"truncate them, e.g. tokenizer(..., truncation=True, max_length={limit})"
        )
    vocabulary = encoder.get_input_embeddings().num_embeddings
    if inputs.device.type == "cpu" and inputs.numel() and not 0 <= int(inputs.min()) <= int(inputs.max()) < vocabulary:
        raise EncoderInputMismatch(
            f"{where} holds token ids outside 0..{vocabulary - 1}, the encoder's vocabulary ({int(inputs.min())} to "
            f"{int(inputs.max())}): tokenize with the encoder's own tokenizer"
        )
    source = dict(source)
    labels = source.get("labels")
    if labels is None:
        if mlm or labeled:
            what = "transformers' DataCollatorForLanguageModeling builds them" if mlm else "class ids, shape (batch,)"
            raise BatchFormatError(f"{where} has no 'labels' ({what}); its keys: {sorted(source)}")
        return source
    if not isinstance(labels, Tensor):
        raise BatchFormatError(f"{where}: 'labels' must be a tensor, got {type(labels).__name__}; {FORMAT}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise BatchFormatError(f"{where}: 'labels' must be integer ids, got {labels.dtype}")
    source["labels"] = labels = labels.long()
    expected = tuple(inputs.shape) if mlm else tuple(inputs.shape[:1])
    if tuple(labels.shape) != expected:
        what = "one token id or -100 per input token" if mlm else "one class id per row"
        raise BatchFormatError(f"{where}: 'labels' has shape {tuple(labels.shape)}, not {expected} ({what})")
    if labels.device.type != "cpu":  # reading it would make the host wait for the device
        return source
    if mlm:
        _check_masked(where, inputs, labels)
    elif labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_labels:
        outside = sorted({label for label in labels.tolist() if not 0 <= label < num_labels})
        raise BatchFormatError(f"{where}: class ids {outside} are outside 0..{num_labels - 1} (num_labels={num_labels})")
    return source


def _check_masked(where: str, inputs: Tensor, labels: Tensor) -> None:
    labelled = labels.ne(-100)
    count = int(labelled.sum())
    if count >= MIN_LABELLED_TO_CHECK_MASKING and bool(inputs[labelled].eq(labels[labelled]).all()):
        raise BatchFormatError(
            f"{where}: none of its {count} labelled tokens is masked in input_ids, so the MLM objective would train "
            "the encoder to copy its input: mask the labelled tokens, e.g. with transformers' "
            "DataCollatorForLanguageModeling(tokenizer, mlm=True); labels are -100 where nothing is masked"
        )


def _maps_sources(batch: Mapping[str, Any]) -> bool:
    return any(isinstance(value, (Mapping, list, tuple)) for value in batch.values())
