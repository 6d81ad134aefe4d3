"""Packed micro-batches: a padded micro-batch's rows laid end to end in fewer rows, so the encoder computes its real
tokens rather than its padding.

A batch is padded to its longest row, and at the paper's batch size ACL-ARC's training batches are about two-thirds
padding (one third with `group_by_length`); every matrix product of the encoder costs the same for a padded position
as for a real one. Packing, done on the host while the micro-batch is still there (`pack`, no wait for the device),
places whole rows into as few rows of the micro-batch's length as hold them (first fit, longest first), and keeps for
every token the position id it had in its own row. On the device, `packed_encoder_inputs` makes a block-diagonal
attention mask from each token's row number, so every token attends to the tokens of its own row only, as in the
padded micro-batch, and `unpack` puts the encoder's hidden states back in the padded layout, so heads and losses
read them as before.

The hidden states equal the padded micro-batch's up to rounding (the same sums, over differently shaped matrices).
Dropout draws its masks over the packed shape, so a packed run differs from a padded one by sampling noise. It needs
an encoder that takes ready 4D masks (`attention_masks.takes_ready_masks`), all of which take position ids.
"""
from typing import Any, Mapping

import torch
from torch import Tensor

#: the key `pack` adds to a padded micro-batch, a dict of the packed tensors (`packed_encoder_inputs`, `unpack`)
PACKED = "packed"
#: model types whose position ids count a row's real tokens on from the padding index (RoBERTa's
#: `create_position_ids_from_input_ids`); the others number a row's columns from 0
POSITIONS_AFTER_PADDING_INDEX = frozenset({"roberta", "xlm-roberta"})


def row_position_ids(input_ids: Tensor, model_type: str, pad_token_id: int) -> Tensor:
    """The position ids an encoder of `model_type` gives the tokens of a padded micro-batch."""
    if model_type in POSITIONS_AFTER_PADDING_INDEX:
        real = input_ids.ne(pad_token_id).long()
        return real.cumsum(1) * real + pad_token_id
    rows, length = input_ids.shape
    return torch.arange(length).expand(rows, length)


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Row indices grouped into packed rows of at most `capacity` tokens: longest first, each into the first packed
    row with room (first fit decreasing: never more than 11/9 of the fewest rows possible, plus one)."""
    packed: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda index: -lengths[index]):
        target = next((index for index, free in enumerate(room) if free >= lengths[row]), len(packed))
        if target == len(packed):
            packed.append([])
            room.append(capacity)
        packed[target].append(row)
        room[target] -= lengths[row]
    return packed


def pack(micro_batch: Mapping[str, Any], model_type: str, pad_token_id: int) -> Mapping[str, Any]:
    """`micro_batch` with `PACKED` added when it holds padding (on the host; others are returned as they are).

    `PACKED` holds, for the packed rows: `input_ids`, `position_ids` (each token's in its own row), `token_type_ids`
    when the micro-batch has them, `source_rows` (the row each token comes from; a packed row's unused tail gets
    negative numbers, one per position, so it attends to itself only), and `unpack_index` (for every position of the
    padded micro-batch, the packed position whose hidden state it takes; padding takes the first one, whose value no
    loss reads)."""
    mask = micro_batch.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.device.type != "cpu" or bool(mask.all()):
        return micro_batch
    mask = mask.bool()
    rows, length = mask.shape
    lengths = mask.sum(1).tolist()
    if max(lengths) == 0:
        return micro_batch
    groups = first_fit(lengths, length)
    packed_row, offset = [0] * rows, [0] * rows
    packed_length = 0
    for index, group in enumerate(groups):
        start = 0
        for row in group:
            packed_row[row], offset[row] = index, start
            start += lengths[row]
        packed_length = max(packed_length, start)
    positions = len(groups) * packed_length
    # every real token's packed position: its row's first one, plus its rank among its row's real tokens
    first = torch.tensor(packed_row) * packed_length + torch.tensor(offset)
    packed_position = first[:, None] + mask.cumsum(1) - 1
    source = mask.flatten().nonzero().squeeze(1)
    destination = packed_position.flatten().index_select(0, source)

    def packed(values: Tensor, fill: Tensor) -> Tensor:
        real = values.flatten().index_select(0, source)
        return fill.to(values.dtype).index_copy(0, destination, real).view(len(groups), -1)

    token_rows = torch.arange(rows).unsqueeze(1).expand(rows, length)
    unpack_index = torch.where(mask, packed_position, 0).flatten()
    zeros = torch.zeros(positions, dtype=torch.long)
    tensors = {
        "input_ids": packed(micro_batch["input_ids"], zeros + pad_token_id),
        "position_ids": packed(row_position_ids(micro_batch["input_ids"], model_type, pad_token_id), zeros),
        "source_rows": packed(token_rows, -1 - torch.arange(positions)),
        "unpack_index": unpack_index,
    }
    if "token_type_ids" in micro_batch:
        tensors["token_type_ids"] = packed(micro_batch["token_type_ids"], zeros)
    return {**micro_batch, PACKED: tensors}


def packed_encoder_inputs(packed: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The encoder's keyword arguments for a packed micro-batch: its tokens, their positions and segments, and the
    block-diagonal 4D boolean mask (each token attends to the tokens of its own row), made here, on the device."""
    rows = packed["source_rows"]
    inputs = {
        "input_ids": packed["input_ids"],
        "position_ids": packed["position_ids"],
        "attention_mask": rows[:, None, :, None] == rows[:, None, None, :],
    }
    if "token_type_ids" in packed:
        inputs["token_type_ids"] = packed["token_type_ids"]
    return inputs


def unpack(hidden: Tensor, packed: Mapping[str, Tensor], padded_shape: torch.Size) -> Tensor:
    """The encoder's hidden states over the packed rows, in the padded micro-batch's `(rows, length)` layout."""
    flat = hidden.flatten(0, 1).index_select(0, packed["unpack_index"])
    return flat.view(*padded_shape, hidden.shape[-1])
