"""Predictions people can use: one JSON line per input, with its predicted label and the class probabilities.

`tartan predict` writes them through this callback to `predictions.jsonl` in the run's folder; in a Lightning
project of your own, add it to the trainer's callbacks and call `trainer.predict(...)`.
"""
import json
from pathlib import Path
from typing import Any, Optional, TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    """Writes what `TartanModule.predict_step` returns as JSON lines, as each batch is predicted.

    Each line holds ``line`` (the input's line in its file, when the batch has one), ``label`` (the predicted
    class's name), ``gold`` (the input's own label, when its batch has labels: `EndTaskDataModule` gives them when
    every input of the file has one) and ``probabilities`` (class name -> probability), in input order. Class names
    are the model's ``label_names`` (class ids, as strings, when it has none). Names are written as they are, not
    as ``\\u`` escapes.

    Args:
        output_file: where to write; ``None`` writes ``predictions.jsonl`` in the trainer's log directory (the run's
            ``lightning_logs/version_<n>/`` folder). Under several processes each writes its own file, with
            ``.rank<n>`` before the suffix.
    """

    def __init__(self, output_file: Optional[str] = None) -> None:
        super().__init__(write_interval="batch")
        self.output_file = output_file
        #: the file of the latest `trainer.predict`
        self.path: Optional[Path] = None
        self.count = 0
        self._stream: Optional[TextIO] = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        path = Path(self.output_file).expanduser() if self.output_file else folder / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.count = path.resolve(), 0
        self._stream = path.open("w", encoding="utf-8")

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Optional[list[int]],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        probabilities = prediction["probabilities"].tolist()
        names = list(getattr(pl_module.hparams, "label_names", None) or map(str, range(len(probabilities[0]))))
        lines = prediction["line"].tolist() if "line" in prediction else None
        gold = prediction["labels"].tolist() if "labels" in prediction else None
        for row, scores in enumerate(probabilities):
            record: dict[str, Any] = {} if lines is None else {"line": lines[row]}
            record["label"] = names[max(range(len(scores)), key=scores.__getitem__)]
            if gold is not None:
                record["gold"] = names[gold[row]]
            record["probabilities"] = {name: round(score, 6) for name, score in zip(names, scores)}
            self._stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += len(probabilities)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        rank_zero_info(f"Wrote {self.count} predictions to {self.path}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
