"""mamlkit: Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, 2017) on torch.func."""

from .engine import MAML, TaskBatch

__version__ = "0.1.0"
__all__ = ["MAML", "TaskBatch", "__version__"]
