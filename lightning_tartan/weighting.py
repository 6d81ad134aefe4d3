"""Task weighting strategies: which objectives a step trains, how much each counts, and what else a method does
around the step's backward passes.

Each strategy is one class behind `Weighting`, which owns its whole procedure: `training_step` calls the same hooks
for every method, in this order, and a strategy gets everything it needs as arguments::

    weights = strategy.weights()
    for each micro-batch of the step:
        strategy.start_micro_batch(micro_batch, encoder_access, first)
        for name in strategy.active: backward(weights[name] * loss(name) / micro-batches); strategy.after_backward(name)
        strategy.end_micro_batch()
    optimizer step
    logs = strategy.end_step()

META-TARTAN (`lightning_tartan.meta_tartan`) is the strategy that uses every hook; `TartanModule` maps the
`weighting` option's names to the classes.
"""
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

#: the reserved source names of a training batch, beside one per auxiliary corpus: the labeled end task, and the two
#: dev samples META-TARTAN fits its dev head on and takes its held-out dev gradient on
END_TASK, META_DEV, META_DEV_GRAD = "end_task", "meta_dev", "meta_dev_grad"
RESERVED_SOURCES = (END_TASK, META_DEV, META_DEV_GRAD)


def batch_source(batch: dict[str, Any], name: str, why: str) -> dict[str, Tensor]:
    """`batch[name]`, or an error naming the batch's sources and `why` the step needs this one."""
    if name not in batch:
        raise KeyError(f"training batch has no {name!r} entry (batch keys: {sorted(batch)}): {why}")
    return batch[name]


def one_process_mean(tensor: Tensor) -> Tensor:
    """The mean of `tensor` over the ranks of a run in one process: itself."""
    return tensor


@dataclass
class EncoderAccess:
    """What a strategy may read from the model at a micro-batch (META-TARTAN's dev gradient), handed over
    explicitly."""

    #: switched to eval mode while a dev head is fitted and differentiated, so dropout leaves its features fixed
    encoder: nn.Module
    #: a labeled sample's first-token features through the encoder, with a graph when grad is enabled
    cls_features: Callable[[dict[str, Tensor]], Tensor]
    #: multiplies a loss by fp16's loss scale (identity otherwise), so gradients taken outside the objectives'
    #: backward do not underflow
    scale_loss: Callable[[Tensor], Tensor]
    #: a seed for what the strategy draws at this step: the same on every rank and after a resume, new every step
    seed: int
    #: the mean of a tensor over the DDP ranks (itself in one process), so that what a strategy decides from its
    #: rank's samples is decided alike on every rank
    mean_over_ranks: Callable[[Tensor], Tensor] = one_process_mean


class Weighting(nn.Module):
    """Weights for the objectives `["end_task", *aux]`; an `nn.Module` so its state rides in checkpoints."""

    #: whether the strategy reads the `meta_dev` samples of a training batch (the data module builds them)
    needs_dev_samples: bool = False
    #: whether `after_backward` reads each objective's own gradient: under DDP every backward must then all-reduce;
    #: otherwise only the step's last one does
    needs_objective_gradients: bool = False

    def __init__(self, objectives: Sequence[str]) -> None:
        super().__init__()
        self.objectives = list(objectives)
        if not self.active:
            raise ValueError(f"{type(self).__name__} trains none of the objectives {self.objectives}")
        # a buffer moves with the model, so weighting a loss on a GPU copies nothing from the host (a copy from the
        # host makes it wait for the device); not persistent: it follows from `active`
        self.register_buffer("equal_share", torch.tensor(1.0 / len(self.active)), persistent=False)

    @property
    def active(self) -> list[str]:
        """Objectives that take part in a training step, in the order their losses are backpropagated."""
        return self.objectives

    def weights(self) -> dict[str, Tensor]:
        """The weight each active objective's loss is multiplied by in this optimizer step: constants, since every
        objective's backward reads them; a strategy that learns its weights updates them in `end_step`."""
        return {name: self.equal_share for name in self.active}

    def start_micro_batch(self, micro_batch: dict[str, Any], model: EncoderAccess, first: bool) -> None:
        """Before the objectives' backward passes of a micro-batch (`first`: the step's first)."""

    def after_backward(self, name: str) -> None:
        """Right after objective `name`'s backward, its gradient accumulated into `.grad`."""

    def end_micro_batch(self) -> None:
        """After the last objective's backward of a micro-batch."""

    def end_step(self) -> dict[str, Tensor]:
        """After the optimizer step: update the strategy's state; what to log (as `train/<key>`)."""
        return {}


def checked_weights(strategy: Weighting) -> dict[str, Tensor]:
    """`strategy.weights()` as tensors, or an error naming the strategy when an objective it trains has no weight, or a
    weight needs a gradient (each objective's backward would run back through the same graph)."""
    weights = {objective: torch.as_tensor(weight) for objective, weight in strategy.weights().items()}
    name = type(strategy).__name__
    missing = [objective for objective in strategy.active if objective not in weights]
    if missing:
        raise ValueError(f"{name}.weights() gave no weight for {missing}, which it trains ({strategy.active})")
    learned = [objective for objective, weight in weights.items() if weight.requires_grad]
    if learned:
        raise ValueError(
            f"{name}.weights() gave weights that need a gradient ({learned}): each objective's backward multiplies its "
            "loss by its weight, so weights must be constants; learn them in end_step, under torch.no_grad(), as "
            "META-TARTAN does (lightning_tartan.meta_tartan)"
        )
    return weights


class NoWeighting(Weighting):
    """Plain fine-tuning: the end task alone, auxiliary batches ignored."""

    @property
    def active(self) -> list[str]:
        return [END_TASK]


class EqualWeighting(Weighting):
    """MT-TARTAN: every objective weighted 1/n."""


class AuxOnlyWeighting(Weighting):
    """Continued pre-training (TAPT/DAPT): the auxiliary MLM objectives alone, weighted equally."""

    @property
    def active(self) -> list[str]:
        return [name for name in self.objectives if name != END_TASK]
