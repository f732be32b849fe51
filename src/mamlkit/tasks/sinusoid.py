"""Sinusoid regression tasks: y = A sin(x - phi) (the paper's Section 5.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..engine import TaskBatch


@dataclass
class SinusoidTasks:
    """The task distribution. All tensors are made on ``device`` from the caller's generator.

    ``oracle=True`` appends (A, phi) to every input, giving the paper's oracle baseline
    its knowledge of the task (inputs become 3-dimensional).
    """

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    device: str | torch.device = "cpu"
    oracle: bool = False

    @property
    def input_dim(self) -> int:
        return 3 if self.oracle else 1

    def sample_params(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Amplitudes and phases of ``n`` tasks, each ``[n]``."""
        return self._uniform((n,), self.amplitude, generator), self._uniform((n,), self.phase, generator)

    def sample_points(self, amp: Tensor, phase: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``k`` points of each task: inputs ``[n, k, input_dim]``, targets ``[n, k, 1]``."""
        x = self._uniform((amp.shape[0], k, 1), self.x_range, generator)
        return self.inputs(x, amp, phase), self.targets(x, amp, phase)

    def inputs(self, x: Tensor, amp: Tensor, phase: Tensor) -> Tensor:
        if not self.oracle:
            return x
        n, k, _ = x.shape
        return torch.cat([x, amp.view(n, 1, 1).expand(n, k, 1), phase.view(n, 1, 1).expand(n, k, 1)], dim=-1)

    @staticmethod
    def targets(x: Tensor, amp: Tensor, phase: Tensor) -> Tensor:
        return amp.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))

    def batch(self, n: int, k_support: int, k_query: int, generator: torch.Generator) -> TaskBatch:
        """``n`` fresh tasks with disjoint support and query points."""
        amp, phase = self.sample_params(n, generator)
        x, y = self.sample_points(amp, phase, k_support + k_query, generator)
        return TaskBatch(x[:, :k_support], y[:, :k_support], x[:, k_support:], y[:, k_support:])

    def _uniform(self, shape, bounds, generator) -> Tensor:
        low, high = bounds
        return torch.rand(shape, generator=generator, device=self.device) * (high - low) + low
