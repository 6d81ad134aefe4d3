"""End-task aware training (TARTAN) for PyTorch Lightning."""
from lightning_tartan.batch_checks import BatchFormatError
from lightning_tartan.callbacks import ResumableProgressBar, TaskWeightPlot
from lightning_tartan.heads import EncoderInputMismatch
from lightning_tartan.meta_tartan import MetaWeighting
from lightning_tartan.module import CheckpointMismatch, TartanModule
from lightning_tartan.posthoc import PostHocSelection
from lightning_tartan.predictions import PredictionWriter
from lightning_tartan.weighting import EncoderAccess, Weighting

__all__ = [
    "BatchFormatError",
    "CheckpointMismatch",
    "EncoderAccess",
    "EncoderInputMismatch",
    "MetaWeighting",
    "PostHocSelection",
    "PredictionWriter",
    "ResumableProgressBar",
    "TartanModule",
    "TaskWeightPlot",
    "Weighting",
]
