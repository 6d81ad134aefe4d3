"""A weighting strategy of a user's own, outside the library, as the README writes one (`--model.weighting
own_weighting.EndTaskHeavy`, with this folder on the import path)."""
import torch

from lightning_tartan import Weighting


class EndTaskHeavy(Weighting):
    """Half the weight on the end task, the rest shared equally by the auxiliary objectives."""

    def __init__(self, objectives):
        super().__init__(objectives)
        rest = [0.5 / (len(self.objectives) - 1)] * (len(self.objectives) - 1)
        self.register_buffer("share", torch.tensor([0.5, *rest]), persistent=False)  # moves with the model

    def weights(self):
        return dict(zip(self.objectives, self.share))
