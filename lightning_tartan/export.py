"""Trained weights as plain Hugging Face model folders: the end-task classifier, and encoder + MLM head for a later
stage (`ExportEncoder`, which hands a continued-pre-training run to a fine-tuning run)."""
import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from lightning_tartan.heads import ClassificationHead, end_task_inputs, masked_lm_head

if TYPE_CHECKING:
    from lightning_tartan.module import TartanModule


def classification_model(
    encoder: PreTrainedModel, head: ClassificationHead, label_names: Sequence[str]
) -> PreTrainedModel:
    """The architecture's `AutoModelForSequenceClassification` computing what `head(encoder(x))` computes."""
    config = classification_config(encoder.config, label_names)
    model = AutoModelForSequenceClassification.from_config(config)
    _load_encoder(model, encoder)
    dense, norm, out = classifier_layers(model)
    with torch.no_grad():
        for source, target in ((head.dense, dense), (head.norm, norm), (head.out_proj, out)):
            if target is not None:
                target.load_state_dict(source.state_dict())
    return model


def masked_lm_model(encoder: PreTrainedModel, mlm_head: nn.Module) -> PreTrainedModel:
    """The architecture's `AutoModelForMaskedLM` with this encoder and MLM head."""
    model = AutoModelForMaskedLM.from_config(copy.deepcopy(encoder.config))
    _load_encoder(model, encoder)
    masked_lm_head(model).load_state_dict(mlm_head.state_dict())
    return model


def classification_config(encoder_config: PretrainedConfig, label_names: Sequence[str]) -> PretrainedConfig:
    """The encoder's config with the labels, and with the classifier options that make the architecture's head
    compute `ClassificationHead`'s function: first-token pooling, DeBERTa's pooler activation tanh."""
    config = copy.deepcopy(encoder_config)
    config.num_labels = len(label_names)
    config.id2label = dict(enumerate(label_names))
    config.label2id = {name: i for i, name in enumerate(label_names)}
    if hasattr(config, "pooler_hidden_act"):  # DeBERTa
        config.pooler_hidden_act = "tanh"
    if hasattr(config, "classifier_pooling"):  # ModernBERT
        config.classifier_pooling = "cls"
    return config


def classifier_layers(model: PreTrainedModel) -> tuple[nn.Linear, Optional[nn.LayerNorm], nn.Linear]:
    """Where `ClassificationHead`'s dense layer, norm and output layer go in a sequence-classification model."""
    classifier = getattr(model, "classifier", None)
    if all(isinstance(getattr(classifier, name, None), nn.Linear) for name in ("dense", "out_proj")):
        return classifier.dense, None, classifier.out_proj  # RoBERTa, XLM-RoBERTa, ELECTRA
    if isinstance(classifier, nn.Linear):
        head, pre_classifier = getattr(model, "head", None), getattr(model, "pre_classifier", None)
        head_norm, head_dense = getattr(head, "norm", None), getattr(head, "dense", None)
        if isinstance(head_norm, nn.LayerNorm) and isinstance(head_dense, nn.Linear):
            return head_dense, head_norm, classifier  # ModernBERT
        if isinstance(pre_classifier, nn.Linear):
            return pre_classifier, None, classifier  # DistilBERT
        pooler = getattr(model, "pooler", None)
        pooler = getattr(model.base_model, "pooler", None) if pooler is None else pooler
        dense = getattr(pooler, "dense", pooler)
        if isinstance(dense, nn.Linear):
            return dense, None, classifier  # BERT, ALBERT, DeBERTa
    raise NotImplementedError(f"lightning-tartan does not know {type(model).__name__}'s classifier layout")


def check_exportable(encoder_config: PretrainedConfig, head_options: dict[str, Any]) -> None:
    """Raise NotImplementedError now, not after training, when the architecture's `AutoModelForSequenceClassification`
    would not compute what the module trains, `ClassificationHead(**head_options)` over the encoder's first token
    (with `heads.end_task_inputs`): its classifier layout is unknown, or it computes something else from the same
    weights (another activation, say). Compared on a one-layer copy of the architecture with a
    small vocabulary and random weights, on the CPU, leaving the caller's random state as it was."""
    config = classification_config(encoder_config, ["0", "1"])
    _one_layer(config)
    _small_vocabulary(config)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"), torch.no_grad():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config).float().eval()  # as trained: bf16 configs too
        head = ClassificationHead(config.hidden_size, 2, 0.0, **head_options).eval()
        for target, source in zip((head.dense, head.norm, head.out_proj), classifier_layers(model)):
            if source is not None and target is not None:  # a norm on one side only shows in the logits below
                target.load_state_dict(source.state_dict())
        inputs = {"input_ids": torch.randint(config.vocab_size, (2, 16))}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs.update(end_task_inputs(config.model_type, inputs["input_ids"]))
        expected = head(model.base_model(**inputs).last_hidden_state)
        actual = model(**inputs).logits
    if not torch.allclose(actual, expected, rtol=1e-4, atol=1e-6):
        raise NotImplementedError(
            f"{type(model).__name__}'s logits differ from those of lightning-tartan's head over the encoder's first "
            "token with the same weights: its export would not be the model trained"
        )


def _one_layer(config: PretrainedConfig) -> None:
    """`config` cut to one layer, with its per-layer lists (Longformer's attention windows, ModernBERT's layer types),
    where the architecture allows it (Funnel counts its layers otherwise): what can differ between the classifier and
    the module is around the layers, not inside them."""
    layers = config.num_hidden_layers
    try:
        config.num_hidden_layers = 1
    except NotImplementedError:
        return
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == layers:
            setattr(config, key, value[:1])


def _small_vocabulary(config: PretrainedConfig, size: int = 16) -> None:
    """`config` with a vocabulary of `size` tokens, its special token ids renumbered into it in their order (equal ids
    stay equal): embedding tables of the full vocabulary would take most of the check's time."""
    special = {key: id_ for key, id_ in config.to_dict().items() if key.endswith("_token_id") and type(id_) is int}
    renumbered = {value: index for index, value in enumerate(sorted(set(special.values())))}
    for key, value in special.items():
        setattr(config, key, renumbered[value])
    config.vocab_size = max(size, len(renumbered))


def _load_encoder(model: PreTrainedModel, encoder: nn.Module) -> None:
    missing, unexpected = model.base_model.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or any(not key.startswith("pooler.") for key in missing):
        raise RuntimeError(f"encoder weights do not fit {type(model).__name__}: {missing=} {unexpected=}")


class ExportEncoder(pl.Callback):
    """At the end of fit, write the encoder and its MLM head to `dirpath` with `TartanModule.save_mlm_model`.

    The folder loads with `AutoModelForMaskedLM`, so it is a valid `model.encoder_name_or_path` for the next
    stage (e.g. `configs/methods/tapt_finetune.yaml`). It holds the final weights: continued pre-training has
    no dev metric to pick a "best" epoch by.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: "TartanModule") -> None:
        if trainer.is_global_zero:
            pl_module.save_mlm_model(self.dirpath)
            rank_zero_info(f"ExportEncoder: wrote the encoder + MLM head to {self.dirpath}")
        trainer.strategy.barrier("export_encoder")  # other ranks may read the folder right after fit
