"""The paper's experiments: each module offers ``train(cfg, run_dir)``, ``evaluate(run_dir)`` and
``plot(run_dir)``, and only wires data, learner and outer update together."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from ..config import kwargs_for
from ..training import checkpoint as ckpt
from .configs import CONFIGS, build_config, load_config, override_eval

__all__ = ["CONFIGS", "build_config", "load_config", "override_eval", "get", "build_maml", "load_run"]


def get(name: str):
    """The experiment module for a config's ``experiment`` key."""
    if name not in CONFIGS:
        raise ValueError(f"experiment: {name!r} unknown; choose from {sorted(CONFIGS)}")
    return import_module(f"{__name__}.{name}")


def build_maml(model, loss_fn, cfg, **overrides):
    """``MAML`` with the options of a ``maml:`` config section (``overrides`` win)."""
    from ..engine import MAML

    return MAML(model, loss_fn, **{**kwargs_for(MAML, cfg), **overrides})


def load_run(checkpoint: str | Path, device: str | None = None, overrides: list[str] = ()) -> tuple[object, dict]:
    """A trained model's checkpoint and the config it was trained with, read once: returns
    ``(cfg, state)`` with ``eval.*`` ``overrides`` applied, ``device`` (if given) as the device,
    and compilation off (evaluation shapes vary; compiling them costs more than it saves).
    The caller builds its learner from ``cfg`` and loads ``state["learner"]`` into it."""
    state = ckpt.load(checkpoint)
    cfg = override_eval(build_config(state["config"]), overrides)
    if device:
        cfg.train.device = device
    cfg.maml.compile = cfg.maml.cuda_graphs = False
    return cfg, state
