"""TaskWeightPlot: what it records from a real Trainer run, what it draws, and when it writes nothing; the progress
bar of a resumed run."""
import math
from typing import List, Optional

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_tartan.callbacks import ResumableProgressBar, TaskWeightPlot
from lightning_tartan.checkpoints import ResumableCheckpoint

OBJECTIVES = ["end_task", "tapt", "dapt"]


def weight(i: int, step: int) -> float:
    """The weight the stand-in logs for objective ``i`` at the optimizer step that finishes as ``step``."""
    raw = [math.exp(math.sin(0.7 * step + i)) for i in range(len(OBJECTIVES))]
    return raw[i] / sum(raw)


def cosine(i: int, step: int) -> float:
    return math.cos(0.5 * step + 2 * i)


def loss(i: int, step: int) -> float:
    return 2.0 / (step + i + 1)


def dev_metric(name: str, step: int) -> float:
    return {"f1_macro": 0.2 + 0.01 * step, "accuracy": 0.9 - 0.02 * step}[name]


def f32(x: float) -> float:
    """``self.log`` stores floats as float32 tensors."""
    return torch.tensor(x, dtype=torch.float32).item()


class StandIn(pl.LightningModule):
    """Logs TartanModule's keys with step-dependent values; ``cos_from`` is the first step logging cosines."""

    def __init__(self, automatic: bool = True, monitor_metric: str = "f1_macro", cos_from: Optional[int] = 1):
        super().__init__()
        self.automatic_optimization = automatic
        self.objectives = list(OBJECTIVES)
        self.monitor_metric = monitor_metric
        self.cos_from = cos_from
        self.layer = torch.nn.Linear(4, 1)
        self.val_steps: List[int] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        step = self.global_step + 1  # the step count once this batch's optimizer step is done
        for i, objective in enumerate(self.objectives):
            self.log(f"train/loss_{objective}", loss(i, step))
            self.log(f"train/weight_{objective}", weight(i, step))
            if self.cos_from is not None and step >= self.cos_from:
                self.log(f"train/cos_{objective}", cosine(i, step))
        total = self.layer(x).pow(2).mean()
        if self.automatic_optimization:
            return total
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(total)
        optimizer.step()

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.log("val/loss", self.layer(x).pow(2).mean())

    def on_validation_epoch_end(self):
        for name in ("f1_macro", "accuracy"):
            self.log(f"val/{name}", dev_metric(name, self.global_step))
        if not self.trainer.sanity_checking:
            self.val_steps.append(self.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=2)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=2)


def fit(
    module: StandIn,
    callback: TaskWeightPlot,
    root,
    max_steps: int = 12,
    ckpt_path: Optional[str] = None,
    **trainer_kwargs,
) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=max_steps,
        val_check_interval=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=str(root),
        callbacks=[callback],
        **trainer_kwargs,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def axes_by_label(fig):
    return {ax.get_label(): ax for ax in fig.axes}


def data_lines(ax):
    """Lines with a legend label, i.e. not the zero reference line."""
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


@pytest.mark.parametrize(
    "automatic, monitor_metric", [(True, "f1_macro"), (False, "accuracy")], ids=["automatic", "manual"]
)
def test_records_and_plots_what_the_module_logged(tmp_path, automatic, monitor_metric):
    module = StandIn(automatic=automatic, monitor_metric=monitor_metric)
    callback = TaskWeightPlot(dirpath=str(tmp_path / "plots"))
    fit(module, callback, tmp_path)

    png = tmp_path / "plots" / "task_weights.png"
    assert png.is_file() and png.stat().st_size > 0
    assert callback.last_saved_path == str(png)

    steps = list(range(1, 13))
    history = callback.history
    assert history["step"] == steps
    monitor = f"val/{monitor_metric}"
    assert len(module.val_steps) >= 2
    assert history["val_step"] == module.val_steps
    assert history[monitor] == pytest.approx([f32(dev_metric(monitor_metric, s)) for s in module.val_steps])

    fig = callback.plot()
    axes = axes_by_label(fig)
    assert set(axes) == {"weights", "dev_metric", "cosines", "losses"}
    for label, value_of in (("weights", weight), ("cosines", cosine), ("losses", loss)):
        lines = data_lines(axes[label])
        assert [line.get_label() for line in lines] == OBJECTIVES
        for i, line in enumerate(lines):
            assert list(line.get_xdata()) == steps
            assert list(line.get_ydata()) == pytest.approx([f32(value_of(i, s)) for s in steps])

    (dev_line,) = data_lines(axes["dev_metric"])
    assert list(dev_line.get_xdata()) == module.val_steps
    assert list(dev_line.get_ydata()) == pytest.approx([f32(dev_metric(monitor_metric, s)) for s in module.val_steps])
    assert monitor in axes["dev_metric"].get_ylabel()
    legend = [text.get_text() for text in axes["weights"].get_legend().get_texts()]
    assert legend == OBJECTIVES + [f"dev {monitor}"]


def test_records_once_per_optimizer_step_under_gradient_accumulation(tmp_path):
    callback = TaskWeightPlot(dirpath=str(tmp_path))
    fit(StandIn(), callback, tmp_path, max_steps=6, accumulate_grad_batches=2)
    assert callback.history["step"] == list(range(1, 7))
    assert len(callback.history["train/weight_tapt"]) == 6
    # A second, fresh fit starts a new history instead of appending to (or mis-stepping after) the first.
    fit(StandIn(), callback, tmp_path, max_steps=4, accumulate_grad_batches=2)
    assert callback.history["step"] == list(range(1, 5))
    assert callback.history["train/weight_tapt"] == pytest.approx([f32(weight(1, s)) for s in range(1, 5)])


def test_cosines_absent_until_logged(tmp_path):
    callback = TaskWeightPlot(dirpath=str(tmp_path))
    fit(StandIn(cos_from=5), callback, tmp_path, max_steps=8)
    cos = callback.history["train/cos_dapt"]
    assert len(cos) == len(callback.history["step"]) == 8
    assert all(math.isnan(v) for v in cos[:4])
    assert cos[4:] == pytest.approx([f32(cosine(2, s)) for s in range(5, 9)])


def test_no_cosine_panel_without_meta_weighting(tmp_path):
    callback = TaskWeightPlot(dirpath=str(tmp_path))
    fit(StandIn(cos_from=None), callback, tmp_path, max_steps=4)
    assert not any(key.startswith("train/cos_") for key in callback.history)
    assert set(axes_by_label(callback.plot())) == {"weights", "dev_metric", "losses"}


def test_default_dirpath_without_logger_is_default_root_dir(tmp_path):
    fit(StandIn(), TaskWeightPlot(filename="weights.png"), tmp_path, max_steps=4)
    assert (tmp_path / "weights.png").stat().st_size > 0



class CrashesAtStep(StandIn):
    """A run that dies mid-fit (out of memory, a lost node), after some dev evaluations."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.crash_step = step

    def training_step(self, batch, batch_idx):
        if self.global_step + 1 == self.crash_step:
            raise RuntimeError("node lost")
        return super().training_step(batch, batch_idx)


def test_the_picture_is_written_at_each_dev_evaluation_so_a_crashed_run_keeps_it(tmp_path):
    callback = TaskWeightPlot(dirpath=str(tmp_path))
    with pytest.raises(RuntimeError, match="node lost"):
        fit(CrashesAtStep(7), callback, tmp_path, max_steps=12)  # dev evaluations after steps 4 and 8
    assert callback.history["val_step"] == [4] and callback.last_saved_path == str(tmp_path / "task_weights.png")
    assert (tmp_path / "task_weights.png").stat().st_size > 0

def test_disabled_writes_and_records_nothing(tmp_path):
    callback = TaskWeightPlot(dirpath=str(tmp_path / "plots"), enabled=False)
    fit(StandIn(), callback, tmp_path, max_steps=4)
    assert not (tmp_path / "plots").exists()
    assert list(tmp_path.rglob("*.png")) == []
    assert callback.history["step"] == []


def test_non_zero_rank_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda self: False))
    callback = TaskWeightPlot(dirpath=str(tmp_path / "plots"))
    fit(StandIn(), callback, tmp_path, max_steps=4)
    assert callback.history["step"] == [1, 2, 3, 4]  # it still records, it just does not write
    assert list(tmp_path.rglob("*.png")) == []


def test_history_survives_checkpoint_resume(tmp_path):
    # Gradient accumulation makes the first resumed batch end without a step; it must not be recorded again.
    first = TaskWeightPlot(dirpath=str(tmp_path / "first"))
    trainer = fit(StandIn(), first, tmp_path, max_steps=6, accumulate_grad_batches=2)
    ckpt = str(tmp_path / "mid.ckpt")
    trainer.save_checkpoint(ckpt)

    resumed = TaskWeightPlot(dirpath=str(tmp_path / "resumed"))
    module = StandIn()
    fit(module, resumed, tmp_path, max_steps=12, ckpt_path=ckpt, accumulate_grad_batches=2)

    assert resumed.history["step"] == list(range(1, 13))
    assert resumed.history["train/weight_end_task"] == pytest.approx([f32(weight(0, s)) for s in range(1, 13)])
    assert resumed.history["val_step"] == first.history["val_step"] + module.val_steps
    assert len(resumed.history["val_step"]) >= 2
    assert (tmp_path / "resumed" / "task_weights.png").stat().st_size > 0


def test_validate_after_fit_does_not_add_a_dev_point(tmp_path):
    callback = TaskWeightPlot(dirpath=str(tmp_path))
    module = StandIn()
    trainer = fit(module, callback, tmp_path, max_steps=8)
    recorded = list(callback.history["val_step"])
    assert recorded == module.val_steps and recorded
    trainer.validate(module, verbose=False)
    assert callback.history["val_step"] == recorded


def test_module_without_objectives_is_rejected_before_training(tmp_path):
    module = StandIn()
    del module.objectives
    with pytest.raises(AttributeError, match="objectives"):
        fit(module, TaskWeightPlot(dirpath=str(tmp_path)), tmp_path, max_steps=2)


def test_state_dict_round_trip_is_a_copy():
    callback = TaskWeightPlot()
    callback.history = {"step": [1, 2], "val_step": [2], "train/weight_tapt": [0.5, 0.6], "val/f1_macro": [0.3]}
    callback.monitor = "val/f1_macro"
    restored = TaskWeightPlot()
    state = callback.state_dict()
    restored.load_state_dict(state)
    callback.history["step"].append(3)
    assert restored.history == {"step": [1, 2], "val_step": [2], "train/weight_tapt": [0.5, 0.6], "val/f1_macro": [0.3]}
    assert restored.monitor == "val/f1_macro"
    assert [line.get_label() for line in data_lines(axes_by_label(restored.plot())["weights"])] == ["tapt"]
    restored.history["step"].append(4)
    assert state["history"]["step"] == [1, 2]


def test_a_run_resumed_inside_an_epoch_shows_its_epoch_and_length(tmp_path):
    """32 batches an epoch; stopped after 6 and resumed to 12, the bar reads `Epoch 0: 12/12`, not `Training: 12/?`."""
    def trainer(max_steps: int) -> pl.Trainer:
        return pl.Trainer(
            max_steps=max_steps, limit_val_batches=0, logger=False, enable_model_summary=False, accelerator="cpu",
            callbacks=[ResumableProgressBar(), ResumableCheckpoint(dirpath=tmp_path)],  # last.ckpt: at step 6
        )

    trainer(6).fit(StandIn())
    resumed = trainer(12)
    resumed.fit(StandIn(), ckpt_path=tmp_path / "last.ckpt")
    bar = resumed.progress_bar_callback.train_progress_bar
    assert (bar.n, bar.total, bar.desc.split(":")[0]) == (12, 12, "Epoch 0")  # as a run of 12 from the start
