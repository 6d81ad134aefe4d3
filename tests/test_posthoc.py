"""PostHocSelection: the fine-tuned model is kept only when it beats the starting model on dev, and says so."""
import json
import logging

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_tartan import PostHocSelection


class ScriptedDevScore(pl.LightningModule):
    """One weight, trained toward 1; the n-th validation logs `scores[n]` as its dev macro-F1."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.scores = scores
        self.validations = 0

    def training_step(self, batch, batch_idx):
        return ((self.weight - 1) ** 2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/f1_macro", self.scores[self.validations])

    def on_validation_epoch_end(self):
        self.validations += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run(
    tmp_path, scores: list[float], validate_first: bool = True, **trainer_options
) -> tuple[PostHocSelection, pl.Trainer]:
    selection = PostHocSelection()
    trainer = pl.Trainer(
        **trainer_options,
        default_root_dir=tmp_path,
        logger=False,
        max_epochs=len(scores) - 1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[selection, ModelCheckpoint(tmp_path / "checkpoints", monitor="val/f1_macro", mode="max")],
    )
    model = ScriptedDevScore(scores)
    loader = DataLoader(torch.zeros(2, 1), batch_size=1)
    if validate_first:
        trainer.validate(model, dataloaders=loader, verbose=False)
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    return selection, trainer


def test_keeps_the_fine_tuned_model_when_it_is_better_on_dev(tmp_path):
    selection, trainer = run(tmp_path, [0.5, 0.4, 0.6])
    assert selection.selection["selected"] == "fine_tuned"
    assert selection.selected_checkpoint == trainer.checkpoint_callback.best_model_path
    assert (selection.selection["start_score"], selection.selection["fine_tuned_score"]) == pytest.approx((0.5, 0.6))
    assert json.loads((tmp_path / "posthoc_selection.json").read_text()) == selection.selection


@pytest.mark.parametrize("fine_tuned", [[0.5, 0.5], [0.3, 0.4]], ids=["tie", "worse"])
def test_keeps_the_starting_model_unless_fine_tuning_is_strictly_better(tmp_path, fine_tuned, caplog):
    caplog.set_level(logging.INFO)
    selection, _ = run(tmp_path, [0.5, *fine_tuned])
    assert selection.selection["selected"] == "start"
    start = torch.load(selection.selected_checkpoint, weights_only=True)["state_dict"]
    assert torch.equal(start["weight"], torch.zeros(1))  # the weights as they were before any fine-tuning
    assert "kept the starting (multitask) model (val/f1_macro" in caplog.text


def test_fine_tuning_without_a_dev_evaluation_keeps_the_starting_model_saying_why(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    selection, _ = run(tmp_path, [0.5, 0.6, 0.7], check_val_every_n_epoch=10)  # no evaluation in 2 epochs
    assert selection.selection["selected"] == "start" and selection.selection["fine_tuned_score"] is None
    assert "(fine-tuning ran no dev evaluation to compare with val/f1_macro 0.5000)" in caplog.text


def test_fit_without_scoring_the_starting_model_says_what_to_do(tmp_path):
    with pytest.raises(RuntimeError, match=r"trainer.validate\(model"):
        run(tmp_path, [0.5, 0.6], validate_first=False)
