"""Core behaviour of TartanModule: gradients, weights, updates, precision, DDP, resume, export."""
import copy
import csv
import inspect
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import transformers
from synthetic import group, loader, make_batches, with_padding
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification

from lightning_tartan import BatchFormatError, MetaWeighting, TartanModule, dev_head
from lightning_tartan.dev_head import DevHead
from lightning_tartan.module import lr_factors, micro_batches
from lightning_tartan.task_gradients import TaskGradientCosines

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
    accumulate = module.hparams.accumulate_grad_batches
    trainer.fit(module, train_dataloaders=loader(batches, accumulate), ckpt_path=ckpt_path)
    return trainer


def fp16_with_loss_scaler() -> MixedPrecision:
    """`16-mixed` as Lightning runs it on a GPU, with a loss scaler (on the CPU, Lightning scales no fp16 loss)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def flat_grad(loss: torch.Tensor, params: list) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def params_of(module: TartanModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("dev_gradient", ["held_out", "in_sample"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_meta_logit_gradient_is_minus_cosine_with_dev_gradient(tiny_encoder, accumulate, dev_gradient):
    batches = make_batches(accumulate)
    module = make_module(
        tiny_encoder, weighting="meta", accumulate_grad_batches=accumulate, meta_lr=0.5, dev_gradient=dev_gradient
    )
    reference = copy.deepcopy(module)
    params = list(reference.encoder.parameters())

    expected = torch.zeros(3)
    for batch in batches:
        # one dev head per optimizer step; held out, each micro-batch's fresh sample gives its own dev gradient,
        # in sample, the first micro-batch's gradient serves the whole step (the later calls return None)
        dev_grads = reference.dev_gradient(batch, new_step=batch is batches[0])
        if dev_grads is not None:
            dev_grad = torch.cat([g.reshape(-1) for g in dev_grads])
        assert (dev_grads is None) == (dev_gradient == "in_sample" and batch is not batches[0])
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


def test_batches_straight_from_transformers_collators_are_prepared_on_the_host(tiny_encoder):
    """`DataCollatorWithPadding` and `DataCollatorForLanguageModeling` return `BatchEncoding`s, mappings but not
    dicts: the masked positions and padding marks are still found before the batch moves (else each would be a wait
    for the GPU mid-step, and packing would silently not happen)."""
    from transformers import BatchEncoding

    batch = {name: BatchEncoding(dict(source)) for name, source in make_batches(1)[0].items()}
    prepared = make_module(tiny_encoder, weighting="equal").on_before_batch_transfer(batch, 0)
    assert all("masked_positions" in prepared[name] for name in AUX)
    assert "masked_positions" not in prepared["end_task"]


@pytest.mark.parametrize("sparse_mlm", [True, False])
def test_a_micro_batch_with_nothing_masked_has_a_zero_mlm_loss(tiny_encoder, sparse_mlm):
    """A short document can draw no masked token: its loss is 0 with no gradient, not NaN in the logs."""
    batch = make_batches(1)[0]["tapt"]
    batch["labels"].fill_(-100)
    module = make_module(tiny_encoder, sparse_mlm=sparse_mlm)
    loss = module.mlm_loss(module.on_before_batch_transfer(batch, 0))
    assert loss.item() == 0.0
    assert all(g is None or not g.any() for g in torch.autograd.grad(loss, list(module.mlm_head.parameters()),
                                                                        allow_unused=True))


def test_dev_head_on_cached_features_matches_fitting_through_encoder(tiny_encoder):
    batch = make_batches(1)[0]
    cached = make_module(tiny_encoder, weighting="meta", dev_head_on_cached_features=True)
    through = make_module(tiny_encoder, weighting="meta", dev_head_on_cached_features=False)
    through.load_state_dict(cached.state_dict())
    grad_cached, grad_through = cached.dev_gradient(batch), through.dev_gradient(batch)
    torch.testing.assert_close(grad_cached, grad_through, rtol=1e-4, atol=1e-7)
    assert sum(g.abs().sum() for g in grad_cached) > 0


def cls_features(encoder: torch.nn.Module, sample: dict) -> torch.Tensor:
    return encoder(input_ids=sample["input_ids"], attention_mask=sample["attention_mask"]).last_hidden_state[:, 0]


def test_held_out_dev_gradient_fits_head_on_meta_dev_and_differentiates_on_fresh_sample(tiny_encoder, monkeypatch):
    """The paper's estimator, computed independently: a head fitted on `meta_dev` features (encoder in eval mode,
    the run's seed at step 0), its loss on `meta_dev_grad` differentiated through the encoder."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    batch = make_batches(1)[0]
    module = make_module(tiny_encoder, weighting="meta", dropout=0.1)
    encoder = copy.deepcopy(module.encoder).eval()
    head = DevHead(32, 3, lr=1e-3, weight_decay=0.1, max_steps=10, tolerance=1e-3)
    with torch.no_grad():
        fit_features = cls_features(encoder, batch["meta_dev"])
    head.fit(lambda: fit_features, batch["meta_dev"]["labels"], seed=0)
    sample = batch["meta_dev_grad"]
    loss = F.cross_entropy(head.head(cls_features(encoder, sample)), sample["labels"])
    expected = flat_grad(loss, list(encoder.parameters()))

    actual = torch.cat([g.reshape(-1) for g in module.dev_gradient(batch)])
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-7)
    assert module.encoder.training  # back in train mode for the objectives


def test_in_sample_and_held_out_dev_gradients_differ_only_in_the_sample(tiny_encoder):
    """`in_sample` differentiates the dev head's loss on the sample it was fitted to. Given that same sample as
    its fresh one, `held_out` agrees exactly; given a fresh sample, it differs. The in-sample loss is the lower
    one: the head has fitted those examples, which is the bias the held-out estimate avoids."""
    batch = make_batches(1)[0]
    options = dict(weighting="meta", dev_head_lr=0.05, dev_head_steps=50, dev_head_tolerance=0.0)
    held_out = make_module(tiny_encoder, dev_gradient="held_out", **options)
    in_sample = make_module(tiny_encoder, dev_gradient="in_sample", **options)
    in_sample.load_state_dict(held_out.state_dict())

    g_in = in_sample.dev_gradient(batch)
    g_in_again = in_sample.dev_gradient({**batch, "meta_dev_grad": make_batches(1, seed=5)[0]["meta_dev_grad"]})
    g_same = held_out.dev_gradient({**batch, "meta_dev_grad": batch["meta_dev"]})
    g_fresh = held_out.dev_gradient(batch)
    for a, b, c in zip(g_in, g_in_again, g_same):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-8)
    assert not all(torch.allclose(a, b) for a, b in zip(g_in, g_fresh))
    assert in_sample.dev_gradient(batch, new_step=False) is None  # in-sample: one dev gradient per optimizer step

    head = held_out.weighting.dev_head.head
    with torch.no_grad():
        losses = {
            name: F.cross_entropy(head(cls_features(held_out.encoder.eval(), batch[name])), batch[name]["labels"])
            for name in ("meta_dev", "meta_dev_grad")
        }
    assert losses["meta_dev"] < losses["meta_dev_grad"] - 0.1, losses


def test_dev_gradient_without_its_sample_names_it(tiny_encoder):
    batch = make_batches(1)[0]
    del batch["meta_dev_grad"]
    with pytest.raises(KeyError, match="meta_dev_grad.*in_sample"):
        make_module(tiny_encoder, weighting="meta").dev_gradient(batch)


def test_dev_head_fit_stops_early_when_loss_settles():
    features = torch.randn(16, 8)
    labels = torch.randint(0, 2, (16,))
    calls = []

    def count() -> torch.Tensor:
        calls.append(1)
        return features

    DevHead(8, 2, lr=1e-9, max_steps=10, tolerance=1e-3).fit(count, labels, seed=0)
    assert len(calls) == 2  # re-encoding at every step (the paper's code): the second loss equals the first, stop
    calls.clear()
    DevHead(8, 2, lr=1e-1, max_steps=10, tolerance=0.0).fit(count, labels, seed=0)
    assert len(calls) == 10


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "single-tensor-adamw"])
@pytest.mark.parametrize("tolerance, fitting_steps", [(0.0, 10), (0.05, 7), (1.0, 2)])
def test_dev_head_on_cached_features_stops_on_the_device_at_the_same_head(tolerance, fitting_steps, fused, monkeypatch):
    """On an accelerator, cached features run every fitting step, at a zero learning rate once the loss settles,
    reading nothing on the host; the head is the one the host-side early stop leaves, whether the loss settles at
    once, mid-way or never. Also with the single-tensor AdamW of devices without a fused one."""
    if not fused:
        monkeypatch.setattr(dev_head, "FUSED_ADAMW_DEVICES", ())
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(32, 8, generator=generator)
    labels = torch.randint(0, 3, (32,), generator=generator)
    steps = []

    def count() -> torch.Tensor:
        steps.append(1)
        return features

    on_host = DevHead(8, 3, lr=0.5, max_steps=10, tolerance=tolerance)
    on_host.fit(count, labels, seed=1)
    on_device = DevHead(8, 3, lr=0.5, max_steps=10, tolerance=tolerance, stop_on_device=True)  # as on a GPU
    with HostReads() as reads:
        on_device.fit(features, labels, seed=1)
    assert reads.calls == []
    assert len(steps) == fitting_steps
    for a, b in zip(on_host.head.parameters(), on_device.head.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class HostReads(TorchFunctionMode):
    """Records every read of a tensor's value on the host (`.item()`, `bool()`, `.tolist()`, boolean indexing...):
    on a GPU each one makes the host wait for the device to finish its queued work. One caller is exempt:
    `torch.optim` reads the optimizers' step counters, which live on the host also on a GPU (`capturable=False`)."""

    READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "nonzero", "masked_select"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        boolean_index = name == "__getitem__" and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool
            for index in (args[1] if isinstance(args[1], tuple) else (args[1],))
        )
        caller = Path(inspect.currentframe().f_back.f_code.co_filename)
        exempt = caller.parent.name == "optim"
        if (name in self.READS or boolean_index) and not exempt:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def reads_per_step(module: TartanModule, batches: list[dict], **trainer_options) -> list[list[str]]:
    """The host reads (`HostReads`) of each training step of a fit on `batches`, META's dev head stopping on the
    device as on a GPU (on the CPU, where reads wait for nothing, it stops on the host)."""
    if isinstance(module.weighting, MetaWeighting):
        module.weighting.dev_head.stop_on_device = True
    step = module.training_step
    reads: list[list[str]] = []

    def counted(batch, batch_idx):
        with HostReads() as mode:
            step(batch, batch_idx)
        reads.append(mode.calls)

    module.training_step = counted
    fit(module, batches, **trainer_options)
    return reads


@pytest.mark.parametrize("weighting", ["none", "equal", "meta"])
def test_training_step_reads_nothing_back_from_the_device(tiny_encoder, weighting):
    """No host-device synchronisation inside a step, the encoder's included: padding and the sparse MLM positions are
    found before the batch moves (transformers would check each forward's mask for padding), META's dev head stops
    and its overflow check skips on the device. (Lightning's logging reads the logged values once per step, after
    it.)"""
    module = make_module(tiny_encoder, weighting=weighting, accumulate_grad_batches=2)
    batches = make_batches(6)
    reads = reads_per_step(module, [with_padding(batch) if index % 2 else batch for index, batch in enumerate(batches)])
    assert reads == [[], [], []]
    # a batch that skipped `on_before_batch_transfer`: transformers checks its mask, and its masked positions are
    # found on the device
    with HostReads() as mode:
        module.mlm_loss(with_padding(batches[0])["tapt"])
    assert mode.calls == ["__bool__", "nonzero"]


@pytest.mark.parametrize("fused", [False, True])
def test_an_fp16_step_reads_its_overflow_check_back_with_the_multi_tensor_optimizer_only(tiny_encoder, fused):
    """fp16's loss scaler checks the gradients for overflow every step. With the multi-tensor AdamW, `GradScaler.step`
    reads that check back to decide whether to step (one wait for the device per step); the fused AdamW (the default
    on a GPU) takes the check on the device and skips an overflowed update there."""
    module = make_module(tiny_encoder, weighting="meta", fused_optimizer=fused)
    batches = [with_padding(batch) for batch in make_batches(3)]
    reads = reads_per_step(module, batches, plugins=[fp16_with_loss_scaler()])
    assert reads == ([[], [], []] if fused else [["item"], ["item"], ["item"]])


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


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_trains_and_weights_stay_finite(tiny_encoder, precision):
    """Mixed, and pure bf16 (Lightning's `bf16-true`: bf16 weights, the dev head still fitted in fp32)."""
    module = make_module(tiny_encoder, weighting="meta", dropout=0.1)
    before = params_of(module)
    trainer = fit(module, make_batches(3), precision=precision)
    assert trainer.global_step == 3
    assert torch.isfinite(module.weighting.logits).all()
    assert not torch.equal(module.weighting.logits, torch.zeros(3))
    after = params_of(module)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_fits_the_dev_head_as_fp32_does(tiny_encoder, precision):
    """Inside a mixed-precision step the dev head is fitted in fp32 on the step's features: the same head an fp32 fit
    on those features gives. (Under autocast, every fitting step reused the head's first low-precision weights: it
    stopped after one AdamW step.) fp16 autocast runs on the CPU too."""
    module = make_module(tiny_encoder, weighting="meta", dev_head_lr=0.05, dev_head_steps=10, dev_head_tolerance=0.0)
    dev_head_ = module.weighting.dev_head
    fit_in_step = dev_head_.fit
    compared = []

    def fit_and_compare(features, labels, seed):
        fit_in_step(features, labels, seed)
        reference = DevHead(32, 3, lr=0.05, max_steps=10, tolerance=0.0)
        with torch.autocast("cpu", enabled=False):
            reference.fit(features.float(), labels, seed)
        for ours, expected in zip(dev_head_.head.parameters(), reference.head.parameters()):
            torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        compared.append(seed)

    dev_head_.fit = fit_and_compare
    fit(module, make_batches(2), precision=precision)
    assert len(compared) == 2  # one dev head per step


def test_dev_head_fit_inside_autocast_is_the_fp32_fit():
    """Cached features and re-encoding alike: autocast around the fit changes nothing."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(32, 8, generator=generator).bfloat16()
    labels = torch.randint(0, 3, (32,), generator=generator)
    expected = DevHead(8, 3, lr=0.05, max_steps=10, tolerance=0.0)
    expected.fit(features.float(), labels, seed=0)
    for given in (features, lambda: features):
        head = DevHead(8, 3, lr=0.05, max_steps=10, tolerance=0.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            head.fit(given, labels, seed=0)
        for ours, reference in zip(head.head.parameters(), expected.head.parameters()):
            torch.testing.assert_close(ours, reference, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_fused_optimizer_clips_and_steps_as_the_multi_tensor_one(tiny_encoder, precision):
    """The fused AdamW (the default on a GPU), which Lightning refuses to clip under mixed precision, clips to the
    same gradient norm and takes the same steps as the multi-tensor one, on META's flat gradient buffer. fp16 runs
    with a loss scaler, as on a GPU: the fused step must see its gradients unscaled once, before clipping."""
    trainer_options = {"precision": precision}
    if precision == "16-mixed":
        trainer_options = {"plugins": [fp16_with_loss_scaler()]}
    weights, norms = {}, {}
    for fused in (False, True):
        torch.manual_seed(0)
        options = {"max_grad_norm": 0.01, "warmup_ratio": 0.0, "fused_optimizer": fused}
        module = make_module(tiny_encoder, weighting="meta", **options)
        clip = module.on_before_optimizer_step
        norms[fused] = []

        def clipped(optimizer, clip=clip, norms=norms[fused]):
            clip(optimizer)
            grads = [param.grad for group in optimizer.param_groups for param in group["params"]]
            norms.append(torch.linalg.vector_norm(torch.stack([grad.norm() for grad in grads if grad is not None])))

        module.on_before_optimizer_step = clipped
        fit(module, make_batches(3), **trainer_options)
        assert bool(module.optimizers().optimizer.defaults["fused"]) is fused
        weights[fused] = params_of(module)
    torch.testing.assert_close(torch.stack(norms[True]), torch.full((3,), 0.01), rtol=1e-4, atol=0)
    torch.testing.assert_close(norms[True], norms[False])
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-4, atol=1e-7)


def test_the_optimizer_is_fused_on_a_gpu_only_unless_asked(tiny_encoder):
    module = make_module(tiny_encoder)
    fit(module, make_batches(1))
    assert module.optimizers().optimizer.defaults["foreach"] and not module.optimizers().optimizer.defaults["fused"]


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
            self.cosines = getattr(self, "cosines", []) + [float(trainer.callback_metrics["train/cos_tapt"])]

    module = make_module(tiny_encoder, weighting="meta", meta_lr=0.5)
    overflow = Overflow()
    fit(module, make_batches(2), callbacks=[overflow])
    first, second = overflow.logits_after
    assert not torch.equal(first, torch.zeros(3))
    torch.testing.assert_close(second, first)
    assert overflow.skipped == [0.0, 1.0]
    assert math.isfinite(overflow.cosines[0]) and math.isnan(overflow.cosines[1])  # a gap in the cosine plot


@pytest.mark.parametrize("per_task_grad_copies", [False, True])
def test_fp16_meta_tartan_weighs_its_tasks_as_fp32_does(tiny_encoder, per_task_grad_copies):
    """Under fp16 with a loss scaler (Lightning's `16-mixed` on a GPU) META-TARTAN updates its task weights, to about
    fp32's. The gradients carry the loss scale (2^16), so their squared norm overflows fp16: when the cosines ran
    under the step's autocast, every one was NaN and every weight update was skipped as an overflow."""
    logits, skipped = {}, {}
    options = dict(weighting="meta", meta_lr=1.0, per_task_grad_copies=per_task_grad_copies)
    for precision, trainer_options in (("32-true", {}), ("16-mixed", {"plugins": [fp16_with_loss_scaler()]})):
        torch.manual_seed(0)
        module = make_module(tiny_encoder, **options)
        trainer = fit(module, make_batches(3), **trainer_options)
        logits[precision] = module.weighting.logits
        skipped[precision] = float(trainer.callback_metrics["train/meta_skipped"])
    assert skipped == {"32-true": 0.0, "16-mixed": 0.0}
    assert not torch.equal(logits["32-true"], torch.zeros(3))
    torch.testing.assert_close(logits["16-mixed"], logits["32-true"], rtol=0.02, atol=2e-4)


def test_gradient_cosines_are_taken_in_fp32_inside_autocast():
    """Inside the step's bf16 autocast the cosines are the fp32 ones, bit for bit (autocast would cast the flat
    fp32 gradients to bf16 for their dot products: two half-size copies per objective, and bf16 rounding)."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 64, generator=generator)) for _ in range(3)]
    inputs = torch.randn(8, 64, generator=generator)
    dev_grad = [torch.randn(64, 64, generator=generator) for _ in params]

    def cosines(autocast: bool) -> dict[str, torch.Tensor]:
        tracker = TaskGradientCosines(params)
        in_step = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
        tracker.start_step()
        with in_step:
            tracker.set_dev_gradient(dev_grad)
        for power, name in enumerate(("end_task", "tapt"), start=1):
            hidden = inputs
            for param in params:
                hidden = torch.tanh(hidden @ param)
            hidden.pow(power).sum().backward()  # the same gradients either way
            with in_step:
                tracker.record(name)
        with in_step:
            tracker.end_micro_batch()
            return tracker.finish_step()

    for name, expected in cosines(autocast=False).items():
        torch.testing.assert_close(cosines(autocast=True)[name], expected, rtol=0, atol=0)


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


class LearningRates(pl.Callback):
    """The encoder's learning rate each optimizer step trains with."""

    def __init__(self) -> None:
        self.rates: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def test_a_run_resumed_with_a_longer_max_steps_trains_at_its_stretched_schedules_rates(tiny_encoder, tmp_path):
    """The 4-step run's last rate is 0; the first step after it, of a 6-step run, is trained at 6 steps' schedule."""
    every_step = pl.callbacks.ModelCheckpoint(tmp_path, save_top_k=-1, every_n_train_steps=1)
    fit(make_module(tiny_encoder, weighting="equal"), make_batches(4), enable_checkpointing=True,
        callbacks=[every_step])
    rates = LearningRates()
    module = make_module(tiny_encoder, weighting="equal")
    fit(module, make_batches(6), ckpt_path=tmp_path / "epoch=0-step=4.ckpt", callbacks=[rates])
    factor = lr_factors("linear", module.hparams.warmup_ratio, lambda: 6)
    assert rates.rates == {step: module.hparams.encoder_lr * factor(step) for step in (4, 5)}
    assert rates.rates[4] > 0


@pytest.mark.parametrize("saved_fused", [False, True])
def test_a_checkpoint_resumes_with_this_runs_optimizer_kernels(tiny_encoder, tmp_path, saved_fused):
    """A checkpoint made with the other AdamW kernels (one from before the fused optimizer became the GPU default,
    or from a CPU) resumes with this run's, fp16 with a loss scaler included: torch would restore the saved kernels,
    and a multi-tensor step handed the loss scaler's arguments for a fused one fails."""
    saved = make_module(tiny_encoder, weighting="meta", fused_optimizer=saved_fused)
    every_step = pl.callbacks.ModelCheckpoint(tmp_path, save_top_k=-1, every_n_train_steps=1)
    fit(saved, make_batches(2), enable_checkpointing=True, callbacks=[every_step], plugins=[fp16_with_loss_scaler()])
    resumed = make_module(tiny_encoder, weighting="meta", fused_optimizer=not saved_fused)
    checkpoint = tmp_path / "epoch=0-step=2.ckpt"
    trainer = fit(resumed, make_batches(4), ckpt_path=checkpoint, plugins=[fp16_with_loss_scaler()])
    assert trainer.global_step == 4
    optimizer = resumed.optimizers().optimizer
    kernels = {"fused": True, "foreach": None} if not saved_fused else {"fused": None, "foreach": True}
    assert all({key: group[key] for key in kernels} == kernels for group in optimizer.param_groups)
    assert all(torch.isfinite(param).all() for param in resumed.parameters())


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


def test_exported_classifier_carries_a_model_card_and_pushes_that_folder(tiny_encoder, tmp_path, monkeypatch):
    """The card names the task, labels, method, final task weights and the metrics given; `push_to_hub` uploads
    the very folder written (model, tokenizer, card), through huggingface_hub, here intercepted offline."""
    from huggingface_hub import HfApi, ModelCard

    uploads = []

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append((repo_id, sorted(path.name for path in Path(folder_path).iterdir())))

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: uploads.append(("create", repo_id)))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    module = make_module(tiny_encoder, weighting="meta", label_names=["neg", "pos", "neutral"])
    fit(module, make_batches(2))
    export = tmp_path / "export"
    module.save_end_task_model(export, metrics={"test/f1_macro": 0.6123}, task="sentiment", push_to_hub="me/clf")

    card = ModelCard.load(export / "README.md")
    assert card.data.pipeline_tag == "text-classification" and card.data.library_name == "transformers"
    assert "# sentiment classifier" in card.text and "META-TARTAN" in card.text
    assert all(f"| {i} | {name} |" in card.text for i, name in enumerate(["neg", "pos", "neutral"]))
    for name, weight in module.weighting.weights().items():
        assert f"| {name} | {float(weight):.4f} |" in card.text
    assert "| test/f1_macro | 0.6123 |" in card.text
    assert "Auxiliary masked-LM objectives trained: `tapt`, `dapt`." in card.text
    assert f"from the local encoder `{Path(tiny_encoder).name}`." in card.text and tiny_encoder not in card.text
    make_module(tiny_encoder, weighting="none").save_end_task_model(tmp_path / "fine_tuned")
    fine_tuned = ModelCard.load(tmp_path / "fine_tuned" / "README.md")
    assert "Auxiliary masked-LM objectives trained: none." in fine_tuned.text  # its corpora were never read
    assert uploads[0] == ("create", "me/clf")
    assert uploads[1][0] == "me/clf" and {"README.md", "config.json", "tokenizer_config.json"} <= set(uploads[1][1])


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
        ({"weighting": "meta", "aux_objectives": []}, "aux_objectives"),
        ({"label_names": ["a"]}, "label_names"),
        ({"aux_objectives": "dapt"}, r"aux_objectives must be a list of corpus names, e.g. \['dapt'\]"),
    ],
)
def test_bad_options_name_the_option(tiny_encoder, options, option_name):
    with pytest.raises(ValueError, match=option_name):
        make_module(tiny_encoder, **options)


def test_a_weighting_strategy_of_ones_own_trains_and_reloads_by_its_import_path(tiny_encoder, tmp_path):
    """`weighting="own_weighting.EndTaskHeavy"` (tests/own_weighting.py, outside the library): its weights scale the
    losses, and a checkpoint loads back with the same strategy; a path that is no strategy is refused by name."""
    module = make_module(tiny_encoder, weighting="own_weighting.EndTaskHeavy")
    trainer = fit(module, make_batches(1))
    assert {name: float(weight) for name, weight in module.weighting.weights().items()} == {
        "end_task": 0.5, "tapt": 0.25, "dapt": 0.25
    }
    trainer.save_checkpoint(tmp_path / "own.ckpt")
    reloaded = TartanModule.load_from_checkpoint(tmp_path / "own.ckpt")
    assert type(reloaded.weighting).__name__ == "EndTaskHeavy"
    with pytest.raises(ValueError, match="weighting='own_weighting.torch' is not one of .* nor the import path"):
        make_module(tiny_encoder, weighting="own_weighting.torch")


def test_own_weights_may_be_numbers_but_not_tensors_with_a_graph(tiny_encoder):
    """Weights as plain numbers scale the losses; weights with a graph (to be learned by the objectives' backward)
    are refused at the first step naming the strategy and where to learn them, not with autograd's "backward
    through the graph a second time"; an EndTaskHeavy without auxiliary objectives trains the end task alone."""
    module = make_module(tiny_encoder, weighting="own_weighting.PlainNumbers")
    fit(module, make_batches(1))
    assert float(module.trainer.callback_metrics["train/weight_end_task"]) == 2.0
    refused = r"^LearnedByBackprop.weights\(\) gave weights that need a gradient .*end_step"
    with pytest.raises(ValueError, match=refused):
        fit(make_module(tiny_encoder, weighting="own_weighting.LearnedByBackprop"), make_batches(1))
    alone = make_module(tiny_encoder, weighting="own_weighting.EndTaskHeavy", aux_objectives=[])
    assert {name: float(weight) for name, weight in alone.weighting.weights().items()} == {"end_task": 1.0}


@pytest.mark.parametrize("label_names", [None, ["négatif", "neutre", "positif"]])
def test_predictions_name_classes_as_strings_and_as_written(tiny_encoder, tmp_path, label_names):
    """Without label names the classes are their ids as strings, alike in `label`, `gold` and the probabilities'
    keys; names outside ASCII are written as they are, so `grep négatif predictions.jsonl` finds them."""
    from lightning_tartan import PredictionWriter

    module = make_module(tiny_encoder, label_names=label_names).eval()
    writer = PredictionWriter(str(tmp_path / "predictions.jsonl"))
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False,
                         enable_model_summary=False)
    evaluation = [batch["end_task"] for batch in make_batches(2)]
    trainer.predict(module, dataloaders=DataLoader(evaluation, batch_size=None))
    names = label_names or ["0", "1", "2"]
    text = writer.path.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == 8 and all(list(row["probabilities"]) == names for row in rows)
    assert all(row["label"] in names and row["gold"] in names for row in rows)
    assert [row["gold"] for row in rows] == [names[i] for b in evaluation for i in b["labels"].tolist()]
    assert ("négatif" in text) == (label_names is not None)


def test_learning_rates_are_logged_with_each_steps_losses_beside_a_monitor_of_ones_own(tiny_encoder, tmp_path):
    """Any logger gets each optimizer step's learning rates in the row of its losses (one row per step in
    metrics.csv); a trainer's own LearningRateMonitor logs beside them under its own names."""
    from pytorch_lightning.callbacks import LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger

    own = LearningRateMonitor(logging_interval="step")
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, logger=CSVLogger(tmp_path), callbacks=[own], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )
    module = make_module(tiny_encoder, lr_schedule="constant", warmup_ratio=0.0)
    trainer.fit(module, train_dataloaders=loader(make_batches(2)))
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    ours = [row for row in rows if row["train/lr/encoder"]]
    assert [int(row["step"]) for row in ours] == [0, 1]
    assert all(float(row["train/lr/encoder"]) == module.hparams.encoder_lr for row in ours)
    assert all(float(row["train/lr/head"]) == module.hparams.head_lr and row["train/loss_end_task"] for row in ours)
    assert any(row.get("lr-AdamW/encoder") for row in rows)


def test_a_batch_without_a_source_the_step_reads_names_it(tiny_encoder):
    module = make_module(tiny_encoder, weighting="equal")
    batches = [{"tapt": b["tapt"], "dapt": b["dapt"]} for b in make_batches(1)]
    with pytest.raises(BatchFormatError, match=re.escape("the training batch has no ['end_task'], which this weight")):
        fit(module, batches)
    batches = [{key: b[key] for key in ("end_task", "tapt", "dapt")} for b in make_batches(1)]
    with pytest.raises(BatchFormatError, match=re.escape("no ['meta_dev', 'meta_dev_grad'] (META-TARTAN's dev samp")):
        fit(make_module(tiny_encoder, weighting="meta"), batches)


def test_a_corpus_the_model_was_not_told_about_is_refused_not_left_untrained(tiny_encoder):
    """A data module of one's own that brings a corpus the model does not name would load it every step and never
    train it; fine-tuning alone (weighting "none") takes such batches and leaves the corpora out, as documented."""
    with pytest.raises(BatchFormatError, match=re.escape("holds ['dapt'], which aux_objectives=['tapt'] does not")):
        fit(make_module(tiny_encoder, weighting="equal", aux_objectives=["tapt"]), make_batches(1))
    assert fit(make_module(tiny_encoder, weighting="none", aux_objectives=[]), make_batches(1)).global_step == 1


def unmasked(batch: dict) -> None:
    """An MLM source as `DataCollatorForLanguageModeling(mlm=False)` builds it: every token labelled, none masked."""
    tapt = batch["tapt"]
    masked = tapt["labels"] != -100
    tapt["input_ids"][masked] = tapt["labels"][masked]
    tapt["labels"] = tapt["input_ids"].clone()


MALFORMED_BATCHES = {
    # what a data module of one's own gets wrong -> the error that names the source and the fix
    "labels as a list": (lambda b: b["end_task"].update(labels=b["end_task"]["labels"].tolist()),
                         "batch source 'end_task': 'labels' must be a tensor, got list"),
    "float labels": (lambda b: b["end_task"].update(labels=b["end_task"]["labels"].float()),
                     "batch source 'end_task': 'labels' must be integer ids, got torch.float32"),
    "one-hot labels": (lambda b: b["meta_dev"].update(labels=F.one_hot(b["meta_dev"]["labels"], 3)),
                       "batch source 'meta_dev': 'labels' has shape (4, 3), not (4,) (one class id per row)"),
    "a class id past num_labels": (lambda b: b["meta_dev_grad"]["labels"].fill_(3),
                                   "batch source 'meta_dev_grad': class ids [3] are outside 0..2 (num_labels=3)"),
    "MLM without labels": (lambda b: b["tapt"].pop("labels"),
                           "batch source 'tapt' has no 'labels' (transformers' DataCollatorForLanguageModeling"),
    "MLM not masked": (unmasked, "batch source 'tapt': none of its 48 labelled tokens is masked in input_ids"),
    "float input ids": (lambda b: b["end_task"].update(input_ids=b["end_task"]["input_ids"].float()),
                        "batch source 'end_task': 'input_ids' must be token ids, integers of shape (rows, tokens), "
                        "got torch.float32"),
    "a mask one token short": (lambda b: b["tapt"].update(attention_mask=b["tapt"]["attention_mask"][:, 1:]),
                               "batch source 'tapt': 'attention_mask' has shape (4, 11), not that of 'input_ids', "
                               "(4, 12)"),
    "left padding": (lambda b: b["end_task"]["attention_mask"][1, :3].zero_(),
                     "batch source 'end_task': rows [1] start with padding (attention_mask 0 at their first token): "
                     "pad on the right"),
    "ids past the vocabulary": (lambda b: b["meta_dev"]["input_ids"].__setitem__((0, 1), 40000),
                                "batch source 'meta_dev' holds token ids outside 0..30521, the encoder's vocabulary"),
    "rows past the positions": (
        lambda b: b["dapt"].update({key: value.repeat(1, 43) for key, value in b["dapt"].items()}),
        "batch source 'dapt' holds rows of 516 tokens, more than the encoder's 512 positions: truncate them",
    ),
}


@pytest.mark.parametrize("mistake", list(MALFORMED_BATCHES))
def test_a_malformed_batch_of_ones_own_names_the_source_and_the_fix(tiny_encoder, mistake):
    """Instead of torch's or the encoder's own message from deep inside the step, or training the wrong thing."""
    spoil, message = MALFORMED_BATCHES[mistake]
    batches = make_batches(1)
    spoil(batches[0])
    with pytest.raises(ValueError, match=re.escape(message)):
        fit(make_module(tiny_encoder, weighting="meta"), batches)


def test_integer_labels_of_any_width_train_as_int64_labels_do(tiny_encoder):
    """torch's losses take int64 class ids only; a collator's int32 labels are widened, not refused."""
    narrow = make_batches(2)
    for batch in narrow:
        batch["end_task"]["labels"] = batch["end_task"]["labels"].int()
    trained = {}
    for name, batches in (("int64", make_batches(2)), ("int32", narrow)):
        torch.manual_seed(0)
        module = make_module(tiny_encoder, weighting="equal")
        fit(module, batches)
        trained[name] = module.state_dict()
    for key, value in trained["int64"].items():
        torch.testing.assert_close(trained["int32"][key], value, rtol=0, atol=0, msg=key)


def test_evaluation_batches_in_the_training_format_are_named(tiny_encoder):
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1)
    with pytest.raises(BatchFormatError, match=re.escape("(this one maps sources to batches, as a training batch")):
        trainer.fit(make_module(tiny_encoder), train_dataloaders=loader(make_batches(1)),
                    val_dataloaders=loader(make_batches(1)))
    as_tuples = [(b["end_task"]["input_ids"], b["end_task"]["attention_mask"]) for b in make_batches(1)]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(BatchFormatError, match=re.escape("an evaluation batch is a dict {input_ids, attention_mask")):
        trainer.predict(make_module(tiny_encoder), dataloaders=DataLoader(as_tuples, batch_size=None))


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
    # equal: only the step's last backward all-reduces; meta: every objective's, for its global gradient's cosine
    stats = json.loads((tmp_path / "devices2" / "rank0.json").read_text())
    assert stats["optimizer_steps"] == 3
    assert stats["synced_backwards"] == 3 * (3 if weighting == "meta" else 1)


def test_meta_task_weights_agree_across_ranks_that_drew_their_own_dev_samples(tiny_encoder, tmp_path):
    """A data module of one's own may give each rank its own dev samples (a `DistributedSampler` does): the ranks'
    cosines are averaged, so every rank keeps the same task weights, and so the same losses, step after step."""
    worker = Path(__file__).with_name("ddp_worker.py")
    command = [sys.executable, str(worker), tiny_encoder, "meta", "2", str(tmp_path), "ddp_find_unused_parameters_true"]
    result = subprocess.run([*command, "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert not torch.equal(rank0["weighting.logits"], torch.zeros(3))
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)


def test_plain_ddp_is_refused_with_the_strategy_that_works(tiny_encoder, tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    command = [sys.executable, str(worker), tiny_encoder, "equal", "2", str(tmp_path), "ddp"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "strategy='ddp_find_unused_parameters_true'" in result.stderr


# ---- starting points, schedules and frozen encoders ------------------------------------------------------


def test_init_checkpoint_starts_from_a_multitask_checkpoint_and_is_not_needed_afterwards(tiny_encoder, tmp_path):
    multitask = make_module(tiny_encoder, weighting="meta", meta_lr=0.5)
    trainer = fit(multitask, make_batches(2))
    trainer.save_checkpoint(tmp_path / "multitask.ckpt")

    posthoc = make_module(tiny_encoder, weighting="none", init_checkpoint=str(tmp_path / "multitask.ckpt"))
    for name, value in posthoc.state_dict().items():
        torch.testing.assert_close(value, multitask.state_dict()[name], rtol=0, atol=0, msg=name)
    assert "init_checkpoint" not in posthoc.hparams

    fit(posthoc, make_batches(1)).save_checkpoint(tmp_path / "posthoc.ckpt")
    (tmp_path / "multitask.ckpt").unlink()  # the post-hoc checkpoint stands on its own
    reloaded = TartanModule.load_from_checkpoint(tmp_path / "posthoc.ckpt")
    torch.testing.assert_close(reloaded.end_task_head.out_proj.weight, posthoc.end_task_head.out_proj.weight)


def test_init_checkpoint_mistakes_name_the_option(tiny_encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="init_checkpoint"):
        make_module(tiny_encoder, init_checkpoint=str(tmp_path / "missing.ckpt"))
    torch.save({"state_dict": make_module(tiny_encoder, num_labels=5).state_dict()}, tmp_path / "five_labels.ckpt")
    with pytest.raises(ValueError, match="init_checkpoint.*does not fit"):
        make_module(tiny_encoder, num_labels=3, init_checkpoint=str(tmp_path / "five_labels.ckpt"))


@pytest.mark.parametrize(("schedule", "constant"), [("constant", True), ("linear", False)])
def test_lr_schedule(tiny_encoder, schedule, constant):
    module = make_module(tiny_encoder, weighting="none", lr_schedule=schedule, warmup_ratio=0.0, encoder_lr=1e-4)
    trainer = fit(module, make_batches(3), max_steps=6)  # two epochs of 3 batches; the schedule ends at step 6
    encoder = set(module.encoder.parameters())
    lrs = [group["lr"] for group in trainer.optimizers[0].param_groups if group["params"][0] in encoder]
    assert trainer.global_step == 6
    assert lrs == [1e-4, 1e-4] if constant else lrs == [0.0, 0.0]  # linear decays to 0 at the last step


@pytest.mark.parametrize("schedule", ["linear", "constant"])
@pytest.mark.parametrize("warmup_ratio", [0.0, 0.1, 0.5])
def test_lr_factors_follow_transformers_schedules_and_read_the_run_length_only_once_training(schedule, warmup_ratio):
    """Our schedule is transformers' (warm-up, then linear decay or constant), but reads the run's length at step 1:
    asking Lightning for it before training starts drops a resumed run's data-loader position."""
    total = 20
    reads = []
    factors = lr_factors(schedule, warmup_ratio, lambda: reads.append(1) or total)
    assert factors(0) == (0.0 if warmup_ratio else 1.0) and reads == []
    make = transformers.get_linear_schedule_with_warmup if schedule == "linear" else (
        lambda optimizer, warmup, _: transformers.get_constant_schedule_with_warmup(optimizer, warmup)
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = make(optimizer, math.ceil(warmup_ratio * total), total).lr_lambdas[0]
    assert [factors(step) for step in range(total + 3)] == [reference(step) for step in range(total + 3)]
    assert reads == [1]


def test_freeze_encoder_fits_only_the_heads(tiny_encoder):
    module = make_module(tiny_encoder, weighting="aux_only", freeze_encoder=True)
    before = params_of(module)
    fit(module, make_batches(2))
    after = params_of(module)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("mlm_head.") for name in changed), changed
    assert "encoder.embeddings.word_embeddings.weight" in before  # tied to the MLM decoder, so frozen with it


def test_encoder_given_as_path_keeps_checkpoints_loadable(tiny_encoder, tmp_path):
    module = make_module(Path(tiny_encoder))
    assert module.hparams.encoder_name_or_path == module.hparams.tokenizer_name_or_path == tiny_encoder
    fit(module, make_batches(1)).save_checkpoint(tmp_path / "run.ckpt")
    torch.load(tmp_path / "run.ckpt", weights_only=True)



def test_a_checkpoint_whose_encoder_folder_moved_names_the_options_that_load_it(tiny_encoder, tmp_path):
    """From Python the checkpoint is rebuilt from the folder it was trained from: gone, the error names the option
    and the call that loads it from the folder's new place, which is the tokenizer's too when the run's tokenizer
    was the encoder's; an export writes nothing until its tokenizer loads."""
    encoder = shutil.copytree(tiny_encoder, tmp_path / "encoder")
    fit(make_module(str(encoder)), make_batches(1)).save_checkpoint(tmp_path / "run.ckpt")
    moved = encoder.rename(tmp_path / "moved")
    gone = re.escape(str(encoder))
    with pytest.raises(OSError, match=rf"^encoder_name_or_path='{gone}': neither a local folder") as err:
        TartanModule.load_from_checkpoint(tmp_path / "run.ckpt")
    assert "load_from_checkpoint(path, encoder_name_or_path=<folder>)" in str(err.value)
    # the run's tokenizer was the encoder's: it moved with it
    only_encoder = TartanModule.load_from_checkpoint(tmp_path / "run.ckpt", encoder_name_or_path=str(moved))
    assert only_encoder.hparams.tokenizer_name_or_path == str(moved)
    only_encoder.save_end_task_model(tmp_path / "classifier")
    # a tokenizer of its own stays where it was, and is named with the encoder when it moved too
    fit(make_module(str(moved), tokenizer_name_or_path=tiny_encoder), make_batches(1)).save_checkpoint(
        tmp_path / "own_tokenizer.ckpt"
    )
    elsewhere = moved.rename(tmp_path / "elsewhere")
    loaded = TartanModule.load_from_checkpoint(tmp_path / "own_tokenizer.ckpt", encoder_name_or_path=str(elsewhere))
    assert loaded.hparams.tokenizer_name_or_path == tiny_encoder
    both = TartanModule.load_from_checkpoint(
        tmp_path / "run.ckpt", encoder_name_or_path=str(elsewhere), tokenizer_name_or_path=str(elsewhere)
    )
    both.save_end_task_model(tmp_path / "classifier2")
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier").num_labels == 3
    gone_tokenizer = TartanModule.load_from_checkpoint(
        tmp_path / "own_tokenizer.ckpt", encoder_name_or_path=str(elsewhere), tokenizer_name_or_path=str(encoder)
    )
    with pytest.raises(OSError, match=rf"^tokenizer_name_or_path='{gone}': neither a local folder"):
        gone_tokenizer.save_end_task_model(tmp_path / "not_written")
    assert not (tmp_path / "not_written").exists()


def without_head_tensors(tiny_encoder: str, folder: Path, dropped: str) -> str:
    """A copy of the tiny masked-LM checkpoint whose MLM-head tensors starting with `dropped` are removed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_encoder, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith(dropped)}, folder / "model.safetensors", {"format": "pt"})
    return str(folder)


@pytest.mark.parametrize(("dropped", "count"), [("cls.", "6 of its 7"), ("cls.predictions.transform.dense", "2 of its 7")])
def test_missing_mlm_head_is_reported_in_one_line(tiny_encoder, tmp_path, dropped, count, capfd, recwarn):
    """Said once a fit trains an MLM objective with the random head: not for fine-tuning, which never uses it, nor
    for the head's warm-up with the encoder frozen, nor when a checkpoint brings a trained head (a resumed run,
    `load_from_checkpoint` before an export)."""
    encoder = without_head_tensors(tiny_encoder, tmp_path / "headless", dropped)
    module = make_module(encoder)
    assert "LOAD REPORT" not in "".join(capfd.readouterr())  # transformers' own multi-line report stays silent
    fine_tuning = make_module(encoder, weighting="none")
    fit(fine_tuning, make_batches(1))
    warm_up = make_module(encoder, weighting="aux_only", freeze_encoder=True)  # what the warning recommends
    fit(warm_up, make_batches(1))
    assert not [w for w in recwarn if "masked-LM head" in str(w.message)]
    with pytest.warns(UserWarning, match=f"has no pretrained masked-LM head: {count} tensors") as warned:
        trainer = fit(module, make_batches(1))
    assert any("mlm_head_warmup" in str(warning.message) for warning in warned)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    recwarn.clear()
    resumed = make_module(encoder)
    fit(resumed, make_batches(2), ckpt_path=tmp_path / "run.ckpt")
    assert not [w for w in recwarn if "masked-LM head" in str(w.message)]


def test_complete_mlm_head_raises_no_warning(tiny_encoder, recwarn):
    make_module(tiny_encoder)
    assert not [w for w in recwarn if "masked-LM head" in str(w.message)]


def test_packaged_encoder_loads_by_its_hub_name_offline(monkeypatch, tmp_path):
    """With the `offline` extra, the Hub name of all-MiniLM-L6-v2 loads its packaged copy without the network."""
    from conftest import minilm_path

    packaged = minilm_path()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = TartanModule("sentence-transformers/all-MiniLM-L6-v2", num_labels=2, weighting="none")
    assert module.hparams.encoder_name_or_path == "sentence-transformers/all-MiniLM-L6-v2"  # portable hparams
    reference = AutoModelForSequenceClassification.from_pretrained(packaged)
    torch.testing.assert_close(
        module.encoder.embeddings.word_embeddings.weight, reference.base_model.embeddings.word_embeddings.weight
    )
    module.save_end_task_model(tmp_path / "export")  # the tokenizer comes from the copy too
    assert (tmp_path / "export" / "tokenizer_config.json").is_file()


def test_a_training_batch_is_one_optimizer_step_of_its_micro_batches(tiny_encoder):
    """Two micro-batches per training batch: one optimizer step on the mean of their weighted losses."""

    class StepGradients(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads = {name: p.grad.clone() for name, p in pl_module.named_parameters() if p.grad is not None}

    batches = make_batches(2)
    module = make_module(tiny_encoder, weighting="equal", accumulate_grad_batches=2)
    expected = copy.deepcopy(module)
    recorder = StepGradients()
    trainer = fit(module, batches, callbacks=[recorder])
    assert trainer.global_step == 1

    for batch in batches:
        for name in expected.objectives:
            (expected.objective_loss(name, batch) / len(expected.objectives) / 2).backward()
    grads = {name: p.grad for name, p in expected.named_parameters() if p.grad is not None}
    assert recorder.grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(recorder.grads[name], grad, msg=name)


def test_micro_batches_that_do_not_match_the_accumulation_fail_naming_both_options(tiny_encoder):
    module = make_module(tiny_encoder, weighting="equal", accumulate_grad_batches=2)
    with pytest.raises(BatchFormatError, match="holds 1 micro-batches but accumulate_grad_batches=2: .* each source "
                                               "mapping to a list of them"):
        pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False).fit(
            module, train_dataloaders=loader(make_batches(2))
        )
    uneven = group(make_batches(2), 2)[0]
    uneven["tapt"] = uneven["tapt"][:1]
    with pytest.raises(ValueError, match="the same number of micro-batches.*drop_last=True"):
        micro_batches(uneven)
    once_per_step = group(make_batches(2), 2)[0]
    once_per_step["meta_dev"] = once_per_step["meta_dev"][0]
    with pytest.raises(ValueError, match=r"but \['meta_dev'\] is a single one \(the dev samples too"):
        micro_batches(once_per_step)


def test_from_datamodule_takes_what_the_task_knows(tiny_encoder):
    class Task:
        num_labels, label_names, aux_names = 3, ["a", "b", "c"], ["tapt"]
        monitor_metric, tokenizer_name_or_path, accumulate_grad_batches = "accuracy", tiny_encoder, 2

    module = TartanModule.from_datamodule(Task(), encoder_name_or_path=tiny_encoder, weighting="meta")
    hp = module.hparams
    assert (hp.num_labels, list(hp.label_names), list(hp.aux_objectives)) == (3, ["a", "b", "c"], ["tapt"])
    assert (hp.monitor_metric, hp.accumulate_grad_batches, hp.weighting) == ("accuracy", 2, "meta")
    with pytest.raises(ValueError, match="num_labels=4 disagrees with the data module's 3"):
        TartanModule.from_datamodule(Task(), encoder_name_or_path=tiny_encoder, num_labels=4)


def test_from_datamodule_of_a_users_own_reads_what_it_has(tiny_encoder):
    """A data module of one's own may know its classes only: the module's options stand in for the rest, and one
    without `num_labels` (which has a default of 2 that would silently be wrong) is refused, naming it."""

    class Classes:
        num_labels = 3

    module = TartanModule.from_datamodule(Classes(), encoder_name_or_path=tiny_encoder, aux_objectives=["web"])
    assert (module.hparams.num_labels, list(module.hparams.aux_objectives)) == (3, ["web"])
    with pytest.raises(ValueError, match="has no `num_labels` attribute"):
        TartanModule.from_datamodule(object(), encoder_name_or_path=tiny_encoder)


def test_attention_implementations_give_the_same_losses(tiny_encoder):
    """`attn_implementation` picks transformers' attention kernel; the model computes the same function with each."""
    batch = make_batches(1)[0]
    batch["end_task"]["attention_mask"][:, -3:] = 0  # padded rows: the kernels must all honour the mask
    sdpa = make_module(tiny_encoder, attn_implementation="sdpa")
    eager = make_module(tiny_encoder, attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.ready_attention_masks and not eager.ready_attention_masks  # SDPA's mask is made before the encoder
    marked = sdpa.on_before_batch_transfer(batch, 0)
    for name in ("end_task", "tapt"):
        torch.testing.assert_close(sdpa.objective_loss(name, marked), eager.objective_loss(name, batch))
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'.*not.*installed"):
        make_module(tiny_encoder, attn_implementation="flash_attention_2")


def test_compiled_encoder_trains_like_the_eager_one(tiny_encoder):
    """`compile_encoder` runs the encoder through torch.compile (its hooks run while it is traced) and a META step,
    with its dev gradient through the compiled encoder, ends at the eager run's weights."""
    batches = make_batches(2)
    eager = make_module(tiny_encoder, weighting="meta", meta_lr=0.5)
    compiled = make_module(tiny_encoder, weighting="meta", meta_lr=0.5, compile_encoder=True)
    compiled.load_state_dict(eager.state_dict())
    traced = []
    compiled.encoder.embeddings.register_forward_pre_hook(lambda *_: traced.append(torch.compiler.is_compiling()))
    fit(eager, batches)
    fit(compiled, batches)
    assert any(traced)
    torch.testing.assert_close(compiled.weighting.logits, eager.weighting.logits, rtol=1e-4, atol=1e-6)
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)



@pytest.mark.parametrize(
    ("options", "precision"),
    [({"weighting": "meta"}, "32-true"), ({"weighting": "equal", "pack_sequences": True}, "bf16-mixed")],
    ids=["meta", "packed-bf16"],
)
def test_gradient_checkpointing_recomputes_the_layers_and_trains_the_same_weights(tiny_encoder, options, precision):
    """Memory for time: every encoder layer runs again in each backward, and the run ends at the same weights, bit
    for bit, dropout's masks included (META-TARTAN takes several backward passes per step)."""
    batches = [with_padding(batch) for batch in make_batches(2)]
    runs = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = make_module(tiny_encoder, dropout=0.1, gradient_checkpointing=checkpointing, **options)
        calls = []  # a sublayer of the first layer: the layer's own hooks stay outside the recomputation
        module.encoder.encoder.layer[0].intermediate.register_forward_hook(lambda *_: calls.append(1))
        fit(module, batches, precision=precision)
        runs[checkpointing] = params_of(module), len(calls)
    (plain, plain_calls), (checkpointed, checkpointed_calls) = runs[False], runs[True]
    assert checkpointed_calls >= plain_calls + 4  # at least two backward passes in each of the 2 steps recompute it
    assert all(torch.equal(plain[name], checkpointed[name]) for name in plain)


def test_gradient_checkpointing_leaves_a_frozen_encoder_alone(tiny_encoder):
    """A frozen encoder runs no backward, so there is nothing to recompute (and no gradient to route through it)."""
    module = make_module(tiny_encoder, weighting="aux_only", freeze_encoder=True, gradient_checkpointing=True)
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in module.encoder.encoder.layer)
    assert not make_module(tiny_encoder).encoder.encoder.layer[0].gradient_checkpointing
    assert make_module(tiny_encoder, gradient_checkpointing=True).encoder.encoder.layer[0].gradient_checkpointing

@pytest.mark.parametrize("weighting", ["none", "equal", "aux_only", "meta"])
def test_task_weights_live_on_the_models_device(tiny_encoder, weighting):
    """Weighting a loss copies nothing from the host, which on a GPU would make the host wait for the device."""
    module = make_module(tiny_encoder, weighting=weighting)
    weights = module.weighting.to("meta").weights()
    assert {weight.device.type for weight in weights.values()} == {"meta"}
    assert len(weights) == {"none": 1, "aux_only": 2}.get(weighting, 3)


def test_trainer_options_a_manually_optimized_module_cannot_honour_are_refused_before_a_step(tiny_encoder):
    """What a Lightning user types by habit, named with the module's option that does it instead."""
    module = make_module(tiny_encoder)
    with pytest.raises(ValueError, match=re.escape("set its max_grad_norm (--model.max_grad_norm) instead of Trai")):
        fit(module, make_batches(1), gradient_clip_val=0)  # Lightning's "no clipping", refused mid-step otherwise
    assert fit(module, make_batches(1), gradient_clip_val=None).global_step == 1


def test_a_training_loader_without_a_length_needs_max_steps_for_the_schedule(tiny_encoder):
    """Lightning's estimate of the run's length is -1 there: a linear schedule over one step trained at rate 0."""

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(make_batches(4))

    stream = DataLoader(Stream(), batch_size=None)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ValueError, match=re.escape("set Trainer max_steps: the LR schedule needs the run's length")):
        trainer.fit(make_module(tiny_encoder), train_dataloaders=stream)
    trainer = pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    module = make_module(tiny_encoder)
    before = params_of(module)
    trainer.fit(module, train_dataloaders=stream)
    assert trainer.global_step == 4 and not torch.equal(before["end_task_head.out_proj.weight"],
                                                        module.end_task_head.out_proj.weight)


def test_a_callback_monitoring_a_loss_the_run_does_not_log_is_refused_before_the_first_step(tiny_encoder):
    watching = EarlyStopping(monitor="train/loss_tpt", check_on_train_epoch_end=True)
    with pytest.raises(ValueError, match=re.escape("EarlyStopping(monitor='train/loss_tpt'): this run logs no such")):
        fit(make_module(tiny_encoder, weighting="equal"), make_batches(1), callbacks=[watching])
    watching = EarlyStopping(monitor="train/loss_tapt", check_on_train_epoch_end=True)
    assert fit(make_module(tiny_encoder, weighting="equal"), make_batches(1), callbacks=[watching]).global_step == 1


def test_the_schedule_spans_the_run_when_max_epochs_ends_it_before_max_steps(tiny_encoder):
    """`max_steps` as a cap beside `max_epochs`: planned over the cap, the schedule would still be warming up when
    the epochs ran out."""
    planned = []

    class Plan(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            planned.append(pl_module.num_optimizer_steps())

    trainer = fit(make_module(tiny_encoder), make_batches(4), max_epochs=2, max_steps=1000, callbacks=[Plan()])
    assert planned == [8] and trainer.global_step == 8


def test_a_training_batch_that_is_not_a_mapping_of_sources_is_named(tiny_encoder):
    batches = [tuple(batch.values()) for batch in make_batches(1)]
    with pytest.raises(BatchFormatError, match=re.escape("a training batch maps each source (end_task, each MLM")):
        fit(make_module(tiny_encoder), batches)
