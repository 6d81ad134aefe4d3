"""Task heads over a shared encoder: the end-task classifier and the masked-LM head."""
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from lightning_tartan.packaged_encoders import local_copy


class ClassificationHead(nn.Module):
    """First-token pooling → dropout → dense + tanh → dropout → linear, the paper's end-task head.

    The same shape as RoBERTa's classification head and BERT's pooler + classifier, so a trained head
    maps onto `AutoModelForSequenceClassification` without loss.
    """

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def reset_parameters(self, std: float = 0.02, generator: Optional[torch.Generator] = None) -> None:
        """Initialise as transformers does; a generator makes the init identical on every DDP rank."""
        for layer in (self.dense, self.out_proj):
            nn.init.normal_(layer.weight, std=std, generator=generator)
            nn.init.zeros_(layer.bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        pooled = hidden_states[:, 0] if hidden_states.dim() == 3 else hidden_states
        pooled = torch.tanh(self.dense(self.dropout(pooled)))
        return self.out_proj(self.dropout(pooled))


def load_encoder_and_mlm_head(
    name_or_path: str, dropout: Optional[float] = None
) -> tuple[PreTrainedModel, nn.Module, PretrainedConfig]:
    """Split a masked-LM checkpoint into its encoder and its LM head (pretrained when the checkpoint has one).

    Keeping the checkpoint's own head module preserves its weight tying with the input embeddings and lets
    the MLM loss run the head on masked positions only.
    """
    files = local_copy(name_or_path)
    config = AutoConfig.from_pretrained(files)
    if dropout is not None:
        for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if hasattr(config, attr):
                setattr(config, attr, dropout)
    with _quiet_transformers():
        mlm_model, loading = AutoModelForMaskedLM.from_pretrained(files, config=config, output_loading_info=True)
    mlm_model.train()  # from_pretrained returns eval mode, which would silently disable dropout
    encoder = mlm_model.base_model
    heads = [(name, child) for name, child in mlm_model.named_children() if child is not encoder]
    if len(heads) != 1:
        raise ValueError(
            f"encoder_name_or_path={name_or_path!r}: {type(mlm_model).__name__} has {len(heads)} head modules; "
            "lightning-tartan needs a masked-LM model with exactly one (BERT, RoBERTa, ELECTRA, DeBERTa, ...)"
        )
    head_name, head = heads[0]
    _warn_about_new_weights(name_or_path, head_name, head, loading["missing_keys"])
    return encoder, head, config


def _warn_about_new_weights(name_or_path: str, head_name: str, head: nn.Module, missing_keys: set[str]) -> None:
    """One line instead of transformers' load report: a random MLM head makes the first MLM gradients noise."""
    missing_head = sorted(f"{head_name}.{key}" for key in head.state_dict() if f"{head_name}.{key}" in missing_keys)
    if missing_head:
        total = len(head.state_dict())
        rank_zero_warn(
            f"encoder_name_or_path={name_or_path!r} has no pretrained masked-LM head: {len(missing_head)} of its "
            f"{total} tensors ({', '.join(missing_head)}) start random, so the MLM objectives' first gradients into "
            "the encoder are noise. Fit the head first with the encoder frozen: configs/<task>/mlm_head_warmup.yaml "
            "(or `freeze_encoder=True, weighting='aux_only'`), then train from its export."
        )
    missing_encoder = sorted(key for key in missing_keys if not key.startswith(f"{head_name}."))
    if missing_encoder:
        rank_zero_warn(
            f"encoder_name_or_path={name_or_path!r}: {len(missing_encoder)} encoder tensors are not in the checkpoint "
            f"and start random: {', '.join(missing_encoder[:5])}{' ...' if len(missing_encoder) > 5 else ''}"
        )


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' multi-line load report and progress bar; `_warn_about_new_weights` says what matters."""
    verbosity, progress_bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bar:
            hf_logging.enable_progress_bar()
