"""`TartanModule`: end-task aware training (TARTAN) as a LightningModule with manual optimization.

One training step, in order: the dev gradient (META only, once per optimizer step), then for each active
objective its forward, loss and `manual_backward` (weighted, divided by the accumulation count), then, once
every `accumulate_grad_batches` batches, gradient clipping, the optimizer and LR-scheduler steps, and the
meta-weight update.
"""
import copy
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    get_linear_schedule_with_warmup,
)

from lightning_tartan.dev_head import DevHead
from lightning_tartan.heads import ClassificationHead, load_encoder_and_mlm_head
from lightning_tartan.task_gradients import TaskGradientCosines
from lightning_tartan.weighting import END_TASK, build_weighting

MONITOR_METRICS = ("f1_macro", "accuracy")


class TartanModule(pl.LightningModule):
    """Multi-task an end task with auxiliary masked-LM objectives, with fixed or meta-learned task weights.

    Args:
        encoder_name_or_path: any masked-LM checkpoint the HF Auto classes load (hub name or folder).
        num_labels: end-task classes (a datamodule's `num_labels`).
        aux_objectives: names of the auxiliary MLM batches in a training batch (e.g. `["tapt", "dapt"]`).
        weighting: `none` (fine-tuning), `equal` (MT-TARTAN), `meta` (META-TARTAN) or `aux_only` (TAPT/DAPT).
        accumulate_grad_batches: batches per optimizer step (Lightning's own flag is unavailable in manual
            optimization).
        monitor_metric: the validation metric that drives checkpointing and early stopping.
        sparse_mlm, dev_head_on_cached_features, per_task_grad_copies: efficiency switches; the paper's code
            corresponds to `False, False, True`.
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
        sparse_mlm: bool = True,
        dev_head_on_cached_features: bool = True,
        per_task_grad_copies: bool = False,
    ) -> None:
        super().__init__()
        _check_options(locals())
        # Recorded resolved, so the hparams agree with a datamodule that tokenizes with the encoder's tokenizer.
        tokenizer_name_or_path = tokenizer_name_or_path or encoder_name_or_path
        self.save_hyperparameters()
        self.automatic_optimization = False

        self.encoder, self.mlm_head, config = load_encoder_and_mlm_head(encoder_name_or_path, dropout)
        init_std = getattr(config, "initializer_range", 0.02)
        self.end_task_head = ClassificationHead(config.hidden_size, num_labels, dropout)
        self.end_task_head.reset_parameters(init_std)
        self.objectives = [END_TASK, *aux_objectives]
        self.weighting = build_weighting(weighting, self.objectives, meta_lr)
        self.monitor_metric = monitor_metric
        self.dev_head = DevHead(
            config.hidden_size,
            num_labels,
            lr=dev_head_lr,
            weight_decay=dev_head_weight_decay,
            max_steps=dev_head_steps,
            tolerance=dev_head_tolerance,
            init_std=init_std,
            on_cached_features=dev_head_on_cached_features,
        )
        self.task_cosines = TaskGradientCosines(list(self.encoder.parameters()), keep_copies=per_task_grad_copies)
        metrics = MetricCollection(
            {
                "f1_macro": MulticlassF1Score(num_labels, average="macro"),
                "accuracy": MulticlassAccuracy(num_labels, average="micro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self._rng_to_restore: Optional[dict[str, Any]] = None

    # ----- forward passes -----------------------------------------------------------------------------------

    def encode(self, batch: dict[str, Tensor]) -> Tensor:
        return self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """End-task logits."""
        return self.end_task_head(self.encode({"input_ids": input_ids, "attention_mask": attention_mask}))

    def end_task_loss(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self.end_task_head(self.encode(batch))
        return F.cross_entropy(logits.float(), batch["labels"])

    def mlm_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Masked-LM loss; with `sparse_mlm` the vocabulary projection runs only at masked positions."""
        hidden = self.encode(batch)
        labels = batch["labels"]
        if not self.hparams.sparse_mlm:
            logits = self.mlm_head(hidden)
            return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        masked = labels != -100
        logits = self.mlm_head(hidden[masked])
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), labels[masked])

    def objective_loss(self, name: str, batch: dict[str, Any]) -> Tensor:
        if name not in batch:
            raise KeyError(
                f"training batch has no {name!r} entry, which weighting={self.hparams.weighting!r} trains "
                f"(batch keys: {sorted(batch)}); check the datamodule's corpora against aux_objectives"
            )
        return self.end_task_loss(batch[name]) if name == END_TASK else self.mlm_loss(batch[name])

    def dev_gradient(self, dev_batch: dict[str, Tensor]) -> list[Tensor]:
        """g_dev over the encoder's parameters, from a dev head fitted with the encoder frozen."""
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            return self.dev_head.gradient(
                lambda: self.encode(dev_batch)[:, 0],
                dev_batch["labels"],
                self.task_cosines.params,
                seed=self.global_step,
                loss_scale=self._loss_scale(),
            )
        finally:
            self.encoder.train(was_training)

    def _loss_scale(self) -> float:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        return float(scaler.get_scale()) if scaler is not None else 1.0

    # ----- training -----------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters"):
            # Each objective's backward leaves the other objectives' heads unused; DDP must expect that.
            rank_zero_info("TartanModule: enabling DDP find_unused_parameters (each objective uses its own head)")
            strategy._ddp_kwargs["find_unused_parameters"] = True

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        accumulate = self.hparams.accumulate_grad_batches
        starts_step = batch_idx % accumulate == 0
        ends_step = (batch_idx + 1) % accumulate == 0 or self.trainer.is_last_batch
        track_cosines = self.weighting.needs_dev_gradient

        if track_cosines and starts_step:
            if "meta_dev" not in batch:
                raise KeyError(
                    f"weighting='meta' needs a 'meta_dev' batch (batch keys: {sorted(batch)}); "
                    "enable the datamodule's include_meta_dev"
                )
            self.task_cosines.start_step(self.dev_gradient(batch["meta_dev"]))

        weights = self.weighting.weights()
        for name in self.weighting.active:
            loss = self.objective_loss(name, batch)
            self.manual_backward(loss * weights[name].to(loss) / accumulate)
            if track_cosines:
                self.task_cosines.record(name)
            self.log(f"train/loss_{name}", loss.detach(), batch_size=len(batch[name]["input_ids"]))
        if track_cosines:
            self.task_cosines.end_micro_batch()
        if not ends_step:
            return

        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        for name, weight in weights.items():
            self.log(f"train/weight_{name}", weight)
        if track_cosines:
            self.update_task_weights(self.task_cosines.finish_step())
        self.log("train/lr_encoder", scheduler.get_last_lr()[0])
        self.log("train/lr_heads", scheduler.get_last_lr()[-1])

    def update_task_weights(self, cosines: dict[str, Tensor]) -> None:
        """The meta step; skipped when a gradient overflowed (fp16) so inf/NaN never reach the weights."""
        finite = bool(torch.stack(list(cosines.values())).isfinite().all())
        self.log("train/meta_skipped", float(not finite))
        if not finite:
            return
        for name, cosine in cosines.items():
            self.log(f"train/cos_{name}", cosine)
        self.weighting.update(cosines)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this after unscaling fp16 gradients, so clipping sees their true norm.
        self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        encoder_params = list(self.encoder.parameters()) + _unique(self.mlm_head.parameters(), self.encoder)
        groups = [
            *_decay_groups(self.encoder, encoder_params, hp.encoder_lr, hp.encoder_weight_decay),
            *_decay_groups(self.end_task_head, list(self.end_task_head.parameters()), hp.head_lr, hp.head_weight_decay),
        ]
        optimizer = torch.optim.AdamW(groups, betas=tuple(hp.adam_betas), eps=hp.adam_eps)
        total = self.num_optimizer_steps()
        scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(hp.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def num_optimizer_steps(self) -> int:
        """Optimizer steps in the whole fit; `Trainer.max_steps` counts optimizer steps in manual optimization."""
        if self.trainer.max_steps > 0:
            return self.trainer.max_steps
        batches = self.trainer.estimated_stepping_batches
        if math.isinf(batches):
            raise ValueError("set Trainer max_steps or max_epochs: the LR schedule needs the run's length")
        return max(1, math.ceil(batches / self.hparams.accumulate_grad_batches))

    # ----- evaluation ---------------------------------------------------------------------------------------

    def _evaluate(self, batch: dict[str, Tensor], metrics: MetricCollection, stage: str) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        metrics.update(logits.argmax(-1), batch["labels"])
        batch_size = len(batch["labels"])
        self.log(f"{stage}/loss", loss, batch_size=batch_size, sync_dist=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=batch_size, prog_bar=True)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["input_ids"], batch["attention_mask"]).argmax(-1)

    # ----- checkpoints and export ---------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Dropout and MLM masking draw from torch's generators; restoring them makes a resumed run exact.
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        if self._rng_to_restore is None:
            return
        states, self._rng_to_restore = self._rng_to_restore, None
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])

    def save_end_task_model(self, path: str | Path) -> None:
        """Write a standard HF model folder (`AutoModelForSequenceClassification`) plus tokenizer."""
        config = copy.deepcopy(self.encoder.config)
        config.num_labels = self.hparams.num_labels
        names = self.hparams.label_names or [str(i) for i in range(self.hparams.num_labels)]
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
        model = AutoModelForSequenceClassification.from_config(config)
        _load_encoder(model, self.encoder)
        _copy_classification_head(self.end_task_head, model)
        self._save_with_tokenizer(model, path)

    def save_mlm_model(self, path: str | Path) -> None:
        """Write encoder + MLM head as an HF masked-LM folder: the input of a later fine-tuning run (TAPT/DAPT)."""
        model = AutoModelForMaskedLM.from_config(copy.deepcopy(self.encoder.config))
        _load_encoder(model, self.encoder)
        head = next(child for child in model.children() if child is not model.base_model)
        head.load_state_dict(self.mlm_head.state_dict())
        self._save_with_tokenizer(model, path)

    def _save_with_tokenizer(self, model: PreTrainedModel, path: str | Path) -> None:
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(self.hparams.tokenizer_name_or_path).save_pretrained(path)


def _load_encoder(model: PreTrainedModel, encoder: torch.nn.Module) -> None:
    missing, unexpected = model.base_model.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or any(not key.startswith("pooler.") for key in missing):
        raise RuntimeError(f"encoder weights do not fit {type(model).__name__}: {missing=} {unexpected=}")


def _copy_classification_head(head: ClassificationHead, model: torch.nn.Module) -> None:
    """Map our head onto the architecture's: RoBERTa-style `classifier.{dense,out_proj}` or BERT-style
    `pooler.dense` + `classifier`, which compute the same function."""
    classifier = getattr(model, "classifier", None)
    pooler = getattr(model.base_model, "pooler", None)
    if classifier is not None and hasattr(classifier, "dense") and hasattr(classifier, "out_proj"):
        pairs = [(head.dense, classifier.dense), (head.out_proj, classifier.out_proj)]
    elif isinstance(classifier, torch.nn.Linear) and pooler is not None and hasattr(pooler, "dense"):
        pairs = [(head.dense, pooler.dense), (head.out_proj, classifier)]
    else:
        raise NotImplementedError(f"save_end_task_model does not know {type(model).__name__}'s classifier layout")
    with torch.no_grad():
        for source, target in pairs:
            target.weight.copy_(source.weight)
            target.bias.copy_(source.bias)


def _unique(params, module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters not already owned by `module` (the MLM decoder is tied to the input embeddings)."""
    seen = {id(p) for p in module.parameters()}
    return [p for p in params if id(p) not in seen]


def _decay_groups(module: torch.nn.Module, params: list, lr: float, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, as is usual for transformers (biases and LayerNorm are exempt)."""
    return [
        {"params": [p for p in params if p.dim() >= 2], "lr": lr, "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "lr": lr, "weight_decay": 0.0},
    ]


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
    if options["monitor_metric"] not in MONITOR_METRICS:
        raise ValueError(f"monitor_metric={options['monitor_metric']!r} is not one of {MONITOR_METRICS}")
    if options["label_names"] is not None and len(options["label_names"]) != options["num_labels"]:
        raise ValueError(f"label_names has {len(options['label_names'])} names but num_labels={options['num_labels']}")
    if len(set(options["aux_objectives"])) != len(options["aux_objectives"]) or END_TASK in options["aux_objectives"]:
        raise ValueError(f"aux_objectives must be distinct names other than {END_TASK!r}: {options['aux_objectives']}")
