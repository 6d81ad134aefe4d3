"""Post-hoc fine-tuning, the paper's last stage: keep its result only if it beats, on dev, the model it started from.

The authors' code (ldery/TARTAN, `finetune_primary_task`) reloads the best multitask checkpoint, fine-tunes encoder
and end-task head on the end task alone (AdamW at 5e-6, no schedule, up to 10 epochs, patience 3) and reports the
test score of whichever model, before or after, is better on dev; the fine-tuned one must be strictly better.
Here that stage is an ordinary fit (`configs/methods/posthoc.yaml`, `TartanModule(init_checkpoint=...)`) plus this
callback, which scores the starting model and makes the choice.
"""
import json
import os
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info


class PostHocSelection(pl.Callback):
    """Chooses between the starting model and the best fine-tuned checkpoint by dev score.

    The starting model's score comes from a `trainer.validate(model, datamodule=...)` call before
    `trainer.fit(...)` (the `tartan` CLI makes it when this callback is configured), which also saves the starting
    weights as `posthoc_start.ckpt` in the log directory. The fine-tuned score is the trainer's
    `ModelCheckpoint` best, on the same monitored metric. At the end of fit the choice is printed and written to
    `<log_dir>/posthoc_selection.json`; `selected_checkpoint` is the checkpoint to test.

    Args:
        filename: name of the JSON file written in the trainer's log directory.
    """

    def __init__(self, filename: str = "posthoc_selection.json") -> None:
        self.filename = filename
        self.start_score: Optional[float] = None
        self.start_checkpoint: Optional[str] = None
        #: what `on_fit_end` decided: selected ("start" or "fine_tuned"), selected_checkpoint, scores, monitor
        self.selection: dict[str, Any] = {}

    @property
    def selected_checkpoint(self) -> Optional[str]:
        return self.selection.get("selected_checkpoint")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.VALIDATING or trainer.sanity_checking:
            return
        monitor = _checkpoint_callback(trainer).monitor
        if monitor not in trainer.callback_metrics:
            raise KeyError(f"PostHocSelection: validation logged no {monitor!r} (logged: {sorted(trainer.callback_metrics)})")
        self.start_score = float(trainer.callback_metrics[monitor])
        self.start_checkpoint = str(Path(trainer.log_dir or trainer.default_root_dir) / "posthoc_start.ckpt")
        trainer.save_checkpoint(self.start_checkpoint, weights_only=True)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.start_score is None:
            raise RuntimeError(
                "PostHocSelection compares the fine-tuned model with the one it starts from: call "
                "trainer.validate(model, datamodule=...) before trainer.fit(...) (the tartan CLI does this)"
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        checkpoint = _checkpoint_callback(trainer)
        tuned = None if checkpoint.best_model_score is None else float(checkpoint.best_model_score)
        keep_tuned = tuned is not None and tuned > self.start_score
        self.selection = {
            "selected": "fine_tuned" if keep_tuned else "start",
            "selected_checkpoint": checkpoint.best_model_path if keep_tuned else self.start_checkpoint,
            "monitor": checkpoint.monitor,
            "start_score": self.start_score,
            "fine_tuned_score": tuned,
            "start_checkpoint": self.start_checkpoint,
            "fine_tuned_checkpoint": checkpoint.best_model_path or None,
        }
        if tuned is None:
            reason = f"fine-tuning ran no dev evaluation to compare with {checkpoint.monitor} {self.start_score:.4f}"
        else:
            reason = (
                f"{checkpoint.monitor} {tuned:.4f} after fine-tuning "
                f"{'>' if keep_tuned else '<='} {self.start_score:.4f} of the model it started from"
            )
        kept = "the fine-tuned model" if keep_tuned else "the starting (multitask) model"
        rank_zero_info(f"Post-hoc fine-tuning: kept {kept} ({reason}); test {self.selected_checkpoint}")
        if trainer.is_global_zero:
            path = Path(trainer.log_dir or trainer.default_root_dir) / self.filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.selection, indent=2) + os.linesep)

    def state_dict(self) -> dict[str, Any]:
        return {"start_score": self.start_score, "start_checkpoint": self.start_checkpoint}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.start_score = state_dict["start_score"]
        self.start_checkpoint = state_dict["start_checkpoint"]


def _checkpoint_callback(trainer: pl.Trainer) -> ModelCheckpoint:
    checkpoint = trainer.checkpoint_callback
    if checkpoint is None or checkpoint.monitor is None:
        raise ValueError("PostHocSelection needs a ModelCheckpoint that monitors the dev metric")
    return checkpoint
