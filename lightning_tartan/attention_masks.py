"""The encoder's attention mask, handed over ready, so that the encoder never reads it back from the device.

transformers (5.x) turns a 2D padding mask into the 4D mask its SDPA attention takes, after checking whether any
position is padded at all (`padding_mask.all()`: with none, it drops the mask so that SDPA may use its flash
kernel). On a GPU that check makes the host wait until every queued kernel has run, once per encoder forward: several
times per TARTAN step, each time losing the overlap of the host queueing the next forward with the device still
running the last backward. A mask that is already 4D transformers uses as is.

So the module marks each micro-batch on the host, before it moves to the device, with whether it holds padding
(`mark_padding`), and `encoder_mask` hands the encoder either no mask (nothing padded) or the 4D boolean mask
transformers' SDPA path would have built itself. This holds for the architectures whose encoder builds its mask
with transformers' `create_bidirectional_mask` and nothing else (`READY_MASK_ARCHITECTURES`; ModernBERT, for one,
also derives a sliding-window mask from the 2D one, and DeBERTa builds its own), loaded with SDPA attention. Every
other encoder gets the 2D mask, as before.
"""
from typing import Any, Mapping, Optional

import transformers
from torch import Tensor

#: the key `mark_padding` adds to a micro-batch: whether any of its positions is padding (a Python bool)
PADDED = "padded"
#: model types whose encoder (transformers >= 5, SDPA attention) takes the ready mask `encoder_mask` builds
READY_MASK_ARCHITECTURES = frozenset({"albert", "bert", "distilbert", "electra", "roberta", "xlm-roberta"})


def takes_ready_masks(model_type: str, attn_implementation: Optional[str]) -> bool:
    """Whether an encoder of this architecture and attention kernel (None: transformers' default) takes a ready
    mask; `ready_mask_attention` gives the kernel to load it with."""
    version = int(transformers.__version__.split(".")[0])
    return version >= 5 and model_type in READY_MASK_ARCHITECTURES and attn_implementation in (None, "sdpa")


def ready_mask_attention(model_type: str, attn_implementation: Optional[str]) -> Optional[str]:
    """The attention kernel to load the encoder with: SDPA, asked for by name, where it takes ready masks (a mask made
    for SDPA given to another kernel would be wrong), else the one requested."""
    return "sdpa" if takes_ready_masks(model_type, attn_implementation) else attn_implementation


def mark_padding(micro_batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """`micro_batch` with `PADDED` added, while its mask is still on the host (reading it there waits for nothing)."""
    mask = micro_batch.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.device.type != "cpu":
        return micro_batch
    return {**micro_batch, PADDED: not bool(mask.all())}


def encoder_mask(micro_batch: Mapping[str, Any]) -> Optional[Tensor]:
    """The mask to give an encoder that takes ready masks: none when nothing is padded, else transformers' own SDPA
    mask (each row's padding, broadcast over its queries). A micro-batch not marked on the host (a direct call)
    gets its 2D mask, and transformers checks it, waiting for the device once."""
    mask = micro_batch["attention_mask"]
    padded = micro_batch.get(PADDED)
    if padded is None:
        return mask
    if not padded:
        return None
    rows, length = mask.shape
    return mask.bool()[:, None, None, :].expand(rows, 1, length, length)
