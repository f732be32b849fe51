"""Faults injected at every kind of write a run makes, in real processes: a kill (SIGKILL) and a
full disk (ENOSPC) in the middle of each, a file-size limit, a real full filesystem.

The rule they check: whatever was written before is still there and readable, a failed write is
a sentence naming the file, and the same command (``--resume`` once a run exists) then finishes
with exactly the result of a run that was never interrupted. ``tests/faultinject.py`` runs the
command with the fault at the k-th write."""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from mamlkit.training.metrics import read_metrics

pytestmark = pytest.mark.slow  # real processes, many of them: the full suite only

HOOK = Path(__file__).with_name("faultinject.py")
TRAIN = [
    "train", "sinusoid", "--out", "run", "--quiet", "--set", "models=[maml,pretrained]", "--set", "maml.strategy=vmap",
    "--set", "maml.compile=false", "--set", "train.threads=1", "--set", "train.iterations=4",
    "--set", "train.checkpoint_every=2", "--set", "train.log_every=1",
]  # fmt: skip
EVAL = ["eval", "run", "--set", "eval.num_tasks=4", "--set", "eval.shots=[5]", "--set", "eval.tune_tasks=2"]
MODELS = ("maml", "pretrained")


def run(
    cwd: Path, args: list[str], mode: str = "count", at: int = 0, events: Path | None = None, **kwargs
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"FAULT_EVENTS": str(events)} if events else {})}
    cmd = [sys.executable, str(HOOK), mode, str(at), str(cwd / "run"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def record(run_dir: Path) -> dict:
    """What a finished run holds that must not depend on how often it was interrupted."""
    out = {"config": (run_dir / "config.yaml").read_text()}
    for m in MODELS:
        state = torch.load(run_dir / m / "checkpoint.pt", weights_only=False)
        out[m] = (state["iteration"], {k: v.clone() for k, v in state["learner"].items()})
        out[f"{m} metrics"] = [(r["iteration"], r["loss"]) for r in read_metrics(run_dir / m / "metrics.csv")]
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (a[k][0] == b[k][0] and all(torch.equal(a[k][1][n], b[k][1][n]) for n in a[k][1]))
        if k in MODELS
        else a[k] == b[k]
        for k in a
    )


def readable(run_dir: Path) -> None:
    """Every file of the run that exists can be read as what it is."""
    from mamlkit.config import load_raw

    if (run_dir / "config.yaml").exists():
        load_raw(str(run_dir / "config.yaml"))
    for m in MODELS:
        for name in ("checkpoint.pt", "best.pt"):
            if (run_dir / m / name).exists():
                torch.load(run_dir / m / name, weights_only=False)
    for path in run_dir.glob("eval*.json"):
        json.loads(path.read_text())
    for path in run_dir.glob("plots/*.png"):
        Image.open(path).verify()


def kinds(events: list[str]) -> dict[str, list[int]]:
    """Event numbers (1-based) by kind: the operation and the file, its process-specific temporary
    name made generic."""
    out: dict[str, list[int]] = {}
    for k, e in enumerate(events, start=1):
        out.setdefault(re.sub(r"\.\d+\.\d+\.tmp$", ".tmp", e), []).append(k)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, its events, and its evaluation."""
    cwd = tmp_path_factory.mktemp("reference")
    assert run(cwd, TRAIN, events=cwd / "train.txt").returncode == 0
    assert run(cwd, EVAL, events=cwd / "eval.txt").returncode == 0
    train_events, eval_events = ((cwd / f"{c}.txt").read_text().splitlines() for c in ("train", "eval"))
    return cwd, train_events, eval_events


def _strike_and_recover(tmp_path: Path, k: int, mode: str, want: dict) -> str:
    cwd = tmp_path / f"{mode}-{k}"
    cwd.mkdir()
    hit = run(cwd, TRAIN, mode, k)
    problems = []
    if mode == "kill" and hit.returncode != -signal.SIGKILL:
        problems.append(f"not killed (exit {hit.returncode}): {hit.stderr[-500:]}")
    if mode == "enospc":
        if hit.returncode != 2 or "Traceback" in hit.stderr or "No space left on device" not in hit.stderr:
            problems.append(f"not a sentence (exit {hit.returncode}): {hit.stderr[-800:]}")
    try:
        readable(cwd / "run")
    except Exception as e:  # noqa: BLE001 - any failure to read is the finding
        problems.append(f"unreadable after the fault: {type(e).__name__}: {e}")
    again = run(cwd, [*TRAIN, "--resume"] if (cwd / "run/config.yaml").exists() else TRAIN)
    if again.returncode != 0:
        problems.append(f"the same command failed (exit {again.returncode}): {again.stderr[-800:]}")
    elif not same(record(cwd / "run"), want):
        problems.append("the resumed run differs from the uninterrupted one")
    leftovers = [p.name for p in (cwd / "run").rglob(".*.tmp")]
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    return f"{mode} at write {k}: " + "; ".join(problems) if problems else ""


def _points(events: list[str], positions=(0, -1)) -> list[int]:
    return sorted({ks[i] for ks in kinds(events).values() for i in positions})


@pytest.mark.parametrize("mode", ["kill", "enospc"])
def test_a_fault_at_any_write_of_training_loses_nothing(reference, tmp_path, mode):
    """A kill or a full disk at the first and last write of each kind of file a run writes
    (config.yaml, run.log, the lock, metrics.csv appended and rewritten, checkpoints and their
    renames): the files are readable, and the same command finishes the run bit-identical to one
    never interrupted. (TensorBoard's event files: test_tensorboard_failing_to_write_stops_only_itself.)"""
    cwd, events, _ = reference
    want = record(cwd / "run")
    points = _points(events)
    if mode == "enospc":  # a failed rename is not what a full disk does
        points = [k for k in points if events[k - 1].startswith("write")]
    assert len(points) >= 12, kinds(events)
    with ThreadPoolExecutor(2) as pool:
        failures = [f for f in pool.map(lambda k: _strike_and_recover(tmp_path, k, mode, want), points) if f]
    assert not failures, "\n".join(failures)


def test_a_fault_at_any_write_of_an_evaluation_keeps_the_pair(reference, tmp_path):
    """A second evaluation with other settings, killed or failing at each of its writes: eval.json
    and eval.md are afterwards both the first evaluation's or both the second's, never one of each
    (the next command on the run completes a pair a kill left half renamed)."""
    cwd, _, events = reference
    names = ("eval.json", "eval.md")
    other = [*EVAL, "--set", "eval.steps=3"]
    shutil.copytree(cwd / "run", tmp_path / "second/run")
    assert run(tmp_path / "second", other).returncode == 0
    first, second = ({p: (d / "run" / p).read_text() for p in names} for d in (cwd, tmp_path / "second"))
    assert first != second
    for k in range(1, len(events) + 1):
        for mode in ("kill", "enospc"):
            here = tmp_path / f"{mode}-{k}"
            shutil.copytree(cwd / "run", here / "run")
            hit = run(here, other, mode, k)
            if mode == "enospc" and events[k - 1].startswith("write"):
                assert hit.returncode == 2 and "Traceback" not in hit.stderr, hit.stderr
                assert "| MAML | 5 |" in hit.stdout, "the table is shown when it cannot be written"
            assert run(here, ["plot", "run"]).returncode == 0  # any command on the run
            now = {p: (here / "run" / p).read_text() for p in names}
            assert now in (first, second), f"{mode} at {events[k - 1]}: eval.json and eval.md do not belong together"
            assert not list((here / "run").glob(".*.tmp")) and not list((here / "run").glob(".*.pending"))
            shutil.rmtree(here)


def test_a_file_size_limit_is_a_sentence_and_the_run_resumes(reference, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) below a checkpoint's size: the kernel refuses the write
    (EFBIG); the command says which file, and the run resumes once the limit is gone."""
    cwd, _, _ = reference
    size = (cwd / "run/maml/checkpoint.pt").stat().st_size

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    hit = run(tmp_path, TRAIN, preexec_fn=limit)
    assert hit.returncode == 2 and "Traceback" not in hit.stderr, hit.stderr
    assert "could not write" in hit.stderr and "checkpoint.pt" in hit.stderr and "File too large" in hit.stderr
    assert not (tmp_path / "run/maml/checkpoint.pt").exists() and not list((tmp_path / "run").rglob(".*.tmp"))
    # The start wrote no checkpoint, so it left nothing behind: the same command starts again.
    assert not (tmp_path / "run/config.yaml").exists()
    assert run(tmp_path, TRAIN).returncode == 0
    assert same(record(tmp_path / "run"), record(cwd / "run"))


@pytest.fixture
def small_filesystem(tmp_path):
    """A 64 MiB tmpfs (needs the right to mount, as root in CI has)."""
    where = tmp_path / "fs"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(where: Path) -> None:
    fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for block in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_a_full_filesystem_is_a_sentence_and_keeps_everything(reference, small_filesystem):
    """A real full filesystem under a run: resuming it, evaluating it and plotting it each say which
    file could not be written; nothing written before is lost; with space again, all goes on."""
    cwd, _, _ = reference
    shutil.copytree(cwd / "run", small_filesystem / "run")
    before = {p: p.read_bytes() for p in (small_filesystem / "run").rglob("*") if p.is_file()}
    _fill(small_filesystem)
    more = [*TRAIN, "--resume", "--set", "train.iterations=6"]
    for args in (more, [*EVAL, "--set", "eval.steps=3"], ["plot", "run"]):
        hit = run(small_filesystem, args)
        assert hit.returncode == 2 and "Traceback" not in hit.stderr, hit.stderr
        assert "No space left on device" in hit.stderr, hit.stderr
        assert re.search(r"could not write (the evaluation into )?run", hit.stderr), hit.stderr
        after = {p: p.read_bytes() for p in (small_filesystem / "run").rglob("*") if p.is_file()}
        changed = [p for p in before if after.get(p) != before[p] and p.name not in ("run.log", ".lock")]
        assert not changed, f"{args[0]} on a full disk changed {changed}"
    (small_filesystem / "filler").unlink()
    assert run(small_filesystem, more).returncode == 0
    rows = read_metrics(small_filesystem / "run/maml/metrics.csv")
    assert [r["iteration"] for r in rows] == list(range(1, 7))


def test_a_kill_while_a_resume_rewrites_the_log_keeps_its_rows(reference, tmp_path):
    """The killed run had logged past its checkpoint, so the resume rewrites metrics.csv without
    those rows: killed at any write of that rewrite, the log keeps every row up to the checkpoint,
    and the next resume goes on as if nothing had happened."""
    cwd, _, _ = reference
    more = [*TRAIN, "--resume", "--set", "train.iterations=6"]

    def prepared(name: str) -> Path:
        here = tmp_path / name
        shutil.copytree(cwd / "run", here / "run")
        log = here / "run/maml/metrics.csv"
        header, last = log.read_text().splitlines()[0], log.read_text().splitlines()[-1]
        extra = "".join(f"{i},{last.split(',', 1)[1]}\r\n" for i in (5, 6))  # logged after the checkpoint
        log.write_text(log.read_text() + extra)
        assert header.startswith("iteration")
        return here

    base = prepared("count")
    assert run(base, more, events=base / "events.txt").returncode == 0
    events = (base / "events.txt").read_text().splitlines()
    pattern = r"(write maml/\.metrics\.csv\..*|replace maml/metrics\.csv)"
    rewrite = [k for k, e in enumerate(events, 1) if re.fullmatch(pattern, e)]
    assert rewrite, events
    rows = read_metrics(cwd / "run/maml/metrics.csv")
    for k in [rewrite[0], rewrite[-1]]:
        here = prepared(f"kill-{k}")
        assert run(here, more, "kill", k).returncode == -signal.SIGKILL
        kept = read_metrics(here / "run/maml/metrics.csv")
        assert kept[:4] == rows, f"kill at {events[k - 1]} lost rows"
        assert run(here, more).returncode == 0
        assert same(record(here / "run"), record(base / "run"))


def test_tensorboard_failing_to_write_stops_only_itself(tmp_path, monkeypatch, capsys):
    """TensorBoard's files are a view of metrics.csv: when they cannot be written, training and
    the CSV log go on, with a note."""
    from torch.utils.tensorboard import SummaryWriter

    from mamlkit import cli

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device", "tb/events")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    assert cli.main([str(tmp_path / "run") if a == "run" else a for a in TRAIN]) == 0
    assert "TensorBoard logging into" in capsys.readouterr().out
    assert [r["iteration"] for r in read_metrics(tmp_path / "run/maml/metrics.csv")] == [1, 2, 3, 4]
