"""Figures: learning curves from metric logs and metric-against-steps curves with 95% CIs."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .training.files import write_file  # noqa: E402
from .training.metrics import read_metrics  # noqa: E402


def training_curves(
    run_dirs: dict[str, Path],
    path: Path,
    key: str = "loss",
    logy: bool = True,
    ylabel: str | None = None,
    scale: float = 1.0,
) -> Path:
    """``key`` (times ``scale``: 100 for a fraction shown in percent) against iteration, one line
    per labelled run directory holding ``metrics.csv``; ``ylabel`` names it (default: ``key``)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, d in run_dirs.items():
        rows = [r for r in read_metrics(Path(d) / "metrics.csv") if key in r]
        # Markers where a short run logged only a few rows: a single point is no line.
        ax.plot(
            [r["iteration"] for r in rows],
            [scale * r[key] for r in rows],
            marker="o" if len(rows) < 20 else None,
            label=label,
        )
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(ylabel or key)
    if logy:
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    return save(fig, path)


def steps_curves(
    ax,
    series: dict[str, tuple[list, list]],
    ylabel: str,
    reference: dict[str, list] | None = None,
    legend: dict | None = None,
) -> None:
    """Mean ± 95% CI against gradient steps; a single-point series is drawn as a flat line.
    ``reference``: published values of some series (None where not given), dotted in the
    series' colour and labelled "(paper)". ``legend``: keyword arguments for ``ax.legend``."""
    reference = reference or {}
    for label, (mean, ci) in series.items():
        # eval.json writes an undefined number (a one-task interval, a diverged mean) as null
        mean, ci = ([math.nan if v is None else v for v in xs] for xs in (mean, ci))
        ref = reference.get(label)
        if len(mean) == 1:
            ax.axhline(mean[0], ls="--", color="k", label=label)
            if ref and ref[0] is not None:
                ax.axhline(ref[0], ls=":", color="k", label=f"{label} (paper)")
            continue
        steps = list(range(len(mean)))
        line = ax.plot(steps, mean, marker="o", ms=3, label=label)[0]
        ax.fill_between(
            steps,
            [m - c for m, c in zip(mean, ci)],
            [m + c for m, c in zip(mean, ci)],
            color=line.get_color(),
            alpha=0.2,
        )
        if ref:
            known = [(i, v) for i, v in enumerate(ref[: len(mean)]) if v is not None]
            ax.plot(*zip(*known), ls=":", marker="x", ms=4, color=line.get_color(), label=f"{label} (paper)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of gradient steps")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(**(legend or {}))


def save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    try:
        write_file(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=120))
    finally:
        plt.close(fig)
    return path
