"""Every masked-LM architecture people pick trains, exports and reloads in transformers with the same logits.

Tiny random configs of each architecture (no downloads), with MiniLM's WordPiece tokenizer (any tokenizer whose
ids fit the vocabulary will do for random weights).
"""
import pytest
import torch
from transformers import (
    AlbertConfig,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    LongformerConfig,
    ModernBertConfig,
    MPNetConfig,
    RobertaConfig,
    RoFormerConfig,
    XLMRobertaConfig,
    pipeline,
)

from conftest import minilm_path
from lightning_tartan import TartanModule
from lightning_tartan import heads
from synthetic import make_batches, with_padding
from test_module import HostReads, fit

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=101, eos_token_id=102, cls_token_id=101, sep_token_id=102)
CONFIGS = {
    "bert": lambda vocab: BertConfig(vocab_size=vocab, **SMALL),
    "roberta": lambda vocab: RobertaConfig(vocab_size=vocab, max_position_embeddings=514, **SMALL),
    "xlm-roberta": lambda vocab: XLMRobertaConfig(vocab_size=vocab, max_position_embeddings=514, **SMALL),
    "deberta-v2": lambda vocab: DebertaV2Config(vocab_size=vocab, **SMALL),  # DeBERTa-v3 is this architecture
    "albert": lambda vocab: AlbertConfig(vocab_size=vocab, embedding_size=16, **SMALL),
    "electra": lambda vocab: ElectraConfig(vocab_size=vocab, embedding_size=16, **SMALL),
    "distilbert": lambda vocab: DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "modernbert": lambda vocab: ModernBertConfig(vocab_size=vocab, **SMALL, **SPECIAL_IDS),
    "mpnet": lambda vocab: MPNetConfig(vocab_size=vocab, **SMALL),  # sentence-transformers' all-mpnet-base-v2
    "roformer": lambda vocab: RoFormerConfig(vocab_size=vocab, **SMALL),  # its head applies hidden_act, not tanh
    # its classifier gives the first token global attention, which the module's end-task passes give it too
    "longformer": lambda vocab: LongformerConfig(
        vocab_size=vocab, max_position_embeddings=514, attention_window=8, **SMALL
    ),
}
LABELS = ["background", "method", "result"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def tiny_encoder_of(architecture: str, tokenizer, folder) -> str:
    torch.manual_seed(0)
    AutoModelForMaskedLM.from_config(CONFIGS[architecture](tokenizer.vocab_size)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("weighting", ["equal", "meta"])
@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_trains_exports_and_reloads_with_the_same_logits(architecture, weighting, tokenizer, tmp_path):
    encoder = tiny_encoder_of(architecture, tokenizer, tmp_path / "encoder")
    module = TartanModule(
        encoder, num_labels=3, label_names=LABELS, aux_objectives=["tapt"], weighting=weighting, dropout=0.0
    )
    head_before = {key: value.clone() for key, value in module.mlm_head.state_dict().items()}
    sources = ("end_task", "tapt", "meta_dev", "meta_dev_grad")
    batches = [{key: batch[key] for key in sources} for batch in make_batches(3)]
    fit(module, batches)
    assert any(not torch.equal(value, module.mlm_head.state_dict()[key]) for key, value in head_before.items())
    module.eval()
    batch = make_batches(1, seed=7)[0]

    module.save_end_task_model(tmp_path / "classifier")
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier").eval()
    end_task = batch["end_task"]
    with torch.no_grad():
        expected = module(end_task["input_ids"], end_task["attention_mask"])
        actual = classifier(input_ids=end_task["input_ids"], attention_mask=end_task["attention_mask"]).logits
    torch.testing.assert_close(actual, expected)
    prediction = pipeline("text-classification", model=str(tmp_path / "classifier"))("We follow their method.")
    assert prediction[0]["label"] in LABELS

    module.save_mlm_model(tmp_path / "mlm")  # what TAPT hands to the next stage
    masked_lm = AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    tapt = batch["tapt"]
    with torch.no_grad():
        expected = module.mlm_head(module.encode(tapt, end_task=False))
        actual = masked_lm(input_ids=tapt["input_ids"], attention_mask=tapt["attention_mask"]).logits
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_the_encoder_computes_the_same_with_its_mask_made_on_the_host(architecture, tokenizer, tmp_path):
    """Where the module hands the encoder a ready attention mask, so that it reads nothing back from the device, the
    encoder computes what it does from the 2D mask, bit for bit, with and without padding. Architectures that build
    another mask (ModernBERT's sliding window, DeBERTa's own) or that lightning-tartan does not hand one (MPNet,
    RoFormer, Longformer) keep the 2D one."""
    module = TartanModule(tiny_encoder_of(architecture, tokenizer, tmp_path), num_labels=3, dropout=0.0).eval()
    own_masks = ("deberta-v2", "modernbert", "mpnet", "roformer", "longformer")
    assert module.ready_attention_masks == (architecture not in own_masks)
    batch = make_batches(1)[0]
    for source in (batch["end_task"], with_padding(batch)["end_task"]):
        marked = module.on_before_batch_transfer(source, 0)
        with torch.no_grad(), HostReads() as reads:
            hidden = module.encode(marked)
        with torch.no_grad():
            expected = module.encode(source)
        torch.testing.assert_close(hidden, expected, rtol=0, atol=0)
        if module.ready_attention_masks:
            assert reads.calls == []


def test_a_masked_lm_head_put_together_wrongly_is_refused_at_construction(tokenizer, tmp_path, monkeypatch):
    """DistilBERT registers its activation before the layers around it; in registration order its head computes
    other logits than the model's, which lightning-tartan notices instead of training a wrong head."""
    encoder = tiny_encoder_of("distilbert", tokenizer, tmp_path / "encoder")
    monkeypatch.setattr(heads, "MLM_HEAD_ORDER", {})
    with pytest.raises(ValueError, match=r"do not compute its masked-LM logits") as error:
        TartanModule(encoder, num_labels=3, aux_objectives=["tapt"])
    assert str(error.value).startswith(f"encoder_name_or_path={encoder!r}: DistilBertForMaskedLM")


def test_an_architecture_whose_classifier_cannot_be_exported_is_refused_at_construction(tokenizer, tmp_path):
    """BART's classification head reads the end-of-sequence token of its decoder; nothing to map our head onto,
    so the module says so before any training rather than at export."""
    from transformers import BartConfig

    config = BartConfig(
        vocab_size=tokenizer.vocab_size, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
    )
    AutoModelForMaskedLM.from_config(config).save_pretrained(tmp_path / "bart")
    with pytest.raises(ValueError, match=r"does not know BartForSequenceClassification's classifier layout"):
        TartanModule(str(tmp_path / "bart"), num_labels=3, aux_objectives=["tapt"])


def test_an_encoder_without_a_masked_lm_form_is_refused_naming_the_option(tokenizer, tmp_path):
    """GPT-2 is no masked-LM: one line naming the option and what to pick, not transformers' list of every model."""
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^encoder_name_or_path=.*: 'gpt2' has no masked-LM model in transformers"):
        TartanModule(str(tmp_path), num_labels=3, aux_objectives=["tapt"])


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_gradient_checkpointing_is_on_or_refused_naming_the_option(architecture, tokenizer, tmp_path):
    """transformers checkpoints every architecture here but ALBERT and MPNet, which are refused at construction."""
    encoder = tiny_encoder_of(architecture, tokenizer, tmp_path / "encoder")
    without = {"albert": "AlbertModel", "mpnet": "MPNetModel"}
    if architecture in without:
        refused = rf"^gradient_checkpointing=True: {without[architecture]} does not support"
        with pytest.raises(ValueError, match=refused):
            TartanModule(encoder, num_labels=3, aux_objectives=["tapt"], gradient_checkpointing=True)
        return
    module = TartanModule(encoder, num_labels=3, aux_objectives=["tapt"], gradient_checkpointing=True)
    parts = [part for part in module.encoder.modules() if hasattr(part, "gradient_checkpointing")]
    assert parts and all(part.gradient_checkpointing for part in parts), architecture
