"""Training: the resumable loop, checkpoints and weight export."""

from dao.train.checkpoint import atomic_save, export_weights, load_checkpoint, load_weights
from dao.train.trainer import EMA, TrainConfig, Trainer, make_optimizer

__all__ = [
    "EMA",
    "TrainConfig",
    "Trainer",
    "atomic_save",
    "export_weights",
    "load_checkpoint",
    "load_weights",
    "make_optimizer",
]
