"""Hand a continued-pre-training run (TAPT/DAPT) to a later fine-tuning run as a plain HF model folder."""
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from lightning_tartan.module import TartanModule


class ExportEncoder(pl.Callback):
    """At the end of fit, write the encoder and its MLM head to `dirpath` with `TartanModule.save_mlm_model`.

    The folder loads with `AutoModelForMaskedLM`, so it is a valid `model.encoder_name_or_path` for the next
    stage (e.g. `configs/<task>/tapt_finetune.yaml`). It holds the final weights: continued pre-training has
    no dev metric to pick a "best" epoch by.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: TartanModule) -> None:
        if trainer.is_global_zero:
            pl_module.save_mlm_model(self.dirpath)
            rank_zero_info(f"ExportEncoder: wrote the encoder + MLM head to {self.dirpath}")
        trainer.strategy.barrier("export_encoder")  # other ranks may read the folder right after fit
