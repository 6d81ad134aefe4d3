"""Runs a short TartanModule fit on synthetic batches, 1 or 2 CPU processes (gloo), and saves each rank's state and
how many backward passes all-reduced gradients.

Lightning's DDP launcher re-runs this script for every rank, so it is a script rather than a pytest test.
Usage: python tests/ddp_worker.py ENCODER_DIR WEIGHTING DEVICES OUT_DIR [STRATEGY [DEV_SAMPLES_PER_RANK]]
"""
import json
import os
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import loader, make_batches, shard  # noqa: E402

from lightning_tartan import TartanModule  # noqa: E402

STEPS = 3


class SyncCounter(pl.Callback):
    """Counts the backward passes that all-reduced gradients, through a DDP communication hook that all-reduces
    as DDP does (a pass all-reduces its buckets, the last one last). Lightning registers its own `ddp_comm_hook`
    on CUDA only, so this one is registered on the wrapped model once DDP has wrapped it."""

    def __init__(self) -> None:
        self.synced_backwards = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            trainer.strategy.model.register_comm_hook(None, self.hook)

    def hook(self, process_group, bucket):
        if bucket.is_last():
            self.synced_backwards += 1
        return allreduce_hook(process_group, bucket)


def main(encoder: str, weighting: str, devices: int, out_dir: str, strategy: str, dev_per_rank: bool) -> None:
    pl.seed_everything(0)
    module = TartanModule(encoder, num_labels=3, aux_objectives=["tapt", "dapt"], weighting=weighting, dropout=0.0)
    counter = SyncCounter()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy if devices > 1 else "auto",
        callbacks=[counter],
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,  # the batches are sharded by hand above
    )
    rank = int(os.environ.get("LOCAL_RANK", 0))
    batches = [shard(batch, rank, devices, dev_per_rank) for batch in make_batches(STEPS, batch_size=4)]
    trainer.fit(module, train_dataloaders=loader(batches))
    state = {name: value.detach().clone() for name, value in module.state_dict().items()}
    torch.save(state, Path(out_dir) / f"rank{trainer.global_rank}.pt")
    stats = {"synced_backwards": counter.synced_backwards, "optimizer_steps": trainer.global_step}
    (Path(out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(stats))


if __name__ == "__main__":
    strategy = sys.argv[5] if len(sys.argv) > 5 else "ddp_find_unused_parameters_true"
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], strategy, len(sys.argv) > 6 and sys.argv[6] == "1")
