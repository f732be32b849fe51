"""The paper's networks."""

from .layers import BatchNorm
from .mlp import mlp

__all__ = ["BatchNorm", "mlp"]
