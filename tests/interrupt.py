"""A callback the command-line tests add with `--trainer.callbacks+=interrupt.InterruptAtStep`: it presses Ctrl-C
(sends SIGINT to its own process) right after optimizer step `step`, as a person at the terminal would."""
import os
import signal

import pytorch_lightning as pl


class InterruptAtStep(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)
            self.step = -1  # once
