"""Metric logs: a CSV file and TensorBoard, both resumable.

``metrics.csv`` is append-only: each row is one write, fsynced, cut back off if the write fails.
It is rewritten (atomically, ``files.write_file``) only when a row brings a new column, and on a
resume that drops rows written after the checkpoint. A resume checks the file as a whole: a
damaged tail (a row cut mid-line by a kill, say) is reported and cut back, never kept as data;
damage before the tail, or a log that ends well before the checkpoint (rows lost), is refused.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from pathlib import Path

from .files import append_text, write_file


class DamagedLog(ValueError):
    """A ``metrics.csv`` that cannot be continued as it is; the message says what to do."""


class MetricLog:
    """Rows of ``{"iteration": i, name: value, ...}`` to ``metrics.csv`` and TensorBoard.

    On resume from iteration ``resume_from``, rows logged after it (by the run that was killed) and
    a damaged tail are dropped, so that the log has each iteration once and only real rows.
    ``log_every`` bounds how far before the checkpoint the log may end (logs written before every
    checkpoint ended a row); a log that ends earlier has lost rows and is refused.
    """

    def __init__(
        self,
        run_dir: str | Path,
        resume_from: int = 0,
        tensorboard: bool = True,
        log_every: int | None = None,
        wandb_project: str | None = None,
        name: str = "",
        config: dict | None = None,
    ):
        self.path = Path(run_dir) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.header: list[str] = []
        if resume_from and self.path.exists():
            header, rows, torn = check_log(self.path, resume_from, log_every)
            self.rows = [r for r in rows if r["iteration"] <= resume_from]
            if torn:
                print(
                    f"note: {self.path}: {torn} damaged at its end (cut by a kill mid-write?) and was cut back; "
                    f"the log continues from iteration {resume_from}, the checkpoint's"
                )
            self.header = header
            if len(self.rows) != len(rows) or torn:
                self._rewrite()
        elif resume_from:
            print(f"note: {self.path} is missing; the log starts again at iteration {resume_from}")
        else:
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
        self.wandb = _wandb_run(Path(run_dir), wandb_project, name, config) if wandb_project else None

    def log(self, iteration: int, **values: float) -> None:
        row = {"iteration": iteration, **values}
        self.rows.append(row)
        fields = _fields(self.rows)
        if fields != self.header:
            self._rewrite()  # a new column: rewrite with the wider header
        else:  # columns by the file's header, whatever the order of the row's keys
            append_text(self.path, _csv([row], self.header, with_header=False))
        if self.writer is not None:
            try:
                for k, v in values.items():
                    self.writer.add_scalar(k, v, iteration)
            except Exception as e:  # TensorBoard is a view of the log: losing it must not stop training
                self._drop_tensorboard(e)
        if self.wandb is not None:
            try:
                self.wandb.log({"iteration": iteration, **values}, step=iteration)
            except Exception as e:  # so is W&B
                print(f"note: Weights & Biases logging stopped ({type(e).__name__}: {e}); {self.path.name} goes on")
                self.wandb = None

    def _drop_tensorboard(self, e: Exception) -> None:
        print(
            f"note: TensorBoard logging into {self.path.parent / 'tb'} stopped ({type(e).__name__}: {e}); "
            f"training and {self.path.name} go on"
        )
        writer, self.writer = self.writer, None
        with contextlib.suppress(Exception):
            writer.close()

    def _rewrite(self) -> None:
        header = _fields(self.rows) if self.rows else self.header
        write_file(self.path, _csv(self.rows, header, with_header=True) if header else "")
        self.header = header

    def close(self) -> None:
        if self.wandb is not None:
            with contextlib.suppress(Exception):
                self.wandb.finish()
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as e:
                self._drop_tensorboard(e)


WANDB_ID = "wandb-id"  # the W&B run of a model directory, so that a resume continues it


def _wandb_run(run_dir: Path, project: str, name: str, config: dict | None):
    """A W&B run for the model trained in ``run_dir``, resumed if an earlier start made one. Rows a
    killed run logged after its last checkpoint stay in W&B (it cannot delete them), unlike in
    metrics.csv and TensorBoard."""
    import wandb

    id_path = run_dir / WANDB_ID
    run_id = id_path.read_text().strip() if id_path.exists() else wandb.util.generate_id()
    if not id_path.exists():
        write_file(id_path, run_id)
    return wandb.init(
        project=project, id=run_id, resume="allow", name=f"{run_dir.parent.name}/{name}" if name else None,
        config=config, dir=str(run_dir),
    )  # fmt: skip


def check_log(path: Path, resume_from: int, log_every: int | None = None) -> tuple[list[str], list[dict], str]:
    """``metrics.csv`` checked for a resume from iteration ``resume_from``: ``(header, rows, torn)``
    as :func:`_parse` gives them; ``DamagedLog`` if it is damaged before its tail, or if it ends
    before the checkpoint by more than ``log_every`` (rows were lost)."""
    header, rows, torn = _parse(path)
    kept = [r["iteration"] for r in rows if r["iteration"] <= resume_from]
    last = kept[-1] if kept else 0
    if last < resume_from - (log_every or 1) + 1 and last != resume_from:
        what = f"is damaged at its end ({torn}), and before that it " if torn else ""
        raise DamagedLog(
            f"{path} {what}ends at iteration {last:g} but the checkpoint is of iteration {resume_from}: the rows "
            "in between were lost (the file was cut short or replaced). Restore it from a copy, or move it aside "
            f"(the run's checkpoints are intact) to resume with a log that starts at iteration {resume_from}"
        )
    return header, rows, torn


def _fields(rows: list[dict]) -> list[str]:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    return fields


def _csv(rows: list[dict], fields: list[str], with_header: bool) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=fields)
    if with_header:
        w.writeheader()
    w.writerows(rows)
    return out.getvalue()


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The rows of a ``metrics.csv`` (a row being written at its end, or torn off, is left out)."""
    return [{k: v for k, v in r.items() if v is not None} for r in _parse(path)[1]]


def _parse(path: Path) -> tuple[list[str], list[dict], str]:
    """``(header, rows, torn)``: the valid rows with their numbers (a missing cell as None), and a
    description of the damaged rows at the end that were left out ("" if none). Damage followed
    by valid rows is not a torn tail: ``DamagedLog``, naming the line."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode().splitlines(keepends=True)
    except UnicodeDecodeError as e:
        raise DamagedLog(_damaged(path, f"it is not text ({e})")) from None
    if not lines:
        return [], [], ""
    header = next(csv.reader([lines[0]]))
    if not lines[0].endswith("\n") or not header or "iteration" not in header or len(set(header)) != len(header):
        if len(lines) == 1:  # the header itself was cut: no row was written after it
            return [], [], "its header line"
        raise DamagedLog(_damaged(path, f"its header {lines[0].strip()!r} is not mamlkit's"))
    rows, bad = [], []
    for n, line in enumerate(lines[1:], start=2):
        problem = _row_problem(line, header, rows[-1]["iteration"] if rows else None)
        if problem:
            bad.append((n, problem))
            continue
        if bad:  # a valid row after damaged ones: the damage is not a cut end
            n0, why = bad[0]
            raise DamagedLog(_damaged(path, f"line {n0} {why}"))
        row = dict(zip(header, (_number(c) for c in next(csv.reader([line])))))
        row["iteration"] = int(row["iteration"])
        rows.append(row)
    torn = ""
    if bad:
        torn = f"{len(bad)} row{'s' if len(bad) > 1 else ''} from line {bad[0][0]} ({bad[0][1]})"
    return header, rows, torn


def _row_problem(line: str, header: list[str], previous: float | None) -> str | None:
    if not line.endswith("\n"):
        return "ends without a line break"
    cells = next(csv.reader([line]), [])
    if len(cells) != len(header):
        return f"has {len(cells)} cells, the header {len(header)}"
    for name, c in zip(header, cells):
        if c != "" and _number(c) is None:
            return f"has {c!r} as {name}"
    it = _number(cells[header.index("iteration")])
    if it is None or not it.is_integer() or it < 0:
        return f"has no iteration ({cells[header.index('iteration')]!r})"
    if previous is not None and it <= previous:
        return f"has iteration {it:g} after {previous:g}"
    return None


def _number(cell: str) -> float | None:
    try:
        v = float(cell)
    except ValueError:
        return None
    return v if not math.isinf(v) or cell.strip().lower().lstrip("+-") in ("inf", "infinity") else None


def _damaged(path: Path, what: str) -> str:
    return (
        f"{path} is damaged: {what}; move it aside (the run's checkpoints are intact) and resume, "
        "or repair it by hand"
    )
