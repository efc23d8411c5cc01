"""Trainer and tools: data loading, the training loop with checkpoints and resume, DDP/FSDP2
runs, and the ``quietstar`` command line. It uses the model layer and the ops below it."""

from quietstar.train.config import TrainConfig
from quietstar.train.trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
