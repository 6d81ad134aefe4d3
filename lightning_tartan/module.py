"""`TartanModule`: end-task aware training (TARTAN) as a LightningModule with manual optimization.

One training step is one optimizer step over the `accumulate_grad_batches` micro-batches of its training batch,
the same for every method; the weighting strategy (`lightning_tartan.weighting`) owns what differs. For each
micro-batch, in order: the strategy's `start_micro_batch` (META-TARTAN's dev gradient), then for each objective the
strategy trains its forward, loss and `manual_backward` (weighted, divided by the accumulation count) followed by
the strategy's `after_backward`. Then gradient clipping, the optimizer and LR-scheduler steps, and the strategy's
`end_step` (META-TARTAN's weight update).
"""
import importlib
import math
import os
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, Callable, ContextManager, Literal, Mapping, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from huggingface_hub import HfApi
from pytorch_lightning.strategies import ParallelStrategy
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoTokenizer, PreTrainedModel

from lightning_tartan.attention_masks import READY_MASK_ARCHITECTURES, encoder_mask, mark_padding, takes_ready_masks
from lightning_tartan.batch_checks import (
    BatchFormatError,
    check_evaluation_batch,
    check_training_sources,
    checked_source,
)
from lightning_tartan.checkpoints import UNREADABLE, load_lazily
from lightning_tartan.export import check_exportable, classification_model, masked_lm_model
from lightning_tartan.heads import (
    ClassificationHead,
    check_inputs_fit_encoder,
    checkpoint_activations,
    classification_head_options,
    end_task_inputs,
    load_encoder_and_mlm_head,
    unreachable,
)
from lightning_tartan.meta_tartan import MetaWeighting
from lightning_tartan.model_card import end_task_model_card
from lightning_tartan.packaged_encoders import local_copy
from lightning_tartan.packing import PACKED, pack, packed_encoder_inputs, unpack
from lightning_tartan.weighting import (
    END_TASK,
    META_DEV,
    META_DEV_GRAD,
    RESERVED_SOURCES,
    AuxOnlyWeighting,
    EncoderAccess,
    EqualWeighting,
    NoWeighting,
    Weighting,
    batch_source,
    checked_weights,
)

MONITOR_METRICS = ("f1_macro", "accuracy")
#: the key `on_before_batch_transfer` adds to an MLM micro-batch: the flat indices of its masked positions
MASKED_POSITIONS = "masked_positions"
#: what a task's data module knows (its attribute) -> the `TartanModule` option it sets; `tartan` links the same
DATAMODULE_OPTIONS = {
    "num_labels": "num_labels",
    "label_names": "label_names",
    "aux_names": "aux_objectives",
    "monitor_metric": "monitor_metric",
    "tokenizer_name_or_path": "tokenizer_name_or_path",
    "accumulate_grad_batches": "accumulate_grad_batches",
}
#: options that change how a step runs (its speed and memory), not what it computes beyond rounding: a resumed run
#: takes them from its command, not from its checkpoint (`tartan fit --ckpt_path`)
RUN_OPTIONS = (
    "sparse_mlm",
    "dev_head_on_cached_features",
    "per_task_grad_copies",
    "attn_implementation",
    "compile_encoder",
    "fused_optimizer",
    "pack_sequences",
    "gradient_checkpointing",
)
#: the `weighting` option's names; any other strategy is given by its class's import path (`weighting_class`)
WEIGHTINGS: dict[str, type[Weighting]] = {
    "none": NoWeighting,
    "equal": EqualWeighting,
    "meta": MetaWeighting,
    "aux_only": AuxOnlyWeighting,
}


def weighting_class(weighting: str) -> type[Weighting]:
    """The strategy a `weighting` option names: one of `WEIGHTINGS`, or the import path of a `Weighting` subclass
    of one's own (``"my_package.weighting.FixedWeighting"``), built from the objective names, as `equal` is. A path
    keeps checkpoints loadable wherever that module imports."""
    if weighting in WEIGHTINGS:
        return WEIGHTINGS[weighting]
    module_name, _, class_name = weighting.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), class_name) if module_name else None
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"weighting={weighting!r} is not one of {sorted(WEIGHTINGS)} and does not import: {err}"
        ) from None
    if not (isinstance(found, type) and issubclass(found, Weighting)):
        raise ValueError(
            f"weighting={weighting!r} is not one of {sorted(WEIGHTINGS)} nor the import path of a "
            "lightning_tartan.Weighting subclass"
        )
    return found


class CheckpointMismatch(ValueError):
    """A checkpoint of another task (its classes) or, to resume training, of another method (its objectives)."""


class TartanModule(pl.LightningModule):
    """Multi-task an end task with auxiliary masked-LM objectives, with fixed or meta-learned task weights.

    From a data module of one's own, a training batch maps each source to a dict of tensors padded on the right:
    ``{"end_task": {input_ids, attention_mask, labels (class ids)}, <aux objective>: {input_ids, attention_mask,
    labels (masked tokens' ids, -100 elsewhere)}, "meta_dev": ..., "meta_dev_grad": ...}`` (the two dev samples for
    META-TARTAN only; with `accumulate_grad_batches=k`, each source maps to a list of k such dicts); evaluation
    batches are one such dict, labels optional to predict. `transformers`' `DataCollatorWithPadding` and
    `DataCollatorForLanguageModeling` build them; the README's "Your own task" has the details.

    Args:
        encoder_name_or_path: any masked-LM checkpoint the HF Auto classes load (hub name or folder).
        num_labels: end-task classes (a datamodule's `num_labels`).
        aux_objectives: names of the auxiliary MLM batches in a training batch (e.g. `["tapt", "dapt"]`).
        weighting: `none` (fine-tuning), `equal` (MT-TARTAN), `meta` (META-TARTAN) or `aux_only` (TAPT/DAPT), or
            the import path of a `Weighting` subclass of one's own (`weighting_class`).
        label_names: the class names, index = class id (a datamodule's `label_names`); exports and predictions
            show them instead of ids.
        tokenizer_name_or_path: saved beside exports so they load as a whole; `None`: the encoder's.
        encoder_lr, head_lr: AdamW learning rates of the encoder (with the MLM head) and of the end-task head; the
            paper trains the fresh head ten times faster.
        encoder_weight_decay, head_weight_decay: AdamW weight decay of the same two groups, on matrices only.
        adam_betas, adam_eps: AdamW's, the paper's (0.9, 0.98) and 1e-6 by default.
        warmup_ratio: share of the run's optimizer steps the learning rate warms up over.
        max_grad_norm: gradients are clipped to this global norm before every optimizer step.
        dropout: the encoder's dropout (its config's hidden and attention dropout) and the end-task head's.
        accumulate_grad_batches: micro-batches per optimizer step. Each training batch holds that many (see
            `micro_batches`; `EndTaskDataModule` groups them, and `tartan` links its option to this one), so every
            count Lightning keeps in batches is in optimizer steps (its own flag is unavailable in manual
            optimization).
        monitor_metric: the validation metric that drives checkpointing and early stopping.
        lr_schedule: `linear` (warm-up, then linear decay to 0: the paper's multitask schedule) or `constant`
            (warm-up, then constant: the "Don't Stop Pretraining" classifier and the post-hoc stage).
        freeze_encoder: train only the heads. With `weighting="aux_only"` this fits a missing MLM head before
            multitasking (`configs/methods/mlm_head_warmup.yaml`); with `none`, it is a linear probe.
        meta_lr, dev_head_lr, dev_head_weight_decay, dev_head_steps, dev_head_tolerance, dev_gradient,
            dev_head_on_cached_features, per_task_grad_copies: META-TARTAN's options, handed to the strategy that
            owns its whole procedure, `lightning_tartan.meta_tartan.MetaWeighting` (their meaning is documented
            there); the other weightings take none. `dev_gradient="held_out"` is the paper's estimator.
        init_checkpoint: a `TartanModule` checkpoint whose weights (encoder, MLM head, end-task head) this module
            starts from, e.g. a multitask run's best checkpoint for post-hoc fine-tuning (`configs/methods/posthoc.yaml`).
            Read at construction and not stored in the hyper-parameters, so this module's own checkpoints load
            without it.
        sparse_mlm: the MLM head's vocabulary projection only at masked positions. With
            `dev_head_on_cached_features` and `per_task_grad_copies`, an efficiency switch: the paper's code
            corresponds to `False, False, True`.
        attn_implementation: the encoder's attention kernel, transformers' option of that name: `"sdpa"` (its
            default where the architecture has it), `"eager"`, or `"flash_attention_2"` with the `flash-attn`
            package on a GPU, which also skips the padded positions of a batch. `None`: transformers' default.
        compile_encoder: compile the encoder with `torch.compile` (in place: checkpoints are unchanged). On a GPU
            this fuses its elementwise kernels and cuts launches; the first steps pay the compilation (tens of
            seconds), and a second batch length recompiles once, after which lengths are dynamic.
        fused_optimizer: torch's fused AdamW (one operation per parameter group) instead of its multi-tensor one
            (about a dozen); they differ by rounding only. `None`: fused on a CUDA GPU, multi-tensor elsewhere (the
            published CPU results were made with it).
        pack_sequences: lay the rows of every padded micro-batch end to end in as few rows as hold them, each
            token attending to its own row only (`lightning_tartan.packing`), so the encoder computes real tokens,
            not padding: at real lengths most of a batch is padding. Equal to the padded computation up to rounding
            (dropout's masks differ). Needs an encoder that takes ready attention masks: BERT, RoBERTa,
            XLM-RoBERTa, ELECTRA, ALBERT or DistilBERT with SDPA attention (transformers >= 5).
        gradient_checkpointing: keep only each encoder layer's inputs through the forward and recompute the layer
            in the backward (`heads.checkpoint_activations`): the activations that bound the batch size or length
            on a GPU shrink to about one layer's, for roughly a third more time per step. Results are unchanged:
            dropout draws the same masks when the layer is recomputed. Any encoder transformers implements it for
            (not ALBERT or MPNet).
    """

    def __init__(
        self,
        encoder_name_or_path: str = "roberta-base",
        num_labels: int = 2,
        aux_objectives: Sequence[str] = ("tapt",),
        weighting: str = "equal",
        label_names: Optional[Sequence[str]] = None,
        tokenizer_name_or_path: Optional[str] = None,
        encoder_lr: float = 1e-4,
        head_lr: float = 1e-3,
        encoder_weight_decay: float = 0.01,
        head_weight_decay: float = 0.1,
        adam_betas: tuple[float, float] = (0.9, 0.98),
        adam_eps: float = 1e-6,
        warmup_ratio: float = 0.06,
        max_grad_norm: float = 1.0,
        accumulate_grad_batches: int = 1,
        dropout: float = 0.1,
        meta_lr: float = 1e-2,
        dev_head_lr: float = 1e-3,
        dev_head_weight_decay: float = 0.1,
        dev_head_steps: int = 10,
        dev_head_tolerance: float = 1e-3,
        monitor_metric: str = "f1_macro",
        lr_schedule: Literal["linear", "constant"] = "linear",
        freeze_encoder: bool = False,
        dev_gradient: Literal["held_out", "in_sample"] = "held_out",
        init_checkpoint: Optional[str] = None,
        sparse_mlm: bool = True,
        dev_head_on_cached_features: bool = True,
        per_task_grad_copies: bool = False,
        attn_implementation: Optional[str] = None,
        compile_encoder: bool = False,
        fused_optimizer: Optional[bool] = None,
        pack_sequences: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        _check_options(locals())
        # Plain strings in the hparams (a Path would make checkpoints unloadable with weights_only), and the
        # tokenizer recorded resolved, so they agree with a datamodule that tokenizes with the encoder's tokenizer.
        encoder_name_or_path = str(encoder_name_or_path)
        tokenizer_name_or_path = str(tokenizer_name_or_path or encoder_name_or_path)
        self.save_hyperparameters(ignore=["init_checkpoint"])
        self.automatic_optimization = False

        self.encoder, self.mlm_head, config, self._random_mlm_head = load_encoder_and_mlm_head(
            encoder_name_or_path, dropout, attn_implementation
        )
        self.encoder.requires_grad_(not freeze_encoder)
        if gradient_checkpointing and not freeze_encoder:  # a frozen encoder keeps no activations for a backward
            checkpoint_activations(self.encoder)
        #: whether the encoder takes the ready attention masks of `lightning_tartan.attention_masks`
        self.ready_attention_masks = takes_ready_masks(config.model_type, attn_implementation)
        if pack_sequences and not self.ready_attention_masks:
            raise ValueError(
                f"pack_sequences=True needs an encoder that takes ready attention masks (model types "
                f"{sorted(READY_MASK_ARCHITECTURES)} with attn_implementation 'sdpa' or None, transformers >= 5); "
                f"{encoder_name_or_path!r} is {config.model_type!r} with attn_implementation={attn_implementation!r}"
            )
        #: what `packing.pack` needs to give packed tokens their positions and pad the packed rows
        self._packing = (config.model_type, config.pad_token_id or 0) if pack_sequences else None
        if compile_encoder:
            self.encoder.compile()
        init_std = getattr(config, "initializer_range", 0.02)
        head_options = classification_head_options(config)
        try:
            check_exportable(config, head_options)
        except NotImplementedError as err:
            raise ValueError(f"encoder_name_or_path={encoder_name_or_path!r}: {err}, so it cannot be trained") from None
        self.end_task_head = ClassificationHead(config.hidden_size, num_labels, dropout, **head_options)
        self.end_task_head.reset_parameters(init_std)
        self.objectives = [END_TASK, *aux_objectives]
        self.weighting = _build_weighting(weighting, self.objectives, self.encoder, config, num_labels, self.hparams)
        self.monitor_metric = monitor_metric
        metrics = MetricCollection(
            {
                "f1_macro": MulticlassF1Score(num_labels, average="macro"),
                "accuracy": MulticlassAccuracy(num_labels, average="micro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self._rng_to_restore: Optional[dict[str, Any]] = None
        self._run_seed: Optional[int] = None
        #: the data's truncation length, once a data module set it up; checkpoints keep it, and end-task exports
        #: save it as their tokenizer's `model_max_length`, so `pipeline(..., truncation=True)` cuts as training did
        self.max_length: Optional[int] = None
        if init_checkpoint is not None:
            self.load_weights(init_checkpoint)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Union[str, Path, IO], *args: Any, **kwargs: Any) -> "TartanModule":
        """Lightning's `load_from_checkpoint`. The model is rebuilt from the encoder folder it was trained from before
        its weights load: given that folder's new place (`encoder_name_or_path=<folder>`), a run whose tokenizer was
        the encoder's takes it from there too."""
        if "encoder_name_or_path" in kwargs and "tokenizer_name_or_path" not in kwargs:
            if isinstance(checkpoint_path, (str, Path)) and Path(checkpoint_path).is_file():
                try:
                    saved = load_lazily(checkpoint_path)
                except UNREADABLE:  # Lightning's loading below says what the file is
                    saved = {}
                options = saved.get("hyper_parameters", {})
                if options and options.get("tokenizer_name_or_path") == options.get("encoder_name_or_path"):
                    kwargs["tokenizer_name_or_path"] = kwargs["encoder_name_or_path"]
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    @classmethod
    def from_datamodule(cls, datamodule: pl.LightningDataModule, **options: Any) -> "TartanModule":
        """A module for `datamodule`'s task (an `EndTaskDataModule`, or any with the attributes in
        `DATAMODULE_OPTIONS`): its classes, label names, corpora, dev metric, tokenizer and micro-batches per step
        set the matching options, so they are never typed twice; `options` are the other `TartanModule` options.
        A data module of your own may lack any of them but `num_labels`: the module's option (given in `options`, or
        its default) stands in. What the ``tartan`` command links from ``--data`` to ``--model``."""
        wired = {
            option: getattr(datamodule, attribute)
            for attribute, option in DATAMODULE_OPTIONS.items()
            if hasattr(datamodule, attribute)
        }
        if "num_labels" not in wired and "num_labels" not in options:
            raise ValueError(
                f"{type(datamodule).__name__} has no `num_labels` attribute: give the data module one, or pass "
                f"num_labels=... (it reads {sorted(DATAMODULE_OPTIONS)} where present)"
            )
        for option, value in wired.items():
            given = options.get(option, value)
            if _as_list(given) != _as_list(value):
                raise ValueError(f"{option}={given!r} disagrees with the data module's {value!r}: leave it out")
        return cls(**{**options, **wired})

    # ----- forward passes -----------------------------------------------------------------------------------

    def encode(self, batch: dict[str, Tensor], end_task: bool = True) -> Tensor:
        """The encoder's last hidden states; a sentence-pair batch's ``token_type_ids`` mark its two segments. A
        micro-batch packed on the host (`pack_sequences`) runs packed and comes back in its padded layout.
        ``end_task=False`` for a masked-LM pass, which some architectures run otherwise (`heads.end_task_inputs`)."""
        if PACKED in batch:
            hidden = self.encoder(**packed_encoder_inputs(batch[PACKED])).last_hidden_state
            return unpack(hidden, batch[PACKED], batch["input_ids"].shape)
        extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        if end_task:
            extra.update(end_task_inputs(self.encoder.config.model_type, batch["input_ids"]))
        mask = encoder_mask(batch) if self.ready_attention_masks else batch["attention_mask"]
        return self.encoder(input_ids=batch["input_ids"], attention_mask=mask, **extra).last_hidden_state

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None) -> Tensor:
        """End-task logits."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        return self.end_task_head(self.encode(batch))

    def end_task_loss(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self.end_task_head(self.encode(batch))
        return F.cross_entropy(logits.float(), batch["labels"])

    def mlm_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Masked-LM loss; with `sparse_mlm` the vocabulary projection runs only at masked positions."""
        hidden = self.encode(batch, end_task=False)
        labels = batch["labels"]
        if not self.hparams.sparse_mlm:
            logits = self.mlm_head(hidden)
            summed = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
            return summed / labels.ne(-100).sum().clamp(min=1)  # 0, not NaN, for a micro-batch with nothing masked
        if MASKED_POSITIONS in batch:  # found on the host before the batch moved: no wait for the device here
            positions = batch[MASKED_POSITIONS]
        else:  # a batch that bypassed `on_before_batch_transfer` (a direct call): this waits for the device
            positions = masked_positions(labels)
        logits = self.mlm_head(hidden.flatten(0, 1).index_select(0, positions))
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), labels.flatten().index_select(0, positions))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """What the step would otherwise read back from the device, found while the batch is still on the host: each
        micro-batch's padding (`attention_masks.mark_padding`, for an encoder that takes ready masks) and, with
        `sparse_mlm`, each MLM micro-batch's masked positions (selecting them on the device has a data-dependent
        size). On a GPU each such read would make the host wait for the device mid-step. With `pack_sequences`, each
        padded micro-batch's packed rows (`packing.pack`), which are also found from its mask.

        Each source the step reads is first checked (`batch_checks`), so that a batch from a data module of one's own
        that is not in the documented format fails naming the source and what to change; the others pass as they
        are."""
        attached = self._trainer_attached()
        if not isinstance(batch, Mapping):
            if attached and self.trainer.training:
                raise BatchFormatError(
                    f"a training batch maps each source (end_task, each MLM corpus, META-TARTAN's meta_dev and "
                    f"meta_dev_grad) to its micro-batch or list of micro-batches; got a {type(batch).__name__}"
                )
            if attached:
                check_evaluation_batch(batch)
            return batch
        batch = dict(batch)  # transformers' collators give a `BatchEncoding`, a mapping but no dict
        if "input_ids" in batch or (attached and not self.trainer.training):  # an evaluation or prediction batch
            if not attached:  # a direct call, which may as well pass one MLM micro-batch: nothing to check it against
                return self._on_host(batch, "evaluation", labeled=False, mlm=False, check=False)
            check_evaluation_batch(batch)
            return self._on_host(batch, "evaluation", labeled=not self.trainer.predicting, mlm=False)
        mlm = set(self.weighting.active) - {END_TASK}  # the MLM objectives this step trains
        read = [*self.weighting.active, *((META_DEV, META_DEV_GRAD) if self.weighting.needs_dev_samples else ())]
        check_training_sources(list(batch), read, self.hparams.aux_objectives, trains_mlm=bool(mlm))
        return {
            name: self._on_host(source, name, labeled=name not in mlm, mlm=name in mlm) if name in read else source
            for name, source in batch.items()
        }

    def _on_host(self, source: Any, name: str, labeled: bool, mlm: bool, check: bool = True) -> Any:
        """One source of a batch, a micro-batch or a list of them, checked (`batch_checks.checked_source`), with what
        `on_before_batch_transfer` adds."""
        if isinstance(source, (list, tuple)):
            return [self._on_host(part, name, labeled, mlm, check) for part in source]
        if not isinstance(source, Mapping):
            return source
        if check:
            source = checked_source(name, source, labeled, mlm, self.encoder, self.hparams.num_labels)
        else:
            source = dict(source)
        if self.ready_attention_masks:
            source = mark_padding(source)
        if self._packing is not None:
            source = pack(source, *self._packing)
        return _with_masked_positions(source) if mlm and self.hparams.sparse_mlm else source

    def objective_loss(self, name: str, batch: dict[str, Any]) -> Tensor:
        why = f"weighting={self.hparams.weighting!r} trains it; check the datamodule's corpora against aux_objectives"
        source = batch_source(batch, name, why)
        return self.end_task_loss(source) if name == END_TASK else self.mlm_loss(source)

    def dev_gradient(self, batch: dict[str, Any], new_step: bool = True) -> Optional[list[Tensor]]:
        """META-TARTAN's dev gradient on a training batch, as a step takes it (`MetaWeighting.dev_gradient`): for
        analyses such as `reproduce/gradient_alignment.py`."""
        if not isinstance(self.weighting, MetaWeighting):
            raise ValueError(f"weighting={self.hparams.weighting!r} takes no dev gradient; META-TARTAN (meta) does")
        return self.weighting.dev_gradient(batch, self.encoder_access(), new_step)

    def encoder_access(self) -> EncoderAccess:
        """What a weighting strategy may read from the model at this step."""
        # the run's seed and the step fix what the strategy draws: the same on every rank, new across seeds
        seed = self.run_seed * 1_000_003 + self.global_step
        return EncoderAccess(self.encoder, self._cls_features, self._loss_scaler(), seed, self._mean_over_ranks)

    def _mean_over_ranks(self, tensor: Tensor) -> Tensor:
        # torch's all_reduce, not the strategy's `reduce`, which first waits at a barrier: a host sync on GPUs
        if not (self._trainer_attached() and self.trainer.world_size > 1):
            return tensor
        summed = tensor.clone()
        torch.distributed.all_reduce(summed)
        return summed / self.trainer.world_size

    def _cls_features(self, sample: dict[str, Tensor]) -> Tensor:
        return self.encode(sample)[:, 0]

    def _loss_scaler(self) -> Callable[[Tensor], Tensor]:
        """fp16's loss scaling (`GradScaler.scale`: a multiplication on the device, no host sync), else identity."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer_attached() else None
        return scaler.scale if scaler is not None else _unscaled

    # ----- training -----------------------------------------------------------------------------------------

    @property
    def run_seed(self) -> int:
        """The run's seed (`seed_everything`, or 0), which draws the dev heads' inits; it travels with checkpoints,
        so a run resumed under another seed continues the original one."""
        if self._run_seed is None:
            self._run_seed = _run_seed()
        return self._run_seed

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer_attached() else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:  # an EndTaskDataModule's, set up just before: its ids and lengths must fit
            name = getattr(datamodule, "tokenizer_name_or_path", self.hparams.tokenizer_name_or_path)
            self.max_length = getattr(datamodule, "max_length", None)
            check_inputs_fit_encoder(self.encoder, tokenizer, str(name), self.max_length)
        if stage == "fit":
            self._run_seed = _run_seed()  # a checkpoint being resumed replaces it after setup
            if hasattr(datamodule, "include_meta_dev"):  # what the model trains decides what the data builds
                datamodule.include_meta_dev = self.weighting.needs_dev_samples

    def on_fit_start(self) -> None:
        if self.trainer.gradient_clip_val is not None:
            # Lightning refuses other values for manual optimization up front, and 0 in the middle of the first step
            raise ValueError(
                f"TartanModule optimizes manually and clips its gradients itself: set its max_grad_norm "
                f"(--model.max_grad_norm) instead of Trainer(gradient_clip_val={self.trainer.gradient_clip_val}); "
                "max_grad_norm=float('inf') does not clip"
            )
        self._check_monitored_losses()
        trains_mlm = any(name != END_TASK for name in self.weighting.active)
        # a checkpoint or init_checkpoint brings a trained head; with the encoder frozen (the head warm-up itself)
        # the random head's gradients reach no encoder weight
        if trains_mlm and self._random_mlm_head.missing and not self.hparams.freeze_encoder:
            rank_zero_warn(self._random_mlm_head.warning())
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, DistributedDataParallel) and not wrapped.find_unused_parameters:
            # each objective's backward leaves the other objectives' heads unused, which plain DDP reports as an error
            # in the middle of the first step
            raise ValueError(
                "TartanModule under DDP needs find_unused_parameters=True (each objective's backward leaves the other "
                "heads unused): Trainer(strategy='ddp_find_unused_parameters_true') or "
                "DDPStrategy(find_unused_parameters=True); the `tartan` command sets it for --trainer.strategy ddp"
            )

    def _check_monitored_losses(self) -> None:
        """A callback monitoring an objective's loss or weight that this run does not log (a typo, or a corpus it does
        not train) would fail only when it first looks, after training up to it; say so before the first step."""
        logged = [f"train/loss_{name}" for name in self.weighting.active]
        logged += [f"train/weight_{name}" for name in self.weighting.weights()]
        for callback in self.trainer.callbacks:
            monitor = getattr(callback, "monitor", None)
            objective_key = isinstance(monitor, str) and monitor.startswith(("train/loss_", "train/weight_"))
            if objective_key and monitor not in logged:
                raise ValueError(
                    f"{type(callback).__name__}(monitor={monitor!r}): this run logs no such key; the objectives' keys "
                    f"are {', '.join(logged)}"
                )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One optimizer step over the batch's micro-batches (see `micro_batches`)."""
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        accumulate = self.hparams.accumulate_grad_batches
        steps = micro_batches(batch)
        if len(steps) > accumulate or (len(steps) < accumulate and not self.trainer.is_last_batch):
            raise BatchFormatError(
                f"a training batch holds {len(steps)} micro-batches but accumulate_grad_batches={accumulate}: the data "
                "module must group that many micro-batches per batch, each source mapping to a list of them "
                "(EndTaskDataModule's accumulate_grad_batches, which `tartan` links from "
                "--model.accumulate_grad_batches)"
            )
        weights = checked_weights(self.weighting)
        active = self.weighting.active
        losses: dict[str, list[Tensor]] = {name: [] for name in active}
        access = self.encoder_access()
        for index, micro_batch in enumerate(steps):
            self.weighting.start_micro_batch(micro_batch, access, first=index == 0)
            for name in active:
                loss = self.objective_loss(name, micro_batch)
                with self.gradient_sync(last=index == len(steps) - 1 and name == active[-1]):
                    self.manual_backward(loss * weights[name].to(loss) / accumulate)
                self.weighting.after_backward(name)
                losses[name].append(loss.detach())
            self.weighting.end_micro_batch()

        for group in optimizer.param_groups:  # the rates this step trains with, in the same row as its losses
            self.log(f"train/lr/{group['name']}", torch.tensor(group["lr"], dtype=torch.float64))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        for name, values in losses.items():
            self.log(f"train/loss_{name}", torch.stack(values).mean(), prog_bar=True)
        for name, weight in weights.items():
            self.log(f"train/weight_{name}", weight)
        for key, value in self.weighting.end_step().items():
            self.log(f"train/{key}", value)

    def gradient_sync(self, last: bool) -> ContextManager:
        """Under DDP, only the step's `last` backward all-reduces (Lightning's `block_backward_sync` skips the
        others), unless the strategy reads each objective's global gradient (META-TARTAN's cosines)."""
        strategy = self.trainer.strategy
        if last or self.weighting.needs_objective_gradients or not isinstance(strategy, ParallelStrategy):
            return nullcontext()
        return strategy.block_backward_sync()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the gradients to `max_grad_norm`. Lightning calls this after unscaling fp16 gradients, so clipping sees
        their true norm. A fused optimizer unscales inside its step, so Lightning neither unscales before this hook
        nor clips for it: here they are unscaled once (`GradScaler.step` then knows) and clipped with torch."""
        if not optimizer.defaults.get("fused"):
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [param for group in optimizer.param_groups for param in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.hparams.max_grad_norm, foreach=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        encoder_params = list(self.encoder.parameters()) + _unique(self.mlm_head.parameters(), self.encoder)
        groups = [
            *_decay_groups("encoder", encoder_params, hp.encoder_lr, hp.encoder_weight_decay),
            *_decay_groups("head", list(self.end_task_head.parameters()), hp.head_lr, hp.head_weight_decay),
        ]
        optimizer = torch.optim.AdamW(groups, betas=tuple(hp.adam_betas), eps=hp.adam_eps, **self._adamw_kernels())
        scheduler = LambdaLR(optimizer, lr_factors(hp.lr_schedule, hp.warmup_ratio, self.num_optimizer_steps))
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def _adamw_kernels(self) -> dict[str, Optional[bool]]:
        """AdamW's `fused` and `foreach` flags for this run: `fused_optimizer`, by default fused on a CUDA GPU; else
        the multi-tensor kernels (torch's default on GPUs, and faster on the CPU too)."""
        fused = self.hparams.fused_optimizer
        if fused is None:
            fused = self.trainer.strategy.root_device.type == "cuda"
        return {"fused": True, "foreach": None} if fused else {"fused": None, "foreach": True}

    def num_optimizer_steps(self) -> int:
        """Optimizer steps in the whole fit: Lightning's estimate, the fewer of `max_steps` and `max_epochs` epochs'
        batches (a training batch is one optimizer step, so `max_steps` counts optimizer steps)."""
        batches = self.trainer.estimated_stepping_batches
        if math.isinf(batches):
            raise ValueError("set Trainer max_steps or max_epochs: the LR schedule needs the run's length")
        if batches < 1:  # Lightning's estimate for a training loader without a length: its max_steps, -1
            raise ValueError(
                "set Trainer max_steps: the LR schedule needs the run's length, which max_epochs cannot give with a "
                "training loader of unknown length (an IterableDataset's, say)"
            )
        return int(batches)  # a training batch is one optimizer step

    # ----- evaluation ---------------------------------------------------------------------------------------

    def _evaluate(self, batch: dict[str, Tensor], metrics: MetricCollection, stage: str) -> None:
        # not `self(...)`: `encode` reads what `on_before_batch_transfer` added (the padding mark, the packed rows)
        logits = self.end_task_head(self.encode(batch))
        loss = F.cross_entropy(logits.float(), batch["labels"])
        metrics.update(logits.argmax(-1), batch["labels"])
        batch_size = len(batch["labels"])
        self.log(f"{stage}/loss", loss, batch_size=batch_size, sync_dist=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=batch_size, prog_bar=True)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """``probabilities`` (examples x classes), with the batch's ``line`` and ``labels`` passed through when it has
        them, so a writer (`PredictionWriter`) can say which input each row is and whether it was right."""
        # not `self(...)`: `encode` reads what `on_before_batch_transfer` added (the padding mark, the packed rows)
        logits = self.end_task_head(self.encode(batch))
        probabilities = logits.float().softmax(-1)
        return {"probabilities": probabilities, **{key: batch[key] for key in ("line", "labels") if key in batch}}

    # ----- checkpoints and export ---------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Dropout draws from torch's generators; restoring them makes a resumed run exact. (The data module seeds
        # MLM masks per batch and its loaders' positions ride in the checkpoint on their own.) Under DDP every rank
        # saves (Lightning dumps the checkpoint on all ranks and rank 0 writes it): each rank's stream is its own,
        # as dropout advances it by the size of that rank's batches, so the checkpoint holds all of them.
        states = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        if self._trainer_attached() and self.trainer.world_size > 1:
            by_rank: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(by_rank, states)
            states = {**states, "by_rank": by_rank}
        checkpoint["rng_states"] = states
        checkpoint["run_seed"] = self.run_seed
        checkpoint["max_length"] = self.max_length

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_checkpoint_fits(checkpoint.get("hyper_parameters", {}))
        self._random_mlm_head = replace(self._random_mlm_head, missing=())
        self._rng_to_restore = checkpoint.get("rng_states")
        self._run_seed = checkpoint.get("run_seed", self._run_seed)
        self.max_length = self.max_length or checkpoint.get("max_length")
        # torch would restore the saved param groups' AdamW kernels too; Lightning and the fp16 loss scaler treat the
        # optimizer as what it was built as (a checkpoint made before fused became the GPU default failed in fp16)
        if self._trainer_attached():
            kernels = self._adamw_kernels()
            for state in checkpoint.get("optimizer_states", []):
                for group in state["param_groups"]:
                    group.update(kernels)

    def _check_checkpoint_fits(self, saved: Mapping[str, Any]) -> None:
        """Refuse, before any weight loads, a checkpoint of another task: its classes would be read under this
        task's label names (or fail on a shape). Resuming training also needs the same objectives and method: the
        optimizer's and the loaders' states are theirs."""
        keys = ["num_labels", "label_names"]
        if self._trainer_attached() and self.trainer.state.fn == TrainerFn.FITTING:
            keys += ["aux_objectives", "weighting"]
        differ = [
            f"{key}={_as_list(saved[key])!r} (here {_as_list(self.hparams[key])!r})"
            for key in keys
            if saved.get(key) is not None and self.hparams[key] is not None
            and _as_list(saved[key]) != _as_list(self.hparams[key])
        ]
        if differ:
            raise CheckpointMismatch(
                f"the checkpoint was made with {', '.join(differ)}: use it with the configuration it was trained "
                "with (`tartan`: its run folder's config.yaml; Python: TartanModule.load_from_checkpoint(path) builds "
                "that model), or pick a checkpoint of this task and method"
            )

    def _trainer_attached(self) -> bool:
        try:
            return self.trainer is not None
        except RuntimeError:  # a direct call from a notebook or test, or `load_from_checkpoint`
            return False

    def on_train_start(self) -> None:
        """A resumed run's random state, and its learning rates as its schedule gives them at the step it resumes
        at: the checkpoint holds the rates its own run set last, which differ when the run resumes with a longer
        `max_steps` (a linear schedule stretches, and the last rate of the shorter run was 0)."""
        scheduler = self.lr_schedulers()
        if isinstance(scheduler, LambdaLR) and scheduler.last_epoch > 0:
            optimizer = self.optimizers(use_pl_optimizer=False)
            for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)
        if self._rng_to_restore is None:
            return
        states, self._rng_to_restore = self._rng_to_restore, None
        by_rank = states.get("by_rank") or []
        if len(by_rank) == self.trainer.world_size:  # saved by as many ranks as resume it
            states = by_rank[self.trainer.global_rank]
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])

    def load_weights(self, checkpoint_path: str | Path) -> None:
        """Take encoder, MLM head and end-task head from a `TartanModule` checkpoint (not its task weights,
        optimizer or schedule): how post-hoc fine-tuning starts from a multitask run's best checkpoint."""
        path = Path(checkpoint_path)
        if not path.is_file():
            raise FileNotFoundError(f"init_checkpoint={str(path)!r}: no such checkpoint file")
        state = torch.load(path, map_location="cpu", weights_only=True).get("state_dict", {})
        weights = {key: value for key, value in state.items() if not key.startswith("weighting.")}
        try:
            missing, unexpected = self.load_state_dict(weights, strict=False)
        except RuntimeError as err:  # shape mismatches: another encoder size or number of labels
            raise ValueError(f"init_checkpoint={str(path)!r} does not fit this model: {err}") from None
        missing = [key for key in missing if not key.startswith("weighting.")]
        if missing or unexpected:
            raise ValueError(
                f"init_checkpoint={str(path)!r} is not a checkpoint of this model: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        self._random_mlm_head = replace(self._random_mlm_head, missing=())

    def save_end_task_model(
        self,
        path: str | Path,
        metrics: Optional[Mapping[str, float]] = None,
        task: Optional[str] = None,
        push_to_hub: Optional[str] = None,
    ) -> Path:
        """Write a standard HF model folder (`AutoModelForSequenceClassification`), its tokenizer and a model card
        (README.md: task, labels, method, task weights, `metrics`), and upload that folder to the Hub repo
        `push_to_hub` (created if missing) when one is given. Returns the folder, for `pipeline(model=...)`."""
        names = self.hparams.label_names or [str(i) for i in range(self.hparams.num_labels)]
        self._save_with_tokenizer(classification_model(self.encoder, self.end_task_head, names), path, self.max_length)
        card = end_task_model_card(
            encoder=self.hparams.encoder_name_or_path,
            label_names=names,
            weighting=self.hparams.weighting,
            aux_objectives=[name for name in self.weighting.active if name in self.hparams.aux_objectives],
            task_weights={name: float(weight) for name, weight in self.weighting.weights().items()},
            metrics=metrics,
            task=task,
        )
        card.save(Path(path) / "README.md")
        if push_to_hub is not None:
            api = HfApi()
            api.create_repo(push_to_hub, exist_ok=True)
            api.upload_folder(repo_id=push_to_hub, folder_path=str(path), commit_message="Upload end-task classifier")
        return Path(path)

    def save_mlm_model(self, path: str | Path) -> None:
        """Write encoder + MLM head as an HF masked-LM folder: the input of a later fine-tuning run (TAPT/DAPT)."""
        self._save_with_tokenizer(masked_lm_model(self.encoder, self.mlm_head), path)

    def _save_with_tokenizer(self, model: PreTrainedModel, path: str | Path, max_length: Optional[int] = None) -> None:
        """`max_length`: what the tokenizer's `model_max_length` becomes (an encoder for further training keeps its
        own). The tokenizer pads on the right, as in training: the classifier reads each row's first token."""
        name = self.hparams.tokenizer_name_or_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(local_copy(name), padding_side="right")
        except OSError as err:
            raise OSError(f"tokenizer_name_or_path={name!r}: {unreachable(err)}") from None
        model.save_pretrained(path)
        if max_length is not None:
            tokenizer.model_max_length = min(max_length, tokenizer.model_max_length)
        tokenizer.save_pretrained(path)


def _unique(params, module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters not already owned by `module` (the MLM decoder is tied to the input embeddings)."""
    seen = {id(p) for p in module.parameters()}
    return [p for p in params if id(p) not in seen]


def _decay_groups(name: str, params: list, lr: float, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, as is usual for transformers (biases and LayerNorm are exempt); frozen
    parameters are left out."""
    trained = [p for p in params if p.requires_grad]
    groups = [
        {"name": name, "params": [p for p in trained if p.dim() >= 2], "lr": lr, "weight_decay": weight_decay},
        {"name": f"{name}_no_decay", "params": [p for p in trained if p.dim() < 2], "lr": lr, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def lr_factors(schedule: str, warmup_ratio: float, run_length: Callable[[], int]) -> Callable[[int], float]:
    """The learning rate's factor at each optimizer step, as transformers' `get_linear_schedule_with_warmup` and
    `get_constant_schedule_with_warmup` give it: linear warm-up over `warmup_ratio` of the run, then linear decay
    to 0 or constant.

    The run's length (`run_length`) is read at step 1, not before: asked before training starts, Lightning's
    `Trainer.estimated_stepping_batches` sets up the training data, and then Lightning skips restoring a resumed
    run's data-loader position (pytorch-lightning issue 20550), so a run counted in epochs would start its
    interrupted epoch over. Step 0's factor needs no length: 0 with a warm-up, else 1.
    """
    length: list[int] = []  # (total, warm-up) steps, once read

    def factor(step: int) -> float:
        if step == 0:
            return 0.0 if warmup_ratio > 0 else 1.0
        if not length:
            total = run_length()
            length.extend((total, math.ceil(warmup_ratio * total)))
        total, warmup = length
        if step < warmup:
            return step / warmup
        if schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def micro_batches(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The micro-batches of one optimizer step. A training batch maps each source to one micro-batch (a dict of
    tensors) or, with gradient accumulation, to a list of them, one per micro-batch and as many for every source:
    one training batch is one optimizer step, so Lightning's step counts (progress bar, logging, validation and
    checkpoint intervals) are optimizer steps."""
    grouped = {name: isinstance(source, (list, tuple)) for name, source in batch.items()}
    if not any(grouped.values()):
        return [dict(batch)]
    counts = {name: len(source) for name, source in batch.items() if grouped[name]}
    if not all(grouped.values()):
        single = sorted(name for name, is_list in grouped.items() if not is_list)
        raise BatchFormatError(
            f"with gradient accumulation every source of a training batch is a list of micro-batches, but {single} "
            f"{'is' if len(single) == 1 else 'are'} a single one (the dev samples too: META-TARTAN reads one pair per "
            f"micro-batch); the others hold {counts}"
        )
    if len(set(counts.values())) != 1:
        raise BatchFormatError(
            f"every source of a training batch needs the same number of micro-batches, got {counts} (a source whose "
            "loader ran out and restarted mid-step, in CombinedLoader's max_size_cycle, brings fewer: give every "
            "source's DataLoader drop_last=True)"
        )
    return [{name: source[index] for name, source in batch.items()} for index in range(next(iter(counts.values())))]


def masked_positions(labels: Tensor) -> Tensor:
    """The flat indices of an MLM batch's masked positions (labels other than -100); the count depends on the data,
    so on a GPU the host waits for the result."""
    return labels.flatten().ne(-100).nonzero().squeeze(1)


def _with_masked_positions(source: dict[str, Any]) -> dict[str, Any]:
    labels = source.get("labels")
    if labels is None or labels.device.type != "cpu":
        return source
    return {**source, MASKED_POSITIONS: masked_positions(labels)}


def _build_weighting(
    name: str, objectives: list[str], encoder: nn.Module, config: Any, num_labels: int, hparams: Mapping[str, Any]
) -> Weighting:
    """The strategy named by the `weighting` option, given what it needs: META-TARTAN the encoder's parameters, the
    dev head's shape and its options; the others the objective names alone."""
    if name in ("aux_only", "meta") and len(objectives) < 2:
        # META-TARTAN alone with the end task would fit a dev head and take a dev gradient each step to weigh nothing
        raise ValueError(f"weighting={name!r} needs at least one entry in aux_objectives ('none' fine-tunes alone)")
    if name != "meta":
        return weighting_class(name)(objectives)
    meta_options = (
        "meta_lr",
        "dev_head_lr",
        "dev_head_weight_decay",
        "dev_head_steps",
        "dev_head_tolerance",
        "dev_gradient",
        "dev_head_on_cached_features",
        "per_task_grad_copies",
    )
    return MetaWeighting(
        objectives,
        params=list(encoder.parameters()),
        hidden_size=config.hidden_size,
        num_labels=num_labels,
        init_std=getattr(config, "initializer_range", 0.02),
        **{option: hparams[option] for option in meta_options},
    )


def _unscaled(loss: Tensor) -> Tensor:
    return loss


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _run_seed() -> int:
    """The seed `seed_everything` (or `tartan --seed_everything`) set for this run; 0 when none was set."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def _check_options(options: dict[str, Any]) -> None:
    """Fail at construction, naming the option, rather than mid-run."""
    for name in ("encoder_lr", "head_lr", "meta_lr", "dev_head_lr", "adam_eps", "max_grad_norm"):
        if not options[name] > 0:
            raise ValueError(f"{name} must be > 0, got {options[name]}")
    if options["num_labels"] < 2:
        raise ValueError(f"num_labels must be >= 2, got {options['num_labels']}")
    if options["accumulate_grad_batches"] < 1:
        raise ValueError(f"accumulate_grad_batches must be >= 1, got {options['accumulate_grad_batches']}")
    if not 0 <= options["warmup_ratio"] < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {options['warmup_ratio']}")
    if not 0 <= options["dropout"] < 1:
        raise ValueError(f"dropout must be in [0, 1), got {options['dropout']}")
    for name, choices in (("lr_schedule", ("linear", "constant")), ("dev_gradient", ("held_out", "in_sample"))):
        if options[name] not in choices:
            raise ValueError(f"{name}={options[name]!r} is not one of {choices}")
    weighting_class(options["weighting"])  # a name, or a strategy of one's own that imports
    if options["weighting"] == "meta" and options["freeze_encoder"]:
        raise ValueError("weighting='meta' weighs objectives by their encoder gradients: freeze_encoder=True has none")
    if options["monitor_metric"] not in MONITOR_METRICS:
        raise ValueError(f"monitor_metric={options['monitor_metric']!r} is not one of {MONITOR_METRICS}")
    if options["label_names"] is not None and len(options["label_names"]) != options["num_labels"]:
        raise ValueError(f"label_names has {len(options['label_names'])} names but num_labels={options['num_labels']}")
    if isinstance(options["aux_objectives"], str):  # list("dapt") would be four objectives, "d", "a", "p", "t"
        raise ValueError(f"aux_objectives must be a list of corpus names, e.g. [{options['aux_objectives']!r}]")
    aux = list(options["aux_objectives"])
    if len(set(aux)) != len(aux) or set(aux) & set(RESERVED_SOURCES):
        raise ValueError(f"aux_objectives must be distinct names other than {RESERVED_SOURCES}: {aux}")
