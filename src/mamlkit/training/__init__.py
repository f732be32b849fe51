"""The training side: the one meta-training loop, run directories, checkpoints, metric logs, statistics."""

from .checkpoint import save_atomic
from .loop import BEST, CHECKPOINT, AdamUpdate, RunExistsError, Trainer, Update, checkpoint_file, make_optimizer
from .runs import start_run
from .stats import mean_ci

__all__ = [
    "Trainer",
    "Update",
    "AdamUpdate",
    "RunExistsError",
    "make_optimizer",
    "start_run",
    "save_atomic",
    "mean_ci",
    "CHECKPOINT",
    "checkpoint_file",
    "BEST",
]
