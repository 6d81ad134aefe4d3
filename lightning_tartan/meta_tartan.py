"""META-TARTAN: task weights meta-learned from how each objective's gradient agrees with a dev gradient.

Everything the method does around an optimizer step lives here, behind the `Weighting` hooks `training_step` calls
for every method. For each micro-batch: a dev head is fitted on the `meta_dev` sample (first micro-batch of a step),
its loss differentiated through the encoder gives the dev gradient, and after each objective's backward the cosine of
that objective's gradient with the dev gradient is read off `.grad`. After the optimizer step, the weights' logits
take one SGD step along the step's mean cosines.
"""
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_tartan.dev_head import DevHead
from lightning_tartan.task_gradients import TaskGradientCosines
from lightning_tartan.weighting import (
    META_DEV,
    META_DEV_GRAD,
    EncoderAccess,
    Weighting,
    batch_source,
    one_process_mean,
)


class MetaWeighting(Weighting):
    """META-TARTAN's weights: a softmax over logits moved toward objectives whose gradients agree with the dev
    gradient. The logit of objective t has gradient -cos(g_dev, g_t); one SGD step per optimizer step. The logits are
    a buffer, not a parameter, so DDP never reduces them: every rank computes the same update from the same globally
    averaged gradients.

    Args:
        objectives: the objective names, end task first.
        params: the encoder's parameters: the dev gradient and the cosines are taken over these.
        hidden_size, num_labels: the dev head's shape.
        meta_lr: the logits' learning rate.
        dev_head_lr, dev_head_weight_decay, dev_head_steps, dev_head_tolerance: the dev head's AdamW fit, stopped
            early once its loss moves less than the tolerance.
        dev_gradient: `held_out` (the paper's) differentiates the dev head's loss on `meta_dev_grad`, a fresh dev
            sample for every micro-batch; `in_sample` on the very sample it was fitted to, once per step (cheaper,
            but biased: the head has fitted that sample).
        dev_head_on_cached_features: fit the dev head on one encoder forward (the encoder is frozen while it fits);
            `False` re-runs the encoder at every fitting step, as the paper's code does.
        per_task_grad_copies: keep a gradient copy per objective, as the paper's code does (memory grows with the
            number of objectives; for comparison only).
        init_std: the dev head's initialisation scale (the encoder's `initializer_range`).
    """

    needs_dev_samples = True
    needs_objective_gradients = True  # the cosines compare each objective's global gradient with the dev one

    def __init__(
        self,
        objectives: Sequence[str],
        params: Sequence[nn.Parameter],
        hidden_size: int,
        num_labels: int,
        meta_lr: float = 1e-2,
        dev_head_lr: float = 1e-3,
        dev_head_weight_decay: float = 0.1,
        dev_head_steps: int = 10,
        dev_head_tolerance: float = 1e-3,
        dev_gradient: Literal["held_out", "in_sample"] = "held_out",
        dev_head_on_cached_features: bool = True,
        per_task_grad_copies: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(objectives)
        if meta_lr <= 0:
            raise ValueError(f"meta_lr must be > 0, got {meta_lr}")
        self.meta_lr = meta_lr
        self.in_sample = dev_gradient == "in_sample"
        self.dev_head_on_cached_features = dev_head_on_cached_features
        self.register_buffer("logits", torch.zeros(len(self.objectives)))
        # plain attributes: neither enters the state_dict (the encoder's parameters are the model's)
        self.dev_head = DevHead(
            hidden_size,
            num_labels,
            lr=dev_head_lr,
            weight_decay=dev_head_weight_decay,
            max_steps=dev_head_steps,
            tolerance=dev_head_tolerance,
            init_std=init_std,
        )
        self.cosines = TaskGradientCosines(params, keep_copies=per_task_grad_copies)
        self._mean_over_ranks: Callable[[Tensor], Tensor] = one_process_mean  # each step's from its EncoderAccess

    def weights(self) -> dict[str, Tensor]:
        return dict(zip(self.objectives, torch.softmax(self.logits, dim=0)))

    # ----- the step ---------------------------------------------------------------------------------------------

    def start_micro_batch(self, micro_batch: dict[str, Any], model: EncoderAccess, first: bool) -> None:
        if first:
            self.cosines.start_step()
            self._mean_over_ranks = model.mean_over_ranks
        dev_grad = self.dev_gradient(micro_batch, model, new_step=first)
        if dev_grad is not None:
            self.cosines.set_dev_gradient(dev_grad)

    def after_backward(self, name: str) -> None:
        self.cosines.record(name)

    def end_micro_batch(self) -> None:
        self.cosines.end_micro_batch()

    def end_step(self) -> dict[str, Tensor]:
        """The meta step; skipped when a gradient overflowed (fp16), so inf/NaN never reach the weights. The skip is
        decided on the device: reading the check on the host would make it wait for the step to finish."""
        step_cosines = self.cosines.finish_step()
        cosines = torch.stack([step_cosines[name] for name in self.objectives]).to(self.logits)
        # Each rank's cosines compare the (global) objective gradients with its own dev gradient: one all-reduce of
        # these few numbers keeps the task weights equal on every rank, whatever dev samples the ranks drew.
        cosines = self._mean_over_ranks(cosines)
        finite = cosines.isfinite().all()
        self.logits.sub_(self.meta_lr * torch.where(finite, -cosines, 0.0))
        logs = {f"cos_{name}": torch.where(finite, cosine, torch.nan) for name, cosine in zip(self.objectives, cosines)}
        return {"meta_skipped": (~finite).float(), **logs}

    # ----- the dev gradient -------------------------------------------------------------------------------------

    def dev_gradient(
        self, batch: dict[str, Any], model: EncoderAccess, new_step: bool = True
    ) -> Optional[list[Tensor]]:
        """g_dev over the encoder's parameters for this micro-batch, or None to keep the step's current one.

        `new_step` (the first micro-batch of an optimizer step) fits a fresh dev head on `meta_dev`, the encoder
        frozen in eval mode; the estimator (`dev_gradient`) says which sample its loss is differentiated on.
        """
        if self.in_sample and not new_step:
            return None
        fit_sample = batch_source(batch, META_DEV, "META-TARTAN fits its dev head on this dev sample")
        grad_sample = fit_sample if self.in_sample else batch_source(
            batch, META_DEV_GRAD, "dev_gradient='held_out' takes the dev gradient on this second, independent dev "
            "sample (or set dev_gradient='in_sample')"
        )
        was_training = model.encoder.training
        model.encoder.eval()
        try:
            with torch.enable_grad():
                features = model.cls_features(grad_sample)
            if new_step or self.dev_head.head is None:
                self._fit_dev_head(fit_sample, model, features.detach() if self.in_sample else None)
            return self.dev_head.gradient(features, grad_sample["labels"], self.cosines.params, model.scale_loss)
        finally:
            model.encoder.train(was_training)

    def _fit_dev_head(self, sample: dict[str, Tensor], model: EncoderAccess, features: Optional[Tensor]) -> None:
        def encoded() -> Tensor:
            with torch.no_grad():
                return model.cls_features(sample)

        if self.dev_head_on_cached_features:
            cached = encoded() if features is None else features
            self.dev_head.fit(cached, sample["labels"], seed=model.seed)
        else:
            self.dev_head.fit(encoded, sample["labels"], seed=model.seed)
