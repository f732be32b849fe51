"""The MAML engine: inner loop and meta-gradient over a functional view of any nn.Module."""

from .errors import NonFinite
from .functional import FunctionalModel, Params, select_names
from .maml import MAML, TaskBatch
from .strategies import STRATEGIES, map_tasks, vmap_unsafe_modules, vmap_unsafe_ops

__all__ = [
    "MAML",
    "TaskBatch",
    "FunctionalModel",
    "Params",
    "select_names",
    "map_tasks",
    "STRATEGIES",
    "vmap_unsafe_modules",
    "vmap_unsafe_ops",
    "NonFinite",
]
