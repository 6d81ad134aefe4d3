"""Task weighting strategies: which objectives a step trains, and how much each counts.

Each strategy is one small class behind `Weighting`. A strategy gets everything it needs as arguments
(the objective names at construction, the cosines at `update`); nothing is injected from outside.
"""
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

END_TASK = "end_task"


class Weighting(nn.Module):
    """Weights for the objectives `["end_task", *aux]`; an `nn.Module` so its state rides in checkpoints."""

    #: whether `update` needs the cosine of each objective's gradient with the dev gradient
    needs_dev_gradient: bool = False

    def __init__(self, objectives: Sequence[str]) -> None:
        super().__init__()
        self.objectives = list(objectives)

    @property
    def active(self) -> list[str]:
        """Objectives that take part in a training step, in the order their losses are backpropagated."""
        return self.objectives

    def weights(self) -> dict[str, Tensor]:
        """The weight each active objective's loss is multiplied by."""
        share = torch.tensor(1.0 / len(self.active))
        return {name: share for name in self.active}

    def update(self, cosines: Mapping[str, Tensor]) -> None:
        """Called after each optimizer step with cos(g_dev, g_t) per active objective (meta only)."""


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


class MetaWeighting(Weighting):
    """META-TARTAN: weights are a softmax over logits moved toward objectives whose gradients agree with the dev gradient.

    The logit of objective t has gradient −cos(g_dev, g_t); one SGD step per optimizer step. The logits are a
    buffer, not a parameter, so DDP never reduces them: every rank computes the same update from the same
    globally averaged gradients.
    """

    needs_dev_gradient = True

    def __init__(self, objectives: Sequence[str], meta_lr: float = 1e-2) -> None:
        super().__init__(objectives)
        if meta_lr <= 0:
            raise ValueError(f"meta_lr must be > 0, got {meta_lr}")
        self.meta_lr = meta_lr
        self.register_buffer("logits", torch.zeros(len(self.objectives)))

    def weights(self) -> dict[str, Tensor]:
        probs = torch.softmax(self.logits, dim=0)
        return dict(zip(self.objectives, probs))

    def update(self, cosines: Mapping[str, Tensor]) -> None:
        grad = -torch.stack([cosines[name] for name in self.objectives]).to(self.logits)
        self.logits.sub_(self.meta_lr * grad)


STRATEGIES: dict[str, type[Weighting]] = {
    "none": NoWeighting,
    "equal": EqualWeighting,
    "aux_only": AuxOnlyWeighting,
    "meta": MetaWeighting,
}


def build_weighting(name: str, objectives: Sequence[str], meta_lr: Optional[float] = None) -> Weighting:
    """The strategy named by the `weighting` option."""
    if name not in STRATEGIES:
        raise ValueError(f"weighting={name!r} is not one of {sorted(STRATEGIES)}")
    if name == "aux_only" and len(objectives) < 2:
        raise ValueError("weighting='aux_only' needs at least one entry in aux_objectives")
    if name == "meta":
        return MetaWeighting(objectives, meta_lr=meta_lr if meta_lr is not None else 1e-2)
    return STRATEGIES[name](objectives)
