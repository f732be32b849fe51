"""The paper's experiments: each module offers ``train(cfg, run_dir)``, ``evaluate(run_dir)`` and
``plot(run_dir)``, and only wires data, learner and outer update together."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from importlib import import_module
from pathlib import Path

import torch

from ..config import kwargs_for, to_dict
from ..engine import MAML
from ..training import CHECKPOINT, Trainer, start_run
from ..training import checkpoint as ckpt
from ..training.loop import kept_checkpoint, kept_iterations
from ..training.runs import deadline, reconcile, run_config
from .configs import CONFIGS, build_config, load_config, override_eval

__all__ = [
    "CONFIGS",
    "build_config",
    "load_config",
    "override_eval",
    "get",
    "build_maml",
    "load_run",
    "trained_models",
    "step_cells",
    "steps_label",
]


def get(name: str):
    """The experiment module for a config's ``experiment`` key."""
    if name not in CONFIGS:
        raise ValueError(f"experiment: {name!r} unknown; choose from {sorted(CONFIGS)}")
    return import_module(f"{__name__}.{name}")


def build_maml(model, loss_fn, cfg, **overrides):
    """``MAML`` with the options of a ``maml:`` config section (``overrides`` win)."""
    return MAML(model, loss_fn, **{**kwargs_for(MAML, cfg), **overrides})


def trained_models(
    run_dir: str | Path,
    known: Iterable[str],
    chosen: Sequence[str] | None = None,
    iteration: int | None = None,
    untrained: Sequence[str] = (),
) -> list[str]:
    """The models of a run to evaluate, in ``known``'s order: ``chosen`` (each must have a
    checkpoint), or every model the run's config lists, refused if any has no checkpoint, so an
    evaluation never silently leaves a model out. With ``iteration``: the checkpoints kept of it,
    except for the ``untrained`` models, which are the same at every iteration."""
    run_dir = Path(run_dir)
    listed = run_config(run_dir, build_config).get("models", [])

    def file(k: str) -> Path:
        at = None if k in untrained else iteration
        return run_dir / k / CHECKPOINT if at is None else kept_checkpoint(run_dir / k, at)

    present = [k for k in known if file(k).exists()]
    wanted = list(chosen) if chosen else listed
    absent = [k for k in wanted if k not in present]
    if absent or not present:
        others = f"--models {','.join(present) or 'NAME'}"
        if iteration is not None:
            kept = {k: kept_iterations(run_dir / k) for k in absent or wanted}
            raise FileNotFoundError(
                f"{run_dir}: no checkpoint of iteration {iteration} was kept for {absent or wanted} "
                f"(kept: {kept}); choose a kept iteration, or evaluate the others with {others}"
            )
        if chosen:
            raise FileNotFoundError(f"{run_dir}: no checkpoint for {absent}; trained models here: {present}")
        raise FileNotFoundError(
            f"{run_dir}: the run lists models {listed} but {absent or listed} have no checkpoint "
            f"({run_dir}/<model>/{CHECKPOINT}); finish training with `mamlkit train ... --out {run_dir} --resume`, "
            f"or evaluate the others with {others}"
        )
    return [k for k in known if k in chosen] if chosen else present


def train_models(
    cfg, run_dir, resume: bool, progress: bool, changes: dict | None, build, only: list[str] | None = None, **options
) -> bool:
    """Train each model of ``cfg.models`` (those in ``only``, if given) into ``run_dir/<model>/``
    in turn, model ``i`` of ``cfg.models`` seeded with ``train.seed + i`` (its initialisation, then
    its task stream from ``seed + 100``), all under one time limit. A model trained alone with
    ``only``, in its own process, is the one the whole run would train. ``build(model)`` returns
    ``(learner, update, trainer options)``; ``options`` go to every model's ``Trainer``. False if
    training stopped early."""
    kinds = [k for k in cfg.models if only is None or k in only]
    run_dir = start_run(cfg, run_dir, resume, changes, models=kinds)
    t = cfg.train
    stop_at = deadline(t.time_limit)
    for n, kind in enumerate(kinds):
        if n and time.monotonic() > stop_at:  # the time is up: no next model, not even one iteration
            print(f"time limit reached before {kind}; --resume continues")
            return False
        seed = t.seed + cfg.models.index(kind)
        torch.manual_seed(seed)
        learner, update, own = build(kind)
        trainer = Trainer(
            run_dir / kind,
            learner,
            update,
            torch.Generator(t.device).manual_seed(seed + 100),
            **{"iterations": t.iterations, **options, **own},
            checkpoint_every=t.checkpoint_every,
            keep_every=t.keep_every,
            log_every=t.log_every,
            metadata={"kind": kind, "config": to_dict(cfg)},
            deadline=stop_at,
            name=kind,
            nonfinite=t.nonfinite,
            wandb=t.wandb,
        )
        if not trainer.fit(resume=resume, progress=progress):
            return False
    return True


def steps_label(steps: int) -> str:
    """A table's column name for ``steps`` gradient steps: "0 steps", "1 step", "2 steps"."""
    return f"{steps} step" if steps == 1 else f"{steps} steps"


def step_cells(mean: Sequence[float], ci: Sequence[float], steps_shown: Sequence[int], digits: int) -> list[str]:
    """Table cells ``mean ± ci`` after each of ``steps_shown`` gradient steps; "–" for a step
    count that was not run (never the last value repeated)."""
    return [f"{mean[s]:.{digits}f} ± {ci[s]:.{digits}f}" if s < len(mean) else "–" for s in steps_shown]


def load_run(
    checkpoint: str | Path, run_dir: str | Path, device: str | None = None, overrides: list[str] = ()
) -> tuple[object, dict]:
    """A trained model's checkpoint and the config it was trained with, read once: returns
    ``(cfg, state)`` with the settings a resume may change as ``run_dir``'s config.yaml has them
    now, ``eval.*`` ``overrides`` applied, ``device`` (if given) as the device, and compilation
    off (evaluation shapes vary; compiling them costs more than it saves). The caller builds its
    learner from ``cfg`` and loads ``state["learner"]`` into it."""
    state = ckpt.load(checkpoint)
    if not isinstance(state.get("config"), dict):
        raise ckpt.CorruptCheckpoint(
            f"checkpoint {checkpoint} holds no config: it was not written by `mamlkit train`, so nothing says "
            "which model and settings it belongs to"
        )
    # The run's record (config.yaml checked against its latest checkpoints), then this checkpoint
    # (a kept one, best.pt) checked against it: a checkpoint of another run is refused.
    current = Path(run_dir) / "config.yaml"
    raw = reconcile(current, run_config(run_dir, build_config), state["config"], Path(checkpoint), build_config)
    cfg = override_eval(build_config(raw), overrides)
    if device:
        cfg.train.device = device
    cfg.maml.compile = cfg.maml.cuda_graphs = False
    return cfg, state
