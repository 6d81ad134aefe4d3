"""Datamodules feeding TartanModule end to end: a short real `Trainer.fit` per task and weighting."""
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from datamodules import (
    ChemProtDataModule,
    CitationIntentDataModule,
    HyperPartisanDataModule,
    SciERCDataModule,
)
from lightning_tartan import TartanModule
from lightning_tartan.checkpoints import ResumableCheckpoint

SMALL = {"max_length": 32, "batch_size": 4, "aux_batch_size": 4, "dev_batch_size": 4, "eval_batch_size": 16}
SMALL["accumulate_grad_batches"] = 2  # two micro-batches per optimizer step


def short_fit(datamodule, weighting: str, encoder: str) -> tuple[TartanModule, pl.Trainer]:
    pl.seed_everything(0)
    module = TartanModule.from_datamodule(datamodule, encoder_name_or_path=encoder, weighting=weighting)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=2,
        val_check_interval=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    return module, trainer


@pytest.mark.parametrize("weighting", ["none", "equal", "meta", "aux_only"])
def test_citation_intent_trains_with_each_weighting(tiny_encoder, data_root, cache_dir, weighting):
    """From Python as from the command, the model's weighting decides whether the data builds the dev samples: here
    the data module is first told the opposite."""
    datamodule = CitationIntentDataModule(
        data_dir=str(data_root / "citation_intent"), tokenizer_name_or_path=tiny_encoder, cache_dir=cache_dir,
        include_meta_dev=weighting != "meta", **SMALL,
    )
    module, trainer = short_fit(datamodule, weighting, tiny_encoder)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 2
    sources = set(datamodule.train_dataloader().iterables)
    assert ({"meta_dev", "meta_dev_grad"} <= sources) == (weighting == "meta")
    assert 0.0 <= float(metrics["val/f1_macro"]) <= 1.0
    active = module.weighting.active
    assert {f"train/loss_{name}" for name in active} <= set(metrics)
    assert all(torch.isfinite(metrics[f"train/loss_{name}"]) for name in active)
    if weighting == "meta":
        assert not torch.equal(module.weighting.logits, torch.zeros(3))


@pytest.mark.parametrize("cls, folder", [(SciERCDataModule, "sciie"), (ChemProtDataModule, "chemprot")])
def test_relation_tasks_train_with_meta(tiny_encoder, data_root, cache_dir, cls, folder):
    datamodule = cls(data_dir=str(data_root / folder), tokenizer_name_or_path=tiny_encoder, cache_dir=cache_dir, **SMALL)
    module, trainer = short_fit(datamodule, "meta", tiny_encoder)
    assert module.monitor_metric == datamodule.monitor_metric
    assert f"val/{module.monitor_metric}" in trainer.callback_metrics
    assert torch.isfinite(module.weighting.logits).all()


def test_hyperpartisan_trains_with_meta(tiny_encoder, tmp_path, cache_dir):
    article = "the senate passed the bill after a long debate about the budget . " * 20
    for split, n in (("train", 12), ("dev", 6), ("test", 6)):
        rows = [{"text": f"{article} {i}", "label": ["false", "true"][i % 2]} for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    datamodule = HyperPartisanDataModule(
        data_dir=str(tmp_path), tokenizer_name_or_path=tiny_encoder, cache_dir=cache_dir, **SMALL
    )
    module, trainer = short_fit(datamodule, "meta", tiny_encoder)
    assert module.objectives == ["end_task", "tapt"]
    assert "val/f1_macro" in trainer.callback_metrics


def test_paths_anywhere_in_the_public_api_keep_checkpoints_loadable(tiny_encoder, data_root, cache_dir, tmp_path):
    """`pathlib.Path`s where strings are expected (the offline encoder helper returns one) are stored as strings:
    the checkpoint loads with `weights_only=True`, as `trainer.test(ckpt_path="best")` does."""
    data = CitationIntentDataModule(
        data_dir=data_root / "citation_intent", tokenizer_name_or_path=Path(tiny_encoder), cache_dir=Path(cache_dir),
        aux_corpora={"tapt": Path("train.txt")}, max_length=32, batch_size=4, aux_batch_size=4, dev_batch_size=4,
        dev_grad_batch_size=4, eval_batch_size=16,
    )
    model = TartanModule(
        Path(tiny_encoder), num_labels=data.num_labels, label_names=tuple(data.label_names),
        aux_objectives=data.aux_names, weighting="meta", tokenizer_name_or_path=Path(tiny_encoder),
    )
    checkpoint = ResumableCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/f1_macro", mode="max")
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_steps=2, val_check_interval=2, limit_val_batches=1, limit_test_batches=1,
        callbacks=[checkpoint], logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    for path in (checkpoint.best_model_path, checkpoint.last_model_path):
        torch.load(path, weights_only=True)
    assert trainer.test(model, datamodule=data, ckpt_path="best", verbose=False)[0]["test/f1_macro"] >= 0
