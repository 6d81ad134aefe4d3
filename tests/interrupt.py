"""A callback the command-line tests add with `--trainer.callbacks+=interrupt.InterruptAtStep`: right after optimizer
step `step` it sends its own process `signal_name`: SIGINT as a person pressing Ctrl-C would, or SIGTERM as a
cluster pre-empting the job does."""
import os
import signal

import pytorch_lightning as pl


class InterruptAtStep(pl.Callback):
    def __init__(self, step: int, signal_name: str = "SIGINT") -> None:
        self.step = step
        self.signal = signal.Signals[signal_name]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)
            self.step = -1  # once
