"""One short `Trainer.fit` of TartanModule on ACL-ARC for tests/test_resume.py, in one of three ways: uninterrupted,
killed with SIGKILL right after the checkpoint of step `kill_after` is written (a crash or a pre-empted job, no
cleanup), or resumed from such a checkpoint. A script, so the killed and the resumed runs are processes of their own.

Usage: python tests/resume_worker.py SPEC_JSON  (the keyword arguments of `train`); writes OUT_DIR/final.pt.
"""
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules import CitationIntentDataModule  # noqa: E402
from lightning_tartan import TartanModule  # noqa: E402

#: batches per epoch (Trainer.limit_train_batches), so a few steps cross epochs and a checkpoint falls mid-epoch
EPOCH_BATCHES = 4
MAX_STEPS = 10


class KillAfterCheckpoint(pl.Callback):
    """SIGKILLs its own process as the first batch after the checkpoint `path` was written starts."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.path.exists():
            os.kill(os.getpid(), signal.SIGKILL)


def train(
    encoder: str,
    data_dir: str,
    cache_dir: str,
    short_corpus: str,
    weighting: str,
    num_workers: int,
    out_dir: str,
    kill_after: Optional[int] = None,
    ckpt_path: Optional[str] = None,
    max_epochs: Optional[int] = None,
    devices: int = 1,
    max_length: int = 32,
) -> dict[str, torch.Tensor]:
    """The module's final state; a resumed run is seeded differently, so all it continues comes from the checkpoint.
    The run lasts `MAX_STEPS` optimizer steps, or `max_epochs` epochs when given (as the shipped configs count).
    With `devices` 2, two DDP processes (gloo): Lightning re-runs this script for the second, and each rank kills
    itself after the checkpoint, as a pre-empted job loses all its processes."""
    pl.seed_everything(123 if ckpt_path else 0)
    data = CitationIntentDataModule(
        data_dir=data_dir,
        tokenizer_name_or_path=encoder,
        # the short corpus wraps around several times within an epoch
        aux_corpora={"tapt": "train.txt", "dapt": "domain.1xTAPT.txt", "short": short_corpus},
        max_length=max_length,
        batch_size=4,
        aux_batch_size=4,
        dev_batch_size=4,
        dev_grad_batch_size=4,
        num_workers=num_workers,
        cache_dir=cache_dir,
    )
    module = TartanModule(
        encoder, num_labels=data.num_labels, aux_objectives=data.aux_names, weighting=weighting, meta_lr=0.5
    )  # dropout: the default 0.1
    callbacks = []
    if kill_after is not None:
        every = ModelCheckpoint(dirpath=out_dir, filename="mid", every_n_train_steps=kill_after)
        callbacks = [every, KillAfterCheckpoint(Path(out_dir) / "mid.ckpt")]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_find_unused_parameters_true" if devices > 1 else "auto",
        max_steps=MAX_STEPS if max_epochs is None else -1,
        max_epochs=max_epochs,
        limit_train_batches=EPOCH_BATCHES,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=kill_after is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    state = {name: value.detach().clone() for name, value in module.state_dict().items()}
    if trainer.is_global_zero:
        torch.save(state, Path(out_dir) / "final.pt")
    return state


if __name__ == "__main__":
    torch.set_num_threads(1)  # the same reduction order as the in-process run it is compared with
    train(**json.loads(sys.argv[1]))
