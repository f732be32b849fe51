"""Checkpoints written atomically (a crash mid-write never leaves a broken file)."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}; train first with `mamlkit train ... --out {path.parent.parent}`"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise CorruptCheckpoint(
            f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
            "it was cut short or is not a mamlkit checkpoint"
        ) from e


class CorruptCheckpoint(RuntimeError):
    """A checkpoint file that exists but cannot be read; callers add what to do about it."""


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
