"""Fixed test-task sets that represent a family's task distribution, and the statistics over them.

A uniform draw of 40 tasks can be unbalanced by chance (say 8 of 40 goal velocities in the top
third, where about 13 are expected), and a family's returns differ strongly between parts of its
range, so such a draw moves the headline figure. A *balanced* set removes that luck:

- velocity families: the goal range is cut into thirds and each third gets an equal share of the
  tasks, drawn uniformly within it (stratified sampling);
- direction families: half the tasks ask for each direction;
- 2D navigation: goals drawn uniformly from the square (one stratum).

The mean over the task distribution is then estimated by weighting each stratum by its share of
the distribution, ``Σ_h w_h · mean_h``, with the stratified 95% interval
``1.96 · sqrt(Σ_h w_h² · var_h / n_h)``: the spread between strata is fixed by design and does not
widen the interval. With one stratum both reduce to the plain mean and ``1.96 · std / √n``.

``random`` sets are the family's own uniform draw (one stratum), as every evaluation before
balanced sets used; it reproduces those figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .families import MUJOCO

KINDS = ("balanced", "random")
VELOCITY_STRATA = 3


@dataclass(frozen=True)
class TaskSet:
    """``tasks[i]`` belongs to stratum ``stratum[i]``; stratum ``h`` is named ``labels[h]`` and
    makes up the share ``weights[h]`` of the task distribution."""

    tasks: Tensor
    stratum: Tensor
    labels: tuple[str, ...]
    weights: tuple[float, ...]
    kind: str
    seed: int

    def counts(self) -> list[int]:
        return torch.bincount(self.stratum, minlength=len(self.labels)).tolist()

    def describe(self) -> dict:
        """What eval.json records about the set (the tasks themselves go beside it)."""
        return {
            "kind": self.kind,
            "seed": self.seed,
            "strata": list(self.labels),
            "weights": list(self.weights),
            "counts": self.counts(),
            "stratum_of_task": self.stratum.tolist(),
        }


def strata_count(env_name: str, kind: str) -> int:
    """How many strata a set of this kind has for this family."""
    mujoco = MUJOCO.get(env_name)
    if kind == "random" or mujoco is None:
        return 1
    return VELOCITY_STRATA if mujoco.velocity else 2


def _shares(n: int, strata: int) -> list[int]:
    return [n // strata + (h < n % strata) for h in range(strata)]


def make_task_set(env_name: str, family, n: int, seed: int, kind: str = "balanced") -> TaskSet:
    """``n`` tasks of the family from ``seed``. ``family.sample(n, generator)`` gives the random
    draw (and 2D navigation's goals in a balanced set)."""
    if kind not in KINDS:
        raise ValueError(f"task set kind must be one of {KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    mujoco = MUJOCO.get(env_name)
    if kind == "random" or mujoco is None:
        tasks = family.sample(n, g).cpu()
        return TaskSet(tasks, torch.zeros(n, dtype=torch.long), ("all",), (1.0,), kind, seed)
    if mujoco.velocity:
        shares, high = _shares(n, VELOCITY_STRATA), mujoco.high
        parts = [
            (h + torch.rand(c, 1, generator=g, dtype=torch.float64)) / VELOCITY_STRATA for h, c in enumerate(shares)
        ]
        tasks = (torch.cat(parts) * high).float()
        edges = [f"{high * h / VELOCITY_STRATA:.3g}" for h in range(VELOCITY_STRATA + 1)]
        labels = tuple(f"goal {edges[h]}–{edges[h + 1]}" for h in range(VELOCITY_STRATA))
    else:
        shares = _shares(n, 2)
        tasks = torch.cat([torch.full((shares[0], 1), -1.0), torch.full((shares[1], 1), 1.0)])
        labels = ("backward (−x)", "forward (+x)")
    stratum = torch.cat([torch.full((c,), h, dtype=torch.long) for h, c in enumerate(shares)])
    weights = tuple(1.0 / len(shares) for _ in shares)
    return TaskSet(tasks, stratum, labels, weights, kind, seed)


def stratified_mean_ci(values: Tensor, ts: TaskSet) -> tuple[Tensor, Tensor]:
    """The task distribution's mean over dim 0 of ``values`` ``[tasks, ...]``, each stratum weighted
    by its share, and the stratified 95% half-width (nan where a stratum has one task)."""
    values = values.double()
    mean = torch.zeros_like(values[0])
    var = torch.zeros_like(values[0])
    for h, w in enumerate(ts.weights):
        part = values[ts.stratum == h]
        mean = mean + w * part.mean(0)
        n = part.shape[0]
        v = part.var(0, unbiased=True) if n > 1 else torch.full_like(part[0], math.nan)
        var = var + w * w * v / n
    return mean, 1.96 * var.sqrt()


def per_stratum(values: Tensor, ts: TaskSet) -> dict[str, dict]:
    """Mean and 95% half-width within each stratum: ``{label: {"tasks", "returns", "ci95"}}``."""
    out = {}
    for h, label in enumerate(ts.labels):
        part = values[ts.stratum == h].double()
        n = part.shape[0]
        std = part.std(0, unbiased=True) if n > 1 else torch.full_like(part[0], math.nan)
        out[label] = {"tasks": n, "returns": part.mean(0).tolist(), "ci95": (1.96 * std / math.sqrt(n)).tolist()}
    return out
