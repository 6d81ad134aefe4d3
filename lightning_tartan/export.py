"""Trained weights as plain Hugging Face model folders: the end-task classifier, and encoder + MLM head for a later
stage (`ExportEncoder`, which hands a continued-pre-training run to a fine-tuning run)."""
import copy
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from lightning_tartan.heads import ClassificationHead, masked_lm_head

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


def check_exportable(encoder_config: PretrainedConfig) -> None:
    """Raise NotImplementedError now, not after training, when the classifier could not be exported; builds the
    classification model on the meta device, so it costs no memory."""
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(classification_config(encoder_config, ["0", "1"]))
    classifier_layers(model)


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
