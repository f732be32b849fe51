"""Metric logs: a CSV file and TensorBoard, both resumable."""

from __future__ import annotations

import csv
from pathlib import Path


class MetricLog:
    """Rows of ``{"iteration": i, name: value, ...}`` to ``metrics.csv`` and TensorBoard.

    On resume, rows logged after the checkpoint's iteration (by the run that was killed)
    are dropped so the log has each iteration once.
    """

    def __init__(self, run_dir: str | Path, resume_from: int = 0, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        if resume_from and self.path.exists():
            self.rows = [r for r in _read_rows(self.path) if float(r["iteration"]) <= resume_from]
        self._rewrite()
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(
                    str(Path(run_dir) / "tb"), purge_step=resume_from + 1 if resume_from else None
                )
            except ImportError:  # tensorboard is optional at run time; the CSV always exists
                self.writer = None

    def log(self, iteration: int, **values: float) -> None:
        row = {"iteration": iteration, **values}
        self.rows.append(row)
        fields = self._fields()
        if fields != self.header:
            self._rewrite()  # a new column: rewrite with the wider header
        else:  # columns by the file's header, whatever the order of the row's keys
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.header).writerow(row)
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, iteration)

    def _fields(self) -> list[str]:
        fields: list[str] = []
        for r in self.rows:
            fields += [k for k in r if k not in fields]
        return fields

    def _rewrite(self) -> None:
        self.header = self._fields()
        with self.path.open("w", newline="") as f:
            if self.header:
                w = csv.DictWriter(f, fieldnames=self.header)
                w.writeheader()
                w.writerows(self.rows)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in _read_rows(path)]


def _read_rows(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.csv``; a damaged file is named, with what to do."""
    path = Path(path)
    try:
        with path.open() as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            if None in r:
                raise ValueError(f"a row has more cells than the header: {r[None]}")
            for v in r.values():
                if v not in ("", None):
                    float(v)
            float(r["iteration"])
        return rows
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(
            f"{path} is damaged ({type(e).__name__}: {e}); move it aside (the run's checkpoints are intact) "
            "and resume, or repair it by hand"
        ) from None
