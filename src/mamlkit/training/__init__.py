"""Training and evaluation machinery shared by every experiment."""

from .checkpoint import save_atomic
from .stats import mean_ci
from .trainer import RunExistsError, Trainer

__all__ = ["Trainer", "RunExistsError", "save_atomic", "mean_ci"]
