"""Task distributions: each produces TaskBatch objects with a leading task dimension, on the device."""

from .fewshot import FewShotTasks
from .sinusoid import SinusoidTasks

__all__ = ["FewShotTasks", "SinusoidTasks"]
