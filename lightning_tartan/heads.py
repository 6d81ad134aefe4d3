"""Task heads over a shared encoder: the end-task classifier and the masked-LM head."""
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from transformers import (
    MODEL_FOR_MASKED_LM_MAPPING,
    AutoConfig,
    AutoModelForMaskedLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.activations import ACT2FN
from transformers.utils import logging as hf_logging

from lightning_tartan.attention_masks import ready_mask_attention
from lightning_tartan.packaged_encoders import local_copy


class ClassificationHead(nn.Module):
    """The paper's end-task head: first token → dropout → dense + activation (→ LayerNorm) → dropout → linear.

    With tanh, the shape of RoBERTa's classification head and BERT's pooler + classifier;
    `classification_head_options` gives each architecture the activation (and norm) of its own
    sequence-classification head, so a trained head maps onto `AutoModelForSequenceClassification` without loss.
    """

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        dropout: float = 0.1,
        activation: str = "tanh",
        dense_bias: bool = True,
        norm_eps: Optional[float] = None,
        norm_bias: bool = True,
    ) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size, bias=dense_bias)
        self.activation = ACT2FN[activation]
        self.norm = None if norm_eps is None else nn.LayerNorm(hidden_size, eps=norm_eps, bias=norm_bias)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def reset_parameters(self, std: float = 0.02, generator: Optional[torch.Generator] = None) -> None:
        """Initialise as transformers does; a generator makes the init identical on every DDP rank."""
        for layer in (self.dense, self.out_proj):
            nn.init.normal_(layer.weight, std=std, generator=generator)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        pooled = hidden_states[:, 0] if hidden_states.dim() == 3 else hidden_states
        pooled = self.activation(self.dense(self.dropout(pooled)))
        if self.norm is not None:
            pooled = self.norm(pooled)
        return self.out_proj(self.dropout(pooled))


#: model types whose sequence-classification head applies the encoder's own activation, `config.hidden_act`
HIDDEN_ACT_CLASSIFIERS = frozenset({"big_bird", "convbert", "mra", "nystromformer", "roformer", "yoso"})


#: model types whose sequence classifier gives the first token global attention (`global_attention_mask`), which the
#: module's end-task passes do too (`end_task_inputs`); their masked-LM passes keep local attention, as their MLM does
FIRST_TOKEN_GLOBAL = frozenset({"longformer"})


def end_task_inputs(model_type: str, input_ids: Tensor) -> dict[str, Tensor]:
    """What an end-task pass gives the encoder besides its ids, mask and segments, so that it computes what the
    architecture's `AutoModelForSequenceClassification` does: Longformer's global attention on the first token."""
    if model_type not in FIRST_TOKEN_GLOBAL:
        return {}
    first_token = torch.zeros_like(input_ids)
    first_token[:, 0] = 1
    return {"global_attention_mask": first_token}


def classification_head_options(config: PretrainedConfig) -> dict[str, Any]:
    """The activation (and norm) of the architecture's own sequence-classification head, for `ClassificationHead`:
    tanh as BERT's pooler and RoBERTa's head, GELU for ELECTRA, ReLU for DistilBERT, `hidden_act` for RoFormer,
    BigBird and their kind, ModernBERT's dense + activation + LayerNorm. DeBERTa's pooler activation is a config
    field, which the export sets to tanh. `export.check_exportable` checks the result against the architecture."""
    if config.model_type == "electra":
        return {"activation": "gelu"}
    if config.model_type in HIDDEN_ACT_CLASSIFIERS:
        return {"activation": config.hidden_act}
    if config.model_type == "distilbert":
        return {"activation": "relu"}
    if config.model_type == "modernbert":
        return {
            "activation": config.classifier_activation,
            "dense_bias": config.classifier_bias,
            "norm_eps": config.norm_eps,
            "norm_bias": config.norm_bias,
        }
    return {"activation": "tanh"}


#: masked-LM models whose head modules are registered in another order than their forward applies them
MLM_HEAD_ORDER = {"DistilBertForMaskedLM": ("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector")}


def masked_lm_head(mlm_model: PreTrainedModel) -> nn.Module:
    """What turns the encoder's hidden states into vocabulary logits: the masked-LM model minus its `base_model`.

    One module for most architectures (BERT's `cls`, RoBERTa's `lm_head`), several applied in turn for others
    (ELECTRA, DistilBERT, ModernBERT). It is checked against the model's own logits, so a head put together wrongly
    is refused instead of trained. Keeping the model's own modules keeps the decoder tied to the input embeddings.
    """
    encoder = mlm_model.base_model
    parts = {
        name: child
        for name, child in mlm_model.named_children()
        if child is not encoder and not isinstance(child, nn.CrossEntropyLoss)
    }
    order = MLM_HEAD_ORDER.get(type(mlm_model).__name__, tuple(parts))
    head = parts[order[0]] if len(order) == 1 else nn.Sequential(OrderedDict((name, parts[name]) for name in order))
    if not _reproduces_logits(mlm_model, head):
        raise ValueError(
            f"{type(mlm_model).__name__}: its modules besides the encoder ({', '.join(parts)}), applied in turn, do "
            "not compute its masked-LM logits, so lightning-tartan cannot train its masked-LM objective"
        )
    return head


def _reproduces_logits(mlm_model: PreTrainedModel, head: nn.Module) -> bool:
    """Whether `head(encoder(x))` equals the model's logits on a few tokens (dropout off)."""
    input_ids = torch.arange(5, 13).remainder(mlm_model.config.vocab_size).unsqueeze(0)
    attention_mask = torch.ones_like(input_ids)
    was_training = mlm_model.training
    mlm_model.eval()
    try:
        with torch.no_grad():
            expected = mlm_model(input_ids=input_ids, attention_mask=attention_mask).logits
            hidden = mlm_model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            actual = head(hidden)
            reproduces = actual.shape == expected.shape and torch.allclose(actual, expected, rtol=1e-4, atol=1e-5)
    except Exception as err:  # whatever the architecture raises, the user needs to know it does not fit here
        raise ValueError(
            f"{type(mlm_model).__name__} does not run as an encoder plus a masked-LM head on input_ids and "
            f"attention_mask ({type(err).__name__}: {err}), so lightning-tartan cannot train it"
        ) from err
    finally:
        mlm_model.train(was_training)
    return reproduces


def load_encoder_and_mlm_head(
    name_or_path: str, dropout: Optional[float] = None, attn_implementation: Optional[str] = None
) -> tuple[PreTrainedModel, nn.Module, PretrainedConfig, "RandomMLMHead"]:
    """Split a masked-LM checkpoint into its encoder and its LM head (pretrained when the checkpoint has one; what
    it lacks of the head, which starts random, is returned for the caller to warn about if it trains the head).

    Keeping the checkpoint's own head module preserves its weight tying with the input embeddings and lets
    the MLM loss run the head on masked positions only. `attn_implementation` is transformers' (None: its default).
    """
    files = local_copy(name_or_path)
    try:
        config = AutoConfig.from_pretrained(files)
    except OSError as err:
        raise OSError(f"encoder_name_or_path={name_or_path!r}: {unreachable(err)}") from None
    if type(config) not in MODEL_FOR_MASKED_LM_MAPPING:
        raise ValueError(
            f"encoder_name_or_path={name_or_path!r}: {config.model_type!r} has no masked-LM model in transformers "
            "(AutoModelForMaskedLM), and TARTAN's auxiliary objectives are masked-LM: pick an encoder such as BERT, "
            "RoBERTa, DeBERTa-v3, ELECTRA or ModernBERT (README, Encoders)"
        )
    if dropout is not None:
        for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if hasattr(config, attr):
                setattr(config, attr, dropout)
    implementation = ready_mask_attention(config.model_type, attn_implementation)
    attention = {} if implementation is None else {"attn_implementation": implementation}
    try:
        with _quiet_transformers():
            mlm_model, loading = AutoModelForMaskedLM.from_pretrained(
                files, config=config, output_loading_info=True, **attention
            )
    except (ValueError, ImportError) as err:
        if attn_implementation is None:
            raise
        raise ValueError(f"attn_implementation={attn_implementation!r} for {name_or_path!r}: {err}") from None
    mlm_model.train()  # from_pretrained returns eval mode, which would silently disable dropout
    # a checkpoint saved in bf16 or fp16 loads in that dtype (transformers >= 5); training keeps fp32 weights and
    # lets `trainer.precision` choose what the matrix products run in
    mlm_model.float()
    mlm_model.config.dtype = torch.float32  # what exports record: the weights as trained
    try:
        head = masked_lm_head(mlm_model)
    except ValueError as err:
        raise ValueError(f"encoder_name_or_path={name_or_path!r}: {err}") from None
    _warn_about_new_encoder_weights(name_or_path, mlm_model, loading["missing_keys"])
    return mlm_model.base_model, head, config, RandomMLMHead.of(name_or_path, mlm_model, loading["missing_keys"])


def checkpoint_activations(encoder: PreTrainedModel) -> None:
    """Turn on transformers' activation (gradient) checkpointing of `encoder`'s layers, with torch's non-reentrant
    checkpoint: it takes several backward passes per step (META-TARTAN's one per objective) and restores the random
    state, so dropout's masks are the same when a layer is recomputed."""
    # transformers renamed `gradient_checkpointing_enable` (deprecated, not yet removed) in its 5.x releases
    enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
    try:
        enable({"use_reentrant": False})
    except ValueError as err:  # an architecture without it, e.g. ALBERT or MPNet
        raise ValueError(f"gradient_checkpointing=True: {err}") from None
    if getattr(encoder.config, "use_cache", False):  # a decoder's cache, which an encoder never keeps: transformers
        encoder.config.use_cache = False  # would say at the first step that checkpointing turns it off


def unreachable(err: OSError) -> str:
    """Why transformers found no files, and what to do when they are a trained run's moved folder."""
    reason = str(err).splitlines()[0]
    return (
        f"neither a local folder nor reachable on the Hugging Face Hub ({reason}). A checkpoint is rebuilt from the "
        "encoder and tokenizer it was trained from before its weights load: if their folder moved, name its new place, "
        "TartanModule.load_from_checkpoint(path, encoder_name_or_path=<folder>) (and tokenizer_name_or_path=<its "
        "folder> if the run had a tokenizer of its own)"
    )


class EncoderInputMismatch(ValueError):
    """A tokenizer or `max_length` the encoder cannot take."""


def check_inputs_fit_encoder(
    encoder: PreTrainedModel, tokenizer: Any, tokenizer_name_or_path: str, max_length: Optional[int]
) -> None:
    """Refuse a tokenizer or `max_length` the encoder cannot take, naming the option, before a step runs: ids past
    its embedding table and rows past its positions fail deep inside it, and a tokenizer far smaller than the
    table is a folder without its tokenizer files (transformers then builds one that reads every word as unknown).
    """
    rows = encoder.get_input_embeddings().num_embeddings
    size = len(tokenizer)
    choose = (
        "name the encoder's own tokenizer with `tokenizer_name_or_path` (TartanModule's and the data module's; "
        "`tartan`: --model.tokenizer_name_or_path)"
    )
    if size > rows:
        raise EncoderInputMismatch(
            f"the tokenizer {tokenizer_name_or_path!r} has {size} tokens but the encoder's embedding table has "
            f"{rows} rows: {choose}"
        )
    if size * 8 < rows:  # far smaller than any padding of a table to a round size
        raise EncoderInputMismatch(
            f"the tokenizer {tokenizer_name_or_path!r} has {size} tokens for the encoder's {rows} embeddings: is the "
            f"folder missing its tokenizer files (tokenizer.json, vocab.txt, ...)? Save the tokenizer beside the "
            f"encoder, or {choose}"
        )
    limit = position_limit(encoder)
    if max_length is not None and limit is not None and max_length > limit:
        raise EncoderInputMismatch(
            f"max_length={max_length} is longer than the {limit} positions of the encoder (max_position_embeddings="
            f"{encoder.config.max_position_embeddings}): set the data module's `max_length` (`tartan`: "
            f"--data.init_args.max_length) to {limit} or less"
        )


def position_limit(encoder: PreTrainedModel) -> Optional[int]:
    """The most tokens a row may hold, or None for an encoder without absolute positions to run past (DeBERTa's
    relative ones, say)."""
    config = encoder.config
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None or not getattr(config, "position_biased_input", True):
        return None
    # RoBERTa-style embeddings number positions on from the padding index
    padding_idx = getattr(getattr(encoder, "embeddings", None), "padding_idx", None)
    return positions - (padding_idx + 1 if isinstance(padding_idx, int) else 0)


@dataclass(frozen=True)
class RandomMLMHead:
    """The MLM-head tensors an encoder's checkpoint lacks (a sentence encoder's, say), which start random."""

    name_or_path: str
    missing: tuple[str, ...]
    total: int

    @classmethod
    def of(cls, name_or_path: str, mlm_model: PreTrainedModel, missing_keys: set[str]) -> "RandomMLMHead":
        prefix = mlm_model.base_model_prefix
        head_keys = [key for key in mlm_model.state_dict() if not key.startswith(f"{prefix}.")]
        return cls(name_or_path, tuple(sorted(key for key in head_keys if key in missing_keys)), len(head_keys))

    def warning(self) -> str:
        """One line instead of transformers' load report: a random MLM head makes the first MLM gradients noise."""
        return (
            f"encoder_name_or_path={self.name_or_path!r} has no pretrained masked-LM head: {len(self.missing)} of "
            f"its {self.total} tensors ({', '.join(self.missing)}) start random, so the MLM objectives' first "
            "gradients into the encoder are noise. Fit the head first with the encoder frozen: "
            "configs/methods/mlm_head_warmup.yaml (or `freeze_encoder=True, weighting='aux_only'`), then train from "
            "its export."
        )


def _warn_about_new_encoder_weights(name_or_path: str, mlm_model: PreTrainedModel, missing_keys: set[str]) -> None:
    prefix = mlm_model.base_model_prefix
    missing_encoder = sorted(key for key in missing_keys if key.startswith(f"{prefix}."))
    if missing_encoder:
        rank_zero_warn(
            f"encoder_name_or_path={name_or_path!r}: {len(missing_encoder)} encoder tensors are not in the checkpoint "
            f"and start random: {', '.join(missing_encoder[:5])}{' ...' if len(missing_encoder) > 5 else ''}"
        )


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' multi-line load report and progress bar; what matters is said in one line."""
    verbosity, progress_bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bar:
            hf_logging.enable_progress_bar()
