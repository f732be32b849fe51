"""Checkpoints: written atomically (a crash mid-write never leaves a broken file), checked
for their schema when read, and loaded into a model with a sentence when they do not fit it."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .files import write_file


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it."""
    write_file(path, lambda f: torch.save(obj, f))


# What every checkpoint holds, and what a training checkpoint (not best.pt) adds.
_SCHEMA = {"iteration": int, "learner": dict}
_TRAINING = {"rng": dict}


def load(path: str | Path, map_location="cpu", training: bool = False, mmap: bool = False) -> dict:
    """A checkpoint's contents, checked for the keys mamlkit writes (``training``: those a resume
    needs too); a file that cannot be read or lacks them raises ``CorruptCheckpoint``. ``mmap``
    maps the tensors instead of reading them: for a look at the config or the schema only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}; train first with `mamlkit train ... --out {path.parent.parent}`"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:  # a truncated or foreign file
        raise CorruptCheckpoint(
            f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
            "it was cut short or is not a mamlkit checkpoint"
        ) from e
    problem = _schema_problem(state, {**_SCHEMA, **(_TRAINING if training else {})})
    if problem:
        raise CorruptCheckpoint(f"checkpoint {path} is not a mamlkit checkpoint as written: {problem}")
    return state


def _schema_problem(state: Any, schema: dict[str, type]) -> str | None:
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    for key, kind in schema.items():
        if key not in state:
            return f"it has no '{key}'"
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            return f"its '{key}' is a {type(state[key]).__name__}, not a {kind.__name__}"
    if state["iteration"] < 0:
        return f"its iteration is {state['iteration']}"
    bad = [k for k, v in state["learner"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        return f"its weights {bad[:3]} are not tensors"
    if "config" in state and not isinstance(state["config"], dict):
        return f"its 'config' is a {type(state['config']).__name__}, not a dict"
    return None


def load_weights(module: nn.Module, state: dict, path: str | Path) -> None:
    """``module.load_state_dict(state["learner"])``, refused with a sentence naming ``path`` when the
    checkpoint's weights are not this model's (other names or shapes)."""
    try:
        module.load_state_dict(state["learner"])
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CorruptCheckpoint(
            f"checkpoint {path} does not fit the model its run's config builds ({detail[:400]}); "
            "it comes from another run or another version of the config"
        ) from None


class CorruptCheckpoint(RuntimeError):
    """A checkpoint file that exists but cannot be read or used; callers add what to do about it."""


def resume_advice(model: str) -> str:
    """What to do about a checkpoint that ``--resume`` cannot use (appended to the problem)."""
    return (
        f". --resume cannot continue from it; deleting it would restart {model} from iteration 0. "
        "Restore the file from a copy, or train a new run with --out"
    )


def rng_state(generator: torch.Generator | None = None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["tasks"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None, reseed: int = 0) -> bool:
    """Restore the random-number state; False when the task generator's saved state is of another
    device type (a run resumed on a CPU after a GPU, say): the generator is then seeded with
    ``reseed`` instead, since one device's stream cannot continue on another."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "tasks" in state:
        try:
            generator.set_state(state["tasks"])
        except RuntimeError:
            generator.manual_seed(reseed)
            return False
    return True
