"""Runs a short TartanModule fit on synthetic batches, 1 or 2 CPU processes (gloo), and saves each rank's state.

Lightning's DDP launcher re-runs this script for every rank, so it is a script rather than a pytest test.
Usage: python tests/ddp_worker.py ENCODER_DIR WEIGHTING DEVICES OUT_DIR [STRATEGY]
"""
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import loader, make_batches, shard  # noqa: E402

from lightning_tartan import TartanModule  # noqa: E402


def main(encoder: str, weighting: str, devices: int, out_dir: str, strategy: str) -> None:
    pl.seed_everything(0)
    module = TartanModule(encoder, num_labels=3, aux_objectives=["tapt", "dapt"], weighting=weighting, dropout=0.0)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy if devices > 1 else "auto",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,  # the batches are sharded by hand above
    )
    rank = int(__import__("os").environ.get("LOCAL_RANK", 0))
    batches = [shard(batch, rank, devices) for batch in make_batches(3, batch_size=4)]
    trainer.fit(module, train_dataloaders=loader(batches))
    state = {name: value.detach().clone() for name, value in module.state_dict().items()}
    torch.save(state, Path(out_dir) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    strategy = sys.argv[5] if len(sys.argv) > 5 else "ddp_find_unused_parameters_true"
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], strategy)
