"""Task heads over a shared encoder: the end-task classifier and the masked-LM head."""
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel


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
    config = AutoConfig.from_pretrained(name_or_path)
    if dropout is not None:
        for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if hasattr(config, attr):
                setattr(config, attr, dropout)
    mlm_model = AutoModelForMaskedLM.from_pretrained(name_or_path, config=config)
    mlm_model.train()  # from_pretrained returns eval mode, which would silently disable dropout
    encoder = mlm_model.base_model
    heads = [child for child in mlm_model.children() if child is not encoder]
    if len(heads) != 1:
        raise ValueError(
            f"encoder_name_or_path={name_or_path!r}: {type(mlm_model).__name__} has {len(heads)} head modules; "
            "lightning-tartan needs a masked-LM model with exactly one (BERT, RoBERTa, ELECTRA, DeBERTa, ...)"
        )
    return encoder, heads[0], config
