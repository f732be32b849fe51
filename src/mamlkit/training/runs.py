"""Run directories: starting one (its config, the thread count), the time limit, writing results."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import config as config_lib
from . import distributed


def start_run(cfg, run_dir: str | Path, resume: bool) -> Path:
    """Create ``run_dir``, save the resolved config in it and apply ``train.threads``; refuse to
    reuse a run's directory without ``resume`` (its config and checkpoints stay as they were)."""
    run_dir = Path(run_dir)
    if distributed.broadcast((run_dir / "config.yaml").exists()) and not resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or --out for a new one")
    if distributed.is_main():  # under torchrun, rank 0 alone writes the run's files
        run_dir.mkdir(parents=True, exist_ok=True)
        config_lib.dump(cfg, run_dir / "config.yaml")
    distributed.barrier()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    return run_dir


def deadline(time_limit: float) -> float:
    """The ``time.monotonic()`` value at which a run with ``train.time_limit`` seconds stops
    (shared by all the models a run trains); infinity for no limit."""
    return time.monotonic() + time_limit if time_limit else float("inf")


def read_eval(run_dir: str | Path) -> dict:
    """A run's ``eval.json``, with a message saying how to make it when it is missing."""
    path = Path(run_dir) / "eval.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run `mamlkit eval {run_dir}` first")
    return json.loads(path.read_text())


def write_eval(run_dir: str | Path, results: dict, table: str) -> None:
    """A run's evaluation: ``eval.json`` (everything) and ``eval.md`` (the table)."""
    run_dir = Path(run_dir)
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    (run_dir / "eval.md").write_text(table)
