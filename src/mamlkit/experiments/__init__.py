"""The paper's experiments: each module offers train(cfg, run_dir), evaluate(run_dir) and plot(run_dir)."""

from importlib import import_module


def get(name: str):
    """The experiment module for a config's ``experiment`` key."""
    return import_module(f"{__name__}.{name}")


def build_maml(model, loss_fn, cfg, **overrides):
    """``MAML`` with the options of a ``maml:`` config section (``overrides`` win)."""
    from ..engine import MAML

    options = dict(
        inner_lr=cfg.inner_lr,
        inner_steps=cfg.inner_steps,
        first_order=cfg.first_order,
        adapt=cfg.adapt,
        learn_inner_lr=cfg.learn_inner_lr,
        strategy=cfg.strategy,
        compile=cfg.compile,
        cuda_graphs=cfg.cuda_graphs,
        checkpoint_inner=cfg.checkpoint_inner,
        autocast=cfg.autocast,
    )
    return MAML(model, loss_fn, **{**options, **overrides})
