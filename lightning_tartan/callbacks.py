"""Callbacks that make a run inspectable: TARTAN's task weights as a figure, progress that survives a resume."""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Dict, List, Optional, Union

import pytorch_lightning as pl
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.trainer.states import TrainerFn

__all__ = ["ResumableProgressBar", "TaskWeightPlot"]

_PANELS = (
    # (axes label, logged-key prefix, title, y label)
    ("weights", "train/weight_", "Task weights", "weight"),
    ("cosines", "train/cos_", "Gradient alignment with the dev task", "cos(task grad, dev grad)"),
    ("losses", "train/loss_", "Per-objective training loss", "loss"),
)


class TaskWeightPlot(pl.Callback):
    """Records task weights, gradient cosines, per-objective losses and the dev metric, and plots them.

    META-TARTAN's learned weights are the main thing to look at when a run under- or over-performs, so this
    callback keeps them (and the dev metric they are meant to improve) without needing any logger, and writes
    them as one PNG, rewritten after each dev evaluation (so a long run can be watched, and an interrupted one keeps
    its picture) and at the end of fit.

    ``history`` is a dict of lists, keyed by the names the module logs:

    * ``"step"``: ``trainer.global_step`` after each optimizer step (1, 2, ...);
    * ``"train/weight_<objective>"``, ``"train/cos_<objective>"``, ``"train/loss_<objective>"``: one value per
      entry of ``"step"`` (NaN where the key had not been logged yet); a key never logged is absent;
    * ``"val_step"``: the global step of each validation run during fit (sanity check excluded);
    * the dev metric key (``monitor``, e.g. ``"val/f1_macro"``): one value per entry of ``"val_step"``.

    The figure's axes carry labels (``Axes.get_label()``): ``"weights"``, ``"dev_metric"`` (twin of the
    weights axes), ``"cosines"`` and ``"losses"``; the last two only when such keys were recorded.

    Args:
        dirpath: directory for the PNG; ``None`` means ``trainer.log_dir`` (``trainer.default_root_dir``
            without a logger).
        filename: name of the PNG inside ``dirpath``.
        monitor: logged key of the dev metric; ``None`` means ``"val/" + pl_module.monitor_metric``.
        enabled: ``False`` turns the callback into a no-op, so configs can switch it off.
    """

    def __init__(
        self,
        dirpath: Optional[str] = None,
        filename: str = "task_weights.png",
        monitor: Optional[str] = None,
        enabled: bool = True,
    ) -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.monitor = monitor
        self._monitor_arg = monitor
        self.enabled = enabled
        self.history: Dict[str, List[float]] = {"step": [], "val_step": []}
        self.last_saved_path: Optional[str] = None
        self._objectives: List[str] = []
        self._last_global_step = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Runs before a checkpoint's callback state is restored, so a resumed fit keeps the restored history
        # while a fresh fit does not mix with the previous one's.
        if not self.enabled or stage != TrainerFn.FITTING:
            return
        self._objectives = list(pl_module.objectives)
        self.monitor = self._monitor_arg
        if self.monitor is None and hasattr(pl_module, "monitor_metric"):
            self.monitor = f"val/{pl_module.monitor_metric}"
        self.history = {"step": [], "val_step": []}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_global_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # With gradient accumulation a batch can end without an optimizer step; weights only change on steps.
        if not self.enabled or trainer.global_step == self._last_global_step:
            return
        self._last_global_step = trainer.global_step
        metrics = trainer.callback_metrics
        self.history["step"].append(trainer.global_step)
        n_steps = len(self.history["step"])
        for _, prefix, _, _ in _PANELS:
            for objective in self._objectives:
                key = prefix + objective
                value = metrics.get(key)
                if value is None and key not in self.history:
                    continue
                column = self.history.setdefault(key, [])
                column.extend([math.nan] * (n_steps - 1 - len(column)))
                column.append(math.nan if value is None else float(value))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            not self.enabled
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or self.monitor not in trainer.callback_metrics
        ):
            return
        self.history["val_step"].append(trainer.global_step)
        self.history.setdefault(self.monitor, []).append(float(trainer.callback_metrics[self.monitor]))
        self._write(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            self._write(trainer)

    def _write(self, trainer: pl.Trainer) -> None:
        # `trainer.log_dir` broadcasts, so every rank must resolve the directory, not just rank 0.
        dirpath = self.dirpath or trainer.log_dir or trainer.default_root_dir
        if trainer.is_global_zero:
            self.plot(os.path.join(dirpath, self.filename))

    def plot(self, path: Optional[Union[str, os.PathLike]] = None) -> Figure:
        """Build the figure from ``history``; also write it as PNG to ``path`` when given."""
        panels = [p for p in _PANELS if p[0] == "weights" or any(k.startswith(p[1]) for k in self.history)]
        objectives = self._plotted_objectives()
        fig = Figure(figsize=(9, 3.2 * len(panels)), layout="constrained")
        fig.suptitle("TARTAN task weighting")
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        steps = self.history["step"]
        for ax, (label, prefix, title, ylabel) in zip(axes, panels):
            ax.set_label(label)
            ax.set_title(title)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            for i, objective in enumerate(objectives):
                if prefix + objective in self.history:
                    ax.plot(steps, self.history[prefix + objective], color=f"C{i}", label=objective)
            if label == "cosines":
                ax.axhline(0.0, color="grey", linewidth=0.8)
            handles, labels = ax.get_legend_handles_labels()
            if label == "weights" and self.monitor in self.history:
                dev = ax.twinx()
                dev.set_label("dev_metric")
                dev.set_ylabel(f"dev {self.monitor}")
                dev.plot(
                    self.history["val_step"],
                    self.history[self.monitor],
                    color="black",
                    linestyle="--",
                    marker="o",
                    label=f"dev {self.monitor}",
                )
                dev_handles, dev_labels = dev.get_legend_handles_labels()
                handles, labels = handles + dev_handles, labels + dev_labels
            if handles:
                # Outside the axes so long runs stay readable; further right when the twin axis takes the edge.
                anchor = 1.1 if label == "weights" and self.monitor in self.history else 1.01
                ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(anchor, 1.0), fontsize="small")
        axes[-1].set_xlabel("optimizer step")
        if path is not None:
            path = os.fspath(path)
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fig.savefig(path, dpi=120)
            self.last_saved_path = path
        return fig

    def _plotted_objectives(self) -> List[str]:
        # Recovered from the history keys so a history restored from a checkpoint plots without a module.
        objectives: List[str] = []
        for _, prefix, _, _ in _PANELS:
            for key in self.history:
                if key.startswith(prefix) and key[len(prefix) :] not in objectives:
                    objectives.append(key[len(prefix) :])
        return objectives

    def state_dict(self) -> Dict[str, Any]:
        return {"history": copy.deepcopy(self.history), "monitor": self.monitor}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.history = copy.deepcopy(state_dict["history"])
        self.monitor = state_dict["monitor"]


class ResumableProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, which also gives a run resumed inside an epoch its epoch and length.

    Lightning does not start that epoch again, so its bar would read ``Training: 6/?`` for the rest of it. The
    `tartan` command uses this bar unless the config names another.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # the bar goes on from the batches of this epoch done before the resume; Lightning's total counts from 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        total = min(trainer.num_training_batches, done + self.total_train_batches)
        self.train_progress_bar.total = None if math.isinf(total) else total
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")
