"""End-task aware training (TARTAN) for PyTorch Lightning."""
from lightning_tartan.callbacks import TaskWeightPlot
from lightning_tartan.module import TartanModule
from lightning_tartan.posthoc import PostHocSelection
from lightning_tartan.predictions import PredictionWriter
from lightning_tartan.weighting import Weighting, build_weighting

__all__ = ["PostHocSelection", "PredictionWriter", "TartanModule", "TaskWeightPlot", "Weighting", "build_weighting"]
