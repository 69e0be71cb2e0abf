"""Training: a thin lightning wrapper around any AnomalyModel, run folders, safe checkpoints, presets."""

from aeflow.training.checkpoint import load_checkpoint, save_checkpoint
from aeflow.training.module import AnomalyModule
from aeflow.training.presets import PRESETS, preset
from aeflow.training.run import TrainConfig, load_run, train

__all__ = ["PRESETS", "AnomalyModule", "TrainConfig", "load_checkpoint", "load_run", "preset", "save_checkpoint",
           "train"]
