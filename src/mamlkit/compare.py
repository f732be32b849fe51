"""Runs side by side (``mamlkit compare``): a validation metric against meta-iterations and against
training time, and a table of each run's length, time and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from . import plots
from .experiments import step_cells, steps_label
from .training.files import write_file
from .training.metrics import read_metrics
from .training.runs import devices, eval_stem


class CompareError(ValueError):
    """A run that cannot be compared, with the reason and the fix."""


def training_hours(rows: list[dict]) -> list[float]:
    """Training time (hours) at each row of a ``metrics.csv``: a row covers the iterations since the
    previous one at its ``its_per_s``, which leaves out validation, logging and the time between a
    stop and its resume."""
    total, prev, out = 0.0, 0, []
    for r in rows:
        if r.get("its_per_s"):
            total += (r["iteration"] - prev) / r["its_per_s"]
        prev = r["iteration"]
        out.append(total / 3600)
    return out


def read_run(run_dir: Path, key: str, name: str | None = None) -> dict:
    """What the comparison needs of one run: its curve of ``key``, length, time, config and evaluation."""
    metrics = run_dir / "metrics.csv"
    if not metrics.exists():
        hint = " (an RL run keeps one log per model: compare RUN/maml, RUN/oracle, ...)" if any(
            (p / "metrics.csv").exists() for p in run_dir.iterdir() if p.is_dir()
        ) else ""
        raise CompareError(f"{run_dir} has no metrics.csv: give the directories `mamlkit train --out` wrote{hint}")
    rows = read_metrics(metrics)
    hours = training_hours(rows)
    curve = [(r["iteration"], h, r[key]) for r, h in zip(rows, hours) if key in r]
    if not curve:
        raise CompareError(
            f"{metrics} logs no {key!r}: choose a column it has with --key "
            f"({', '.join(sorted({k for r in rows for k in r} - {'iteration'}))})"
        )
    config = run_dir / "config.yaml"
    if not config.exists():  # a metrics.csv of one model inside an RL run: the config is one level up
        config = run_dir.parent / "config.yaml"
    cfg = (yaml.safe_load(config.read_text()) if config.exists() else None) or {}
    evaluation = run_dir / f"{eval_stem(name)}.json"
    return {
        "curve": curve,
        "iterations": rows[-1]["iteration"],  # rows is not empty: the curve has a row
        "hours": hours[-1],
        "config": cfg,
        "devices": devices(config.parent, str(cfg.get("train", {}).get("device", "auto"))),
        "eval": json.loads(evaluation.read_text()) if evaluation.exists() else None,
    }


def _devices_label(run: dict) -> str:
    return ", then ".join(run["devices"])


def _test_cell(run: dict, steps: int | None) -> str:
    """A few-shot evaluation's accuracy (the paper's query protocol) after ``steps`` inner steps
    (None: the run's own training steps), ± its 95% interval."""
    ev = run["eval"]
    if not ev or "protocols" not in ev:
        return "–"
    protocol = ev["protocols"].get("paper") or next(iter(ev["protocols"].values()))
    if steps is None:
        steps = int(run["config"].get("maml", {}).get("inner_steps", 1))
    (cell,) = step_cells(protocol["acc"], protocol["ci95"], [steps], 2)
    if steps >= len(protocol["acc"]):
        return f"{cell} (evaluated to {len(protocol['acc']) - 1} steps)"
    return f"{cell} ({steps_label(steps)})"


def compare(
    run_dirs: list[str | Path],
    out: str | Path,
    labels: list[str] | None = None,
    key: str = "val_acc",
    name: str | None = None,
    steps: int | None = None,
) -> list[Path]:
    """Draw ``key`` of every run against meta-iterations and training hours into ``out`` and write
    ``out/compare.md``; returns the files written. ``name`` picks ``eval-NAME.json`` over ``eval.json``;
    the table gives test accuracy after ``steps`` inner steps (None: each run's training steps)."""
    import matplotlib.pyplot as plt

    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise CompareError(f"{d} is not a run directory (`mamlkit train --out DIR` makes one)")
    labels = labels or [d.name for d in dirs]
    if len(labels) != len(dirs):
        raise CompareError(f"--labels gives {len(labels)} labels for {len(dirs)} runs: give one per run, in order")
    runs = {label: read_run(d, key, name) for label, d in zip(labels, dirs)}
    out = Path(out)
    percent = key.endswith("acc")  # accuracies are logged as fractions, shown in percent
    scale, ylabel = (100, f"{key} (%)") if percent else (1, key)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for label, run in runs.items():
        its, hours, values = zip(*run["curve"])
        marker = "o" if len(values) < 20 else None
        axes[0].plot(its, [scale * v for v in values], marker=marker, ms=3, label=label)
        moved = f" ({_devices_label(run)})" if len(run["devices"]) > 1 else ""
        axes[1].plot(hours, [scale * v for v in values], marker=marker, ms=3, label=label + moved)
    axes[0].set_xlabel("meta-iteration")
    axes[1].set_xlabel("training time (h; validation excluded)")
    axes[0].set_ylabel(ylabel)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    written = [plots.save(fig, out / f"{key}.png")]
    lines = [
        f"| run | directory | meta-iterations | training time (h) | best {key} (iteration) | last {key} | "
        "test accuracy % (paper query, ± 95% CI) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (label, run), d in zip(runs.items(), dirs):
        best = max(run["curve"], key=lambda c: c[2])
        last = run["curve"][-1]
        lines.append(
            f"| {label} | {d} | {run['iterations']} | {run['hours']:.2f} | {scale * best[2]:.2f} ({best[0]}) | "
            f"{scale * last[2]:.2f} | {_test_cell(run, steps)} |"
        )
    for label, run in runs.items():
        if len(run["devices"]) > 1:  # its training time is a sum over machines: not comparable as it stands
            lines.append(
                f"\n{label} trained on {_devices_label(run)} (resumed on another device, run.log): "
                "its training time adds the time on each, so compare it by iterations."
            )
    table = "\n".join(lines) + "\n"
    md = out / "compare.md"
    write_file(md, table)
    written.append(md)
    return written
