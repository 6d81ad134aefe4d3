"""Core behaviour of TartanModule: gradients, weights, updates, precision, DDP, resume, export."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from synthetic import loader, make_batches
from transformers import AutoModelForSequenceClassification

from lightning_tartan import TartanModule
from lightning_tartan.dev_head import DevHead

AUX = ["tapt", "dapt"]


def make_module(encoder: str, **options) -> TartanModule:
    options = {"num_labels": 3, "aux_objectives": AUX, "dropout": 0.0, **options}
    return TartanModule(encoder, **options)


def fit(module: TartanModule, batches: list[dict], ckpt_path=None, **trainer_options) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        max_steps=len(batches) // module.hparams.accumulate_grad_batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer = pl.Trainer(**{**options, **trainer_options})
    trainer.fit(module, train_dataloaders=loader(batches), ckpt_path=ckpt_path)
    return trainer


def flat_grad(loss: torch.Tensor, params: list) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def params_of(module: TartanModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_meta_logit_gradient_is_minus_cosine_with_dev_gradient(tiny_encoder, accumulate):
    batches = make_batches(accumulate)
    module = make_module(tiny_encoder, weighting="meta", accumulate_grad_batches=accumulate, meta_lr=0.5)
    reference = copy.deepcopy(module)
    params = list(reference.encoder.parameters())

    dev_grad = torch.cat([g.reshape(-1) for g in reference.dev_gradient(batches[0]["meta_dev"])])
    expected = torch.zeros(3)
    for batch in batches:
        for i, name in enumerate(reference.objectives):
            task_grad = flat_grad(reference.objective_loss(name, batch), params)
            expected[i] += F.cosine_similarity(task_grad, dev_grad, dim=0) / accumulate

    fit(module, batches)
    # one SGD step on the logits from zero with gradient -cos: logits = meta_lr * cos
    torch.testing.assert_close(module.weighting.logits, 0.5 * expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(expected, torch.zeros(3))


def test_equal_weighting_matches_backprop_of_weighted_sum(tiny_encoder):
    class WeightedSum(TartanModule):
        """Reference: one backward of the mean of the three losses, then the same optimizer step."""

        def training_step(self, batch, batch_idx):
            optimizer, scheduler = self.optimizers(), self.lr_schedulers()
            losses = [self.objective_loss(name, batch) for name in self.objectives]
            self.manual_backward(sum(losses) / len(losses))
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()

    batches = make_batches(3)
    pl.seed_everything(0)
    ours = make_module(tiny_encoder, weighting="equal", warmup_ratio=0.0, max_grad_norm=0.05)
    reference = WeightedSum(tiny_encoder, num_labels=3, aux_objectives=AUX, dropout=0.0, warmup_ratio=0.0, max_grad_norm=0.05)
    reference.load_state_dict(ours.state_dict())
    before = params_of(ours)
    fit(ours, batches)
    fit(reference, batches)
    after_ours, after_reference = params_of(ours), params_of(reference)
    for name in before:
        torch.testing.assert_close(after_ours[name], after_reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(before[name], after_ours[name]) for name in before)


def test_none_weighting_trains_end_task_only(tiny_encoder):
    module = make_module(tiny_encoder, weighting="none")
    batches = [{"end_task": batch["end_task"]} for batch in make_batches(2)]
    mlm_before = params_of(module)["mlm_head.predictions.transform.dense.weight"]
    trainer = fit(module, batches)
    assert "train/loss_tapt" not in trainer.callback_metrics
    torch.testing.assert_close(params_of(module)["mlm_head.predictions.transform.dense.weight"], mlm_before)


def test_sparse_mlm_equals_dense(tiny_encoder):
    batch = make_batches(1)[0]["tapt"]
    sparse = make_module(tiny_encoder, sparse_mlm=True)
    dense = make_module(tiny_encoder, sparse_mlm=False)
    dense.load_state_dict(sparse.state_dict())
    params = [list(m.encoder.parameters()) + list(m.mlm_head.parameters()) for m in (sparse, dense)]
    loss_sparse, loss_dense = sparse.mlm_loss(batch), dense.mlm_loss(batch)
    torch.testing.assert_close(loss_sparse, loss_dense)
    torch.testing.assert_close(flat_grad(loss_sparse, params[0]), flat_grad(loss_dense, params[1]))


def test_dev_head_on_cached_features_matches_fitting_through_encoder(tiny_encoder):
    batch = make_batches(1)[0]["meta_dev"]
    cached = make_module(tiny_encoder, weighting="meta", dev_head_on_cached_features=True)
    through = make_module(tiny_encoder, weighting="meta", dev_head_on_cached_features=False)
    through.load_state_dict(cached.state_dict())
    grad_cached, grad_through = cached.dev_gradient(batch), through.dev_gradient(batch)
    torch.testing.assert_close(grad_cached, grad_through, rtol=1e-4, atol=1e-7)
    assert sum(g.abs().sum() for g in grad_cached) > 0


def test_dev_head_fit_stops_early_when_loss_settles():
    features = torch.randn(16, 8)
    labels = torch.randint(0, 2, (16,))
    calls = []

    def count() -> torch.Tensor:
        calls.append(1)
        return features

    DevHead(8, 2, lr=1e-9, max_steps=10, tolerance=1e-3).fit(count, labels, seed=0)
    assert len(calls) == 2  # the second loss equals the first: stop
    calls.clear()
    DevHead(8, 2, lr=1e-1, max_steps=10, tolerance=0.0).fit(count, labels, seed=0)
    assert len(calls) == 10


def test_per_task_gradient_copies_give_same_cosines(tiny_encoder):
    batches = make_batches(2)
    ours = make_module(tiny_encoder, weighting="meta", meta_lr=0.5)
    paper = make_module(tiny_encoder, weighting="meta", meta_lr=0.5, per_task_grad_copies=True, sparse_mlm=False)
    paper.load_state_dict(ours.state_dict())
    fit(ours, batches)
    fit(paper, batches)
    torch.testing.assert_close(ours.weighting.logits, paper.weighting.logits, rtol=1e-4, atol=1e-7)


def test_meta_weights_are_softmax_of_logits_and_logged(tiny_encoder):
    module = make_module(tiny_encoder, weighting="meta", meta_lr=1.0)
    trainer = fit(module, make_batches(3))
    weights = torch.softmax(module.weighting.logits, 0)
    assert torch.isclose(weights.sum(), torch.tensor(1.0))
    assert not torch.allclose(weights, torch.full((3,), 1 / 3))
    for name in module.objectives:
        assert f"train/cos_{name}" in trainer.callback_metrics
        assert f"train/weight_{name}" in trainer.callback_metrics


def test_bf16_mixed_trains_and_weights_stay_finite(tiny_encoder):
    module = make_module(tiny_encoder, weighting="meta", dropout=0.1)
    before = params_of(module)
    trainer = fit(module, make_batches(3), precision="bf16-mixed")
    assert trainer.global_step == 3
    assert torch.isfinite(module.weighting.logits).all()
    assert not torch.equal(module.weighting.logits, torch.zeros(3))
    after = params_of(module)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_overflowing_gradient_skips_meta_update(tiny_encoder):
    class Overflow(pl.Callback):
        """Plants an inf in an encoder gradient during the second optimizer step, as an fp16 overflow would."""

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 1:
                param = next(module.encoder.parameters())
                param.register_hook(lambda grad: torch.full_like(grad, float("inf")))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.logits_after = getattr(self, "logits_after", [])
            self.logits_after.append(module.weighting.logits.clone())
            self.skipped = getattr(self, "skipped", []) + [float(trainer.callback_metrics["train/meta_skipped"])]

    module = make_module(tiny_encoder, weighting="meta", meta_lr=0.5)
    overflow = Overflow()
    fit(module, make_batches(2), callbacks=[overflow])
    first, second = overflow.logits_after
    assert not torch.equal(first, torch.zeros(3))
    torch.testing.assert_close(second, first)
    assert overflow.skipped == [0.0, 1.0]


def test_resume_from_mid_run_checkpoint_reproduces_uninterrupted_run(tiny_encoder, tmp_path):
    batches = make_batches(4)
    options = dict(max_steps=-1, max_epochs=2, num_sanity_val_steps=0)

    pl.seed_everything(0)
    uninterrupted = make_module(tiny_encoder, weighting="meta", dropout=0.1, accumulate_grad_batches=2)
    every_epoch = pl.callbacks.ModelCheckpoint(tmp_path, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    fit(uninterrupted, batches, enable_checkpointing=True, callbacks=[every_epoch], **options)
    mid_run = tmp_path / "epoch=0-step=2.ckpt"
    assert mid_run.exists(), sorted(tmp_path.iterdir())

    pl.seed_everything(123)  # a different seed: the rest of the run must come from the checkpoint
    resumed = make_module(tiny_encoder, weighting="meta", dropout=0.1, accumulate_grad_batches=2)
    fit(resumed, batches, ckpt_path=mid_run, **options)
    assert not torch.equal(uninterrupted.weighting.logits, torch.zeros(3))
    for name, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_save_end_task_model_loads_in_transformers_with_same_logits(tiny_encoder, tmp_path):
    module = make_module(tiny_encoder, label_names=["a", "b", "c"])
    fit(module, make_batches(2))
    module.eval()
    module.save_end_task_model(tmp_path / "export")
    hf_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    batch = make_batches(1, seed=7)[0]["end_task"]
    with torch.no_grad():
        expected = module(batch["input_ids"], batch["attention_mask"])
        actual = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(actual, expected)
    assert hf_model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert (tmp_path / "export" / "tokenizer_config.json").exists()


@pytest.mark.parametrize(
    "options, option_name",
    [
        ({"weighting": "mta"}, "weighting"),
        ({"encoder_lr": 0.0}, "encoder_lr"),
        ({"head_lr": -1e-3}, "head_lr"),
        ({"meta_lr": 0.0}, "meta_lr"),
        ({"num_labels": 1}, "num_labels"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches"),
        ({"monitor_metric": "f1"}, "monitor_metric"),
        ({"aux_objectives": ["end_task"]}, "aux_objectives"),
        ({"weighting": "aux_only", "aux_objectives": []}, "aux_objectives"),
        ({"label_names": ["a"]}, "label_names"),
    ],
)
def test_bad_options_name_the_option(tiny_encoder, options, option_name):
    with pytest.raises(ValueError, match=option_name):
        make_module(tiny_encoder, **options)


def test_batch_without_end_task_names_it(tiny_encoder):
    module = make_module(tiny_encoder, weighting="equal")
    batches = [{"tapt": b["tapt"], "dapt": b["dapt"]} for b in make_batches(1)]
    with pytest.raises(KeyError, match="end_task"):
        fit(module, batches)


@pytest.mark.parametrize("weighting", ["equal", "meta"])
def test_ddp_two_ranks_match_one_process(tiny_encoder, tmp_path, weighting):
    worker = Path(__file__).with_name("ddp_worker.py")
    outputs = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}"
        out.mkdir()
        result = subprocess.run(
            [sys.executable, str(worker), tiny_encoder, weighting, str(devices), str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[devices] = [torch.load(out / f"rank{r}.pt") for r in range(devices)]
    single, (rank0, rank1) = outputs[1][0], outputs[2]
    for name in single:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
    if weighting == "meta":
        assert not torch.equal(rank0["weighting.logits"], torch.zeros(3))
