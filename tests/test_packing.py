"""`pack_sequences`: the encoder runs a padded micro-batch's rows packed into fewer rows and computes what it computes
on the padded rows, for every architecture that packs, in training and on the real ACL-ARC batches."""
import pytest
import pytorch_lightning as pl
import torch

from conftest import minilm_path
from datamodules import CitationIntentDataModule
from lightning_tartan import TartanModule
from lightning_tartan.packing import PACKED, first_fit, pack, unpack
from synthetic import make_batches
from test_architectures import tiny_encoder_of
from test_module import HostReads, fit, make_module, reads_per_step

PACKABLE = ["bert", "roberta", "xlm-roberta", "albert", "electra", "distilbert"]
#: real tokens of each row of the micro-batches below: 6 rows of 12 positions hold 38 tokens, 4 packed rows of 12
LENGTHS = [12, 3, 5, 7, 2, 9]


def ragged(source: dict, lengths: list[int] = LENGTHS) -> dict:
    """`source` with row i holding `lengths[i]` real tokens, the rest padding (pad id 0, attention 0, no MLM label),
    and, for a labeled source, two segments per row as a sentence pair has."""
    source = {key: value.clone() for key, value in source.items()}
    columns = torch.arange(source["input_ids"].shape[1])
    real = columns < torch.tensor(lengths)[:, None]
    source["input_ids"][~real] = 0
    source["attention_mask"] = real.long()
    if source["labels"].dim() == 2:
        source["labels"][~real] = -100
    else:
        source["token_type_ids"] = ((columns >= torch.tensor(lengths)[:, None] // 2) & real).long()
    return source


def ragged_batches(count: int) -> list[dict]:
    return [{name: ragged(source) for name, source in batch.items()} for batch in make_batches(count, batch_size=6)]


def test_rows_pack_whole_into_fewer_rows_and_unpack_to_their_places():
    micro_batch = ragged(make_batches(1, batch_size=6)[0]["end_task"])
    packed = pack(micro_batch, "bert", pad_token_id=0)[PACKED]
    assert packed["input_ids"].shape == (4, 12)
    real = micro_batch["attention_mask"].bool()
    restored = unpack(packed["input_ids"][..., None], packed, real.shape)[..., 0]
    assert torch.equal(restored[real], micro_batch["input_ids"][real])
    assert sorted(row for group in first_fit(LENGTHS, 12) for row in group) == list(range(6))
    assert all(sum(LENGTHS[row] for row in group) <= 12 for group in first_fit(LENGTHS, 12))
    unpadded = make_batches(1, batch_size=6)[0]["end_task"]
    assert PACKED not in pack(unpadded, "bert", pad_token_id=0)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("architecture", PACKABLE)
def test_a_packed_micro_batch_encodes_as_its_padded_rows(architecture, padding_side, tmp_path):
    """Same hidden states at every real token, whichever side a collator pads: positions (RoBERTa's count from its
    padding index, BERT's columns), segments and the block-diagonal mask are right; and encoding a packed micro-batch
    reads nothing back from the device."""
    from transformers import AutoTokenizer

    encoder = tiny_encoder_of(architecture, AutoTokenizer.from_pretrained(minilm_path()), tmp_path)
    module = TartanModule(encoder, num_labels=3, dropout=0.0, pack_sequences=True).eval()
    micro_batch = ragged(make_batches(1, batch_size=6)[0]["end_task"])
    if architecture == "distilbert":  # no segment embeddings
        del micro_batch["token_type_ids"]
    if padding_side == "left":
        micro_batch = {key: value.flip(1) if value.dim() == 2 else value for key, value in micro_batch.items()}
    packed = module.on_before_batch_transfer(micro_batch, 0)
    assert packed[PACKED]["input_ids"].shape[0] == 4
    with torch.no_grad(), HostReads() as reads:
        hidden = module.encode(packed)
    with torch.no_grad():
        expected = TartanModule(encoder, num_labels=3, dropout=0.0).eval().encode(micro_batch)
    real = micro_batch["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], expected[real], rtol=1e-5, atol=1e-6)
    assert reads.calls == []


class GradientsAtTheOptimizerStep(pl.Callback):
    def __init__(self) -> None:
        self.gradients: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {name: p.grad.clone() for name, p in pl_module.named_parameters() if p.grad is not None}
        self.gradients.append(grads)


@pytest.mark.parametrize("weighting", ["equal", "meta"])
def test_a_packed_step_computes_the_padded_steps_gradients(tiny_encoder, weighting):
    """Every objective, META's dev samples and both accumulated micro-batches packed: the same gradients at the
    optimizer step and the same task weights after it as the padded step's (AdamW's first steps move every weight by
    about the learning rate whatever its gradient's size, so weights would compare rounding's signs); and no host
    reads inside a step over three steps."""
    batches = ragged_batches(6)
    runs = {}
    for pack_sequences in (False, True):
        torch.manual_seed(0)  # the same end-task head
        options = {"weighting": weighting, "accumulate_grad_batches": 2, "pack_sequences": pack_sequences}
        module = make_module(tiny_encoder, **options)
        gradients = GradientsAtTheOptimizerStep()
        fit(module, batches[:2], callbacks=[gradients])
        runs[pack_sequences] = gradients.gradients[0], module.state_dict()
    (padded_grads, padded_state), (packed_grads, packed_state) = runs[False], runs[True]
    assert padded_grads.keys() == packed_grads.keys() and any(name.startswith("encoder.") for name in padded_grads)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    task_weights = [name for name in padded_state if name.startswith("weighting.")]
    assert bool(task_weights) == (weighting == "meta")
    for name in task_weights:
        torch.testing.assert_close(packed_state[name], padded_state[name], rtol=1e-5, atol=1e-7, msg=name)
    module = make_module(tiny_encoder, weighting=weighting, accumulate_grad_batches=2, pack_sequences=True)
    assert reads_per_step(module, batches) == [[], [], []]


@pytest.mark.parametrize("architecture, options", [
    ("deberta-v2", {}), ("modernbert", {}), ("bert", {"attn_implementation": "eager"}),
])
def test_packing_needs_an_encoder_that_takes_ready_masks(architecture, options, tmp_path):
    from transformers import AutoTokenizer

    encoder = tiny_encoder_of(architecture, AutoTokenizer.from_pretrained(minilm_path()), tmp_path)
    with pytest.raises(ValueError, match=r"pack_sequences=True needs an encoder that takes ready attention masks"):
        TartanModule(encoder, num_labels=3, pack_sequences=True, **options)


def test_real_acl_arc_batches_pack_into_a_third_of_their_rows_and_encode_alike(data_root, cache_dir):
    """MiniLM (pretrained) on ACL-ARC's own training batches: about two-thirds of a padded batch is padding."""
    encoder = str(minilm_path())
    data = CitationIntentDataModule(
        data_dir=data_root / "citation_intent", tokenizer_name_or_path=encoder, batch_size=24, aux_batch_size=24,
        include_meta_dev=False, cache_dir=cache_dir, seed=0,
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))[0]
    module = TartanModule.from_datamodule(data, encoder_name_or_path=encoder, pack_sequences=True).eval()
    marked = module.on_before_batch_transfer(batch, 0)
    for name in ("end_task", "tapt"):
        assert marked[name][PACKED]["input_ids"].numel() < 0.6 * batch[name]["input_ids"].numel()
    with torch.no_grad():
        hidden = module.encode(marked["end_task"])
        expected = TartanModule.from_datamodule(data, encoder_name_or_path=encoder).eval().encode(batch["end_task"])
    real = batch["end_task"]["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], expected[real], rtol=1e-4, atol=1e-5)
