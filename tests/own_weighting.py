"""A weighting strategy of a user's own, outside the library, as the README writes one (`--model.weighting
own_weighting.EndTaskHeavy`, with this folder on the import path)."""
import torch

from lightning_tartan import Weighting


class EndTaskHeavy(Weighting):
    """Half the weight on the end task, the rest shared equally by the auxiliary objectives."""

    def __init__(self, objectives):
        super().__init__(objectives)
        aux = len(self.objectives) - 1
        shares = [0.5, *[0.5 / aux] * aux] if aux else [1.0]
        self.register_buffer("share", torch.tensor(shares), persistent=False)  # moves with the model

    def weights(self):
        return dict(zip(self.objectives, self.share))


class PlainNumbers(Weighting):
    """Weights given as Python numbers, the end task's counting double."""

    def weights(self):
        return {name: 2.0 if name == "end_task" else 1.0 for name in self.objectives}


class LearnedByBackprop(Weighting):
    """A mistake people make: weights with a graph to a parameter, hoping the objectives' backward trains them."""

    def __init__(self, objectives):
        super().__init__(objectives)
        self.logits = torch.nn.Parameter(torch.zeros(len(self.objectives)))

    def weights(self):
        return dict(zip(self.objectives, self.logits.softmax(0)))
