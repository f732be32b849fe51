"""The paper's experiments: each module offers train(cfg, run_dir), evaluate(run_dir) and plot(run_dir)."""

from importlib import import_module


def get(name: str):
    """The experiment module for a config's ``experiment`` key."""
    return import_module(f"{__name__}.{name}")
