"""Checkpoints a run can resume from: `last.ckpt` always holds the latest state, and Ctrl-C or SIGTERM (a cluster's
pre-emption) stops cleanly.

Lightning's `ModelCheckpoint(save_last=True)` rewrites `last.ckpt` only when it also saves a top-k checkpoint,
so after a run's last improvement `last.ckpt` falls behind and a resumed run repeats (or loses) the steps since.
"""
import os
import pickle
import re
import signal
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info


#: the file LightningCLI writes into a run's log folder when its command starts
RUN_CONFIG = "config.yaml"


#: what `torch.load` raises for a file that is not a whole checkpoint (cut off while being written, say)
UNREADABLE = (RuntimeError, EOFError, OSError, pickle.UnpicklingError)


def load_lazily(path: Union[str, Path]) -> dict[str, Any]:
    """A checkpoint file's contents with its tensors left on disk until read (mmap), so reading its options or its
    callbacks' states reads no weights. A file in torch's format before 1.6, which mmap cannot read, loads whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


class ResumableCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` (best dev checkpoints as configured) whose `last.ckpt` is the run's latest state.

    `last.ckpt` is rewritten after every dev evaluation and at the end of fit; a fit that `max_steps` ends writes
    it at that step instead, inside the epoch, so that the same run continued with a larger `max_steps` goes on
    where it stopped (Lightning would count the epoch complete). The first Ctrl-C during fit asks
    training to stop at the end of the current optimizer step, and `last.ckpt` is written right then, inside the
    epoch, as a step-based checkpoint is: it resumes exactly, whether the run counts steps or epochs. (Once told to
    stop, Lightning counts the epoch as complete and may evaluate on dev once more; a checkpoint written after that
    would resume in the next epoch, and with the extra evaluation's best score.) A second Ctrl-C aborts at once.
    SIGTERM, which a cluster sends a job it pre-empts (Slurm, Kubernetes), is taken as the first Ctrl-C, in place of
    Lightning's handling, which stops without writing a checkpoint. `save_last=False` turns `last.ckpt` (and the
    signal handling) off.

    A command that fails before its run logs anything (a data error, a checkpoint of another task) removes the run's
    log folder, empty but for LightningCLI's `config.yaml`, so that the next run takes its `version_<n>`.

    A fit resumed from a checkpoint in the callback's own folder (`resume_from`, which `tartan fit --ckpt_path last`
    sets) writes on into that folder without Lightning's warning that it is not empty: that is the point.
    """

    def __init__(self, *args: Any, save_last: Optional[bool] = True, **kwargs: Any) -> None:
        super().__init__(*args, save_last=False, **kwargs)  # last.ckpt is written here, at the moments above
        self.keep_last = bool(save_last)
        self._stop_requested = False
        self._stopped_at: Optional[int] = None  # the optimizer step a Ctrl-C stopped the run after
        self._saved_inside_epoch = False  # last.ckpt was written at the step max_steps ended the run at
        self._steps_before_batch = 0
        self._stop_signal: Optional[int] = None
        self._previous_handlers: dict[int, Any] = {}
        self._fitting = True
        #: the checkpoint a fit resumes from; set before `Trainer.fit(..., ckpt_path=...)` to resume in its folder
        self.resume_from: Optional[str] = None

    @property
    def stopped_at(self) -> Optional[int]:
        """The optimizer step a Ctrl-C stopped the last fit after; None when it ran to its end."""
        return self._stopped_at

    @property
    def stop_signal(self) -> Optional[int]:
        """The signal (SIGINT or SIGTERM) that stopped the last fit (SIGINT on a DDP rank another rank's signal
        stopped); None when it ran to its end."""
        if self._stopped_at is None:
            return None
        return self._stop_signal or signal.SIGINT

    @property
    def last_checkpoint_path(self) -> str:
        return os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            if self.resume_from is not None and stage == "fit":
                folder = os.path.dirname(os.path.realpath(self.resume_from))
                warnings.filterwarnings("ignore", message=f"Checkpoint directory {re.escape(folder)} exists")
            super().setup(trainer, pl_module, stage)
        self._fitting = stage == "fit"  # Lightning sets callbacks up before it restores their state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._fitting:
            super().load_state_dict(self._moved(state_dict))
        else:
            # validating, testing or predicting with a checkpoint writes none: its record of the run's checkpoints
            # goes unused, and Lightning would warn that this new run's folder is not the trained run's
            self.best_model_path = state_dict["best_model_path"]

    def _moved(self, state: dict[str, Any]) -> dict[str, Any]:
        """The saved state with its paths in this folder, when a fit resumes from this folder's checkpoint but the
        state names another: the run's folder was moved (or copied) since, and its best dev checkpoint, score and
        top-k files moved with it. (Lightning would forget them, and a worse score would become the best.)"""
        saved = state.get("dirpath")
        if self.resume_from is None or saved is None or not self.dirpath:
            return state
        here = os.path.realpath(self.dirpath)
        if saved == self.dirpath or os.path.dirname(os.path.realpath(self.resume_from)) != here:
            return state

        def moved(path: Any) -> Any:
            return os.path.join(self.dirpath, os.path.basename(path)) if isinstance(path, str) and path else path

        state = dict(state, dirpath=self.dirpath)
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            state[key] = moved(state.get(key))
        state["best_k_models"] = {moved(path): score for path, score in (state.get("best_k_models") or {}).items()}
        return state

    def save_latest(self, trainer: pl.Trainer) -> None:
        """Write `last.ckpt` whole or not at all (in a local folder, written beside it, then renamed): a job killed
        while writing it keeps the previous one to resume from."""
        last = self.last_checkpoint_path
        if "://" in str(self.dirpath):  # a remote folder (s3://, ...): written in place
            trainer.save_checkpoint(last, self.save_weights_only)
        else:
            partial = f"{last}.partial"
            trainer.save_checkpoint(partial, self.save_weights_only)
            if trainer.is_global_zero:
                os.replace(partial, last)
            trainer.strategy.barrier("ResumableCheckpoint.save_latest")
        self.last_model_path = last

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)  # first the best checkpoint, so last.ckpt records it
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if self.keep_last and fitting and self._stopped_at is None:
            self.save_latest(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.keep_last and self._stopped_at is None and not self._saved_inside_epoch:
            self.save_latest(trainer)
        elif self._stopped_at is not None:
            by = f" ({signal.Signals(self._stop_signal).name})" if self._stop_signal else ""
            rank_zero_info(f"Stopped after optimizer step {self._stopped_at}{by}: resume with --ckpt_path last")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._stop_requested = False
        self._stop_signal = None
        self._stopped_at = None
        self._saved_inside_epoch = False
        if self.keep_last:
            self._replace_signal_handler(signal.SIGINT)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.keep_last:  # Lightning sets its own SIGTERM handler after fit starts, which this one replaces
            self._replace_signal_handler(signal.SIGTERM)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self._restore_signal_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._restore_signal_handlers()
        if trainer.is_global_zero:  # a run that failed before it logged anything (bad data, say) leaves no folder
            for logger in trainer.loggers:
                folder = logger.log_dir
                if folder and os.path.isdir(folder) and set(os.listdir(folder)) <= {RUN_CONFIG}:
                    if os.path.exists(os.path.join(folder, RUN_CONFIG)):
                        os.remove(os.path.join(folder, RUN_CONFIG))
                    os.rmdir(folder)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._steps_before_batch = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # stop only where an optimizer step has just completed, so no accumulated gradient is lost, and on
        # every rank at the same step (Ctrl-C reaches the ranks at slightly different moments)
        if trainer.global_step > self._steps_before_batch and self.keep_last:
            if trainer.strategy.reduce_boolean_decision(self._stop_requested, all=False):
                self.save_latest(trainer)
                self._stopped_at = trainer.global_step
                trainer.should_stop = True
            elif 0 < trainer.max_steps <= trainer.global_step:
                # once fit ends, Lightning counts this epoch as complete; a dev evaluation due now rewrites it
                self.save_latest(trainer)
                self._saved_inside_epoch = True

    def _request_stop(self, signum: int, frame: Any) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        self._stop_signal = signum
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        rank_zero_info(
            f"\n{what}: stopping at the end of this optimizer step and writing last.ckpt ({what} again aborts)"
        )

    def _replace_signal_handler(self, signum: int) -> None:
        """Take `signum` as a request to stop; for SIGTERM, in place of Lightning's handler, which stops without a
        checkpoint and exits with status 0."""
        try:
            self._previous_handlers[signum] = signal.signal(signum, self._request_stop)
        except ValueError:  # not the main thread: the signal keeps Lightning's own handling
            return

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
