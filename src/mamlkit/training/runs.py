"""Run directories: starting one (its lock, config and log, the thread count), what a resume may
change, the time limit, reading and writing results."""

from __future__ import annotations

import copy
import datetime
import fcntl
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch

from .. import config as config_lib
from .. import distributed
from .files import append_text, finish_pending, write_file, write_files

LOCK = ".lock"
LOG = "run.log"
# Settings a resumed run may change: they cannot change what is learned (how long, how often it
# logs and saves, where and how fast it computes, what evaluation does). Any other change would
# mix two experiments in one run.
RESUMABLE = (
    "description",
    "train.iterations",
    "train.time_limit",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_every",
    "train.validate_every",
    "train.device",
    "train.threads",
    "train.nonfinite",
    "train.wandb",
    "maml.strategy",
    "maml.compile",
    "maml.cuda_graphs",
    "env.sim_threads",
    "data.root",
    "data.cache_dir",
    "data.split_dir",
    "eval.*",
)

_held: dict[Path, int] = {}  # locked directory -> the open file descriptor of its lock


class RunLockedError(RuntimeError):
    pass


def lock(directory: Path, shared: bool = False, hint: str = "") -> None:
    """Hold ``directory`` for this process (an advisory ``flock``, released when the process ends,
    however it ends: a killed run leaves no lock behind); another holder is named and refused.
    A run directory is held ``shared`` by processes that each train some of its models and hold
    those models' directories exclusively; a process that holds it exclusively excludes them all."""
    directory = Path(directory).resolve()
    if directory in _held:
        return
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    for attempt in range(3):  # ``holder`` probes a lock for an instant: try again before refusing
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt < 2:
                time.sleep(0.05)
                continue
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"{directory} is in use by {holder}; wait for it to finish (or stop it){hint}, "
                "or train into another --out"
            ) from None
    if not shared:  # shared holders leave the text to the exclusive holders of the models
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {os.uname().nodename} since {_now()}".encode())
    _held[directory] = fd


def unlock(directory: Path) -> None:
    """Release ``directory`` if this process holds it."""
    fd = _held.pop(Path(directory).resolve(), None)
    if fd is not None:
        os.close(fd)


def release(run_dir: Path) -> None:
    """Release every lock this process holds on ``run_dir`` and its models (a training call has
    ended: another process may go on with the run)."""
    run_dir = Path(run_dir).resolve()
    for d in [d for d in _held if d == run_dir or run_dir in d.parents]:
        unlock(d)


def _held_by(path: Path) -> str | None:
    """The text of the lock file ``path`` if another process holds it, else None."""
    if not path.exists() or path.parent.resolve() in _held:  # not held, or held by this process
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.read(fd, 200).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)


def holder(run_dir: Path) -> str | None:
    """Who is training in ``run_dir`` (the processes holding its models, or the run), or None."""
    run_dir = Path(run_dir)
    models = [t for p in sorted(run_dir.glob(f"*/{LOCK}")) if (t := _held_by(p))]
    by_process = {t.split(" since ")[0]: t for t in reversed(models)}  # one process, several models
    return "; ".join(reversed(by_process.values())) or _held_by(run_dir / LOCK)


def changed_settings(saved: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    """``{key: (saved value, new value)}`` for every setting that differs between two config dicts."""
    out = {}
    for k in sorted(set(saved) | set(new)):
        a, b = saved.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(changed_settings(a, b, f"{prefix}{k}."))
        elif a != b:
            out[f"{prefix}{k}"] = (a, b)
    return out


def resumable(key: str) -> bool:
    """Whether a resume may change the setting ``key`` (``RESUMABLE``)."""
    return key in RESUMABLE or any(key.startswith(p[:-1]) for p in RESUMABLE if p.endswith("*"))


def with_current_settings(trained: dict, current: dict) -> dict:
    """A checkpoint's config ``trained`` with the settings a resume may change (evaluation, device,
    data paths) taken from the run's ``current`` config.yaml. A checkpoint written before a resume
    changed them (a kept one, ``best.pt``, the random baseline's) is then evaluated as the others."""
    out = copy.deepcopy(trained)

    def overlay(into: dict, new: dict, prefix: str) -> None:
        for k, v in new.items():
            key = f"{prefix}{k}"
            if resumable(key):
                into[k] = copy.deepcopy(v)
            elif isinstance(v, dict) and isinstance(into.get(k), dict):
                overlay(into[k], v, f"{key}.")

    overlay(out, current, "")
    return out


# Settings a checkpoint's config may differ in from the run's: which models the run trains is the
# run's, not one model's (runs made before `--only` trained their models in separate starts, each
# with its own list).
NOT_A_MODELS_SETTING = ("models",)


def _recorded(key: str) -> bool:
    """Whether ``key`` must agree between a run's config.yaml and its checkpoints' configs."""
    return not resumable(key) and key not in NOT_A_MODELS_SETTING


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def checkpoint_configs(run_dir: str | Path) -> dict[Path, dict]:
    """``{checkpoint: the config it was trained with}`` for the latest checkpoint of each of the run's
    models (``RUN/checkpoint.pt`` or ``RUN/<model>/checkpoint.pt``). An unreadable one is left out
    here: the command that needs its weights refuses it, with advice that fits the command."""
    from . import checkpoint as ckpt

    run_dir = Path(run_dir)
    found = [run_dir / "checkpoint.pt", *sorted(run_dir.glob("*/checkpoint.pt"))]
    out = {}
    for path in (p for p in found if p.is_file()):
        try:
            state = ckpt.load(path, mmap=True)  # the config only: the weights stay on disk
        except ckpt.CorruptCheckpoint:
            continue
        if isinstance(state.get("config"), dict):
            out[path] = state["config"]
    return out


def reconcile(config_path: Path, current: dict | None, stored: dict, source: Path, build, unread: str = "") -> dict:
    """The raw config a run continues (or is evaluated) with, from its ``config.yaml`` (``current``,
    raw; None if it cannot be read) and the config stored in its checkpoint ``source``.

    The checkpoint's copy is the record of what was trained; ``config.yaml`` adds the settings a
    resume may change. A ``config.yaml`` that cannot be read or lacks settings (cut short) is
    recovered from the checkpoint, with a note; one whose settings differ from the checkpoint's
    (edited by hand, another run's file) is refused, listing the differences, since continuing
    either would mix two experiments."""
    try:
        trained = config_lib.to_dict(build(copy.deepcopy(stored)))
    except ValueError as e:
        raise config_lib.ConfigError(f"checkpoint {source} holds a config that is not valid here ({e})") from None
    if current is not None:
        try:
            here = _flat(config_lib.to_dict(build(copy.deepcopy(current))))
        except ValueError:
            here = None
        if here is not None:
            given, theirs = _flat(current), _flat(trained)
            differ = {
                k: (here[k], theirs[k])
                for k in given
                if k in here and k in theirs and _recorded(k) and here[k] != theirs[k]
            }
            if differ:
                listed = "; ".join(
                    f"{k}: {a!r} in config.yaml, {b!r} in the checkpoint"
                    for k, (a, b) in differ.items()
                )
                raise config_lib.ConfigError(
                    f"{config_path} does not match the config that {source} was trained with ({listed}). "
                    "A run keeps the settings it started with: put config.yaml back as it was, or, if the "
                    "checkpoint was copied in from another run, take it out; a new experiment needs a new --out"
                )
            lacking = sorted({k.split(".")[0] for k in _flat(stored) if k in theirs and k not in given})
            if not lacking:
                return _run_settings(stored, current)
            what, keep_run_settings = f"lacks settings ({', '.join(lacking)}; cut short?)", True
        else:
            what, keep_run_settings = "is not a valid config", False
    else:
        what, keep_run_settings = f"cannot be read ({unread})", False
    if distributed.is_main():
        print(
            f"note: {config_path} {what}; the run's settings are taken from the config stored in {source}, "
            "and a resume writes config.yaml whole again"
        )
    return _run_settings(stored, current) if keep_run_settings else stored


def _run_settings(stored: dict, current: dict) -> dict:
    """A checkpoint's config with what config.yaml says of the run: the settings a resume may
    change, and which models the run trains."""
    out = with_current_settings(stored, current)
    for key in NOT_A_MODELS_SETTING:
        if key in current:
            out[key] = copy.deepcopy(current[key])
    return out


def check_before_resume(run_dir: str | Path, log_every: int) -> None:
    """What a resume reads of each model, checked before it writes anything: the checkpoint's
    schema and the metric log against it (``metrics.check_log``)."""
    from . import checkpoint as ckpt
    from .metrics import check_log

    run_dir = Path(run_dir)
    for path in [run_dir / "checkpoint.pt", *sorted(run_dir.glob("*/checkpoint.pt"))]:
        if not path.is_file():
            continue
        try:
            iteration = ckpt.load(path, training=True, mmap=True)["iteration"]
        except ckpt.CorruptCheckpoint as e:
            raise ckpt.CorruptCheckpoint(f"{e}{ckpt.resume_advice(path.parent.name)}") from None
        if iteration and (path.parent / "metrics.csv").exists():
            check_log(path.parent / "metrics.csv", iteration, log_every)


def run_config(run_dir: str | Path, build) -> dict:
    """A run's config, raw: ``RUN/config.yaml`` checked against the configs its checkpoints were
    trained with (:func:`reconcile`); ``build`` validates a raw config (``build_config``). Without a
    checkpoint, config.yaml is the only record: a damaged one is refused."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory made by `mamlkit train`?")
    # What killed writers left: an evaluation's pair half renamed, temporary files.
    remove_dead_temporaries([run_dir])
    stored = checkpoint_configs(run_dir)
    unread = ""
    try:
        current = config_lib.load_raw(str(path))
    except config_lib.ConfigError as e:
        if not stored:
            raise
        current, unread = None, str(e)
    if not stored:
        return current
    sources = list(stored)
    first = stored[sources[0]]

    def settings(raw: dict) -> dict:
        try:
            return config_lib.to_dict(build(copy.deepcopy(raw)))
        except ValueError:
            return raw

    for other in sources[1:]:
        differ = {
            k: v for k, v in changed_settings(settings(first), settings(stored[other])).items() if _recorded(k)
        }
        if differ:
            listed = "; ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in differ.items())
            raise config_lib.ConfigError(
                f"{sources[0]} and {other} were trained with different settings ({listed}): the run mixes two "
                "experiments; move the one that does not belong out of it"
            )
    return reconcile(path, current, first, sources[0], build, unread)


def check_resume(saved: dict, new: dict) -> dict[str, tuple]:
    """The changes a resume makes to a run's config; refused (``ConfigError`` listing them) when
    any of them could change what is learned."""
    changes = changed_settings(saved, new)
    refused = {k: v for k, v in changes.items() if not resumable(k)}
    cosine = (saved.get("train") or {}).get("lr_schedule") == "cosine"
    if cosine and "train.iterations" in changes:
        a, b = changes["train.iterations"]
        raise config_lib.ConfigError(
            f"--resume would change train.iterations ({a!r} -> {b!r}), which is the length of the cosine "
            "schedule of this run's outer step size (train.lr_schedule=cosine): the step sizes already taken "
            "would no longer be the schedule's. Resume with the same train.iterations, or start a new run with --out"
        )
    if refused:
        listed = describe_changes(refused)
        raise config_lib.ConfigError(
            f"--resume would change the experiment ({listed}). A run keeps the settings it started with; "
            f"start a new run with --out for these. A resume may change only: {', '.join(RESUMABLE)}"
        )
    return changes


def describe_changes(changes: dict) -> str:
    """``{key: (before, after)}`` as ``run.log`` and the resume errors write it."""
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())


def devices(run_dir: str | Path, device: str) -> list[str]:
    """The ``train.device`` of each stretch of a run, in order: the resumes that changed it, read from
    its ``run.log`` (``device``, the config's, when none did)."""
    path = Path(run_dir) / LOG
    moves = re.findall(r"train\.device: '([^']*)' -> '([^']*)'", path.read_text() if path.exists() else "")
    return [moves[0][0], *(after for _, after in moves)] if moves else [device]


def log_event(run_dir: str | Path, text: str) -> None:
    """A dated line in the run's ``run.log`` (starts, resumes and what they changed, stops)."""
    if distributed.is_main():
        append_text(Path(run_dir) / LOG, f"{_now()} {text}\n")


def start_run(
    cfg, run_dir: str | Path, resume: bool, changes: dict | None = None, models: list[str] | None = None
) -> Path:
    """Lock ``run_dir``, save the resolved config in it, note the start in ``run.log`` and apply
    ``train.threads``; refuse to reuse a run's directory without ``resume`` (its config and
    checkpoints stay as they were). With ``models`` (the model directories this process trains),
    the run is held shared and those models alone exclusively, so that other processes may train
    the run's other models beside it. Temporary files of checkpoints whose writing was killed are
    removed (the lock guarantees no one is writing them)."""
    run_dir = Path(run_dir)
    if distributed.broadcast((run_dir / "config.yaml").exists()) and not resume:
        raise run_exists(run_dir)

    def write() -> None:  # under torchrun, rank 0 alone writes the run's files
        if models is None:
            lock(run_dir)
        else:
            mine = [(run_dir, True), *((run_dir / kind, False) for kind in models)]
            taken = [d for d, _ in mine if d.resolve() not in _held]
            try:
                for d, shared in mine:
                    # --only helps where a model is taken, not where the whole run is
                    lock(d, shared, hint="" if shared else ", train the run's other models beside it with --only")
            except RunLockedError:  # hold none of them: another process may want the ones that were free
                for d in taken:
                    unlock(d)
                raise
            others = holder(run_dir)
            if others and changes:
                print(
                    f"note: {others} trains other models of {run_dir}; its config.yaml now has this start's "
                    f"{', '.join(changes)}, which later resumes of every model read"
                )
        remove_dead_temporaries([run_dir])  # only those of dead writers: other processes' models are safe
        # A fresh start creates config.yaml only if no other start just did; a resume replaces it
        # whole, as another process may be reading it.
        try:
            write_file(run_dir / "config.yaml", config_lib.dumps(cfg), exclusive=not resume)
        except FileExistsError:
            raise run_exists(run_dir) from None
        changed = describe_changes(changes or {})
        event = ("resumed" + (f", changing {changed}" if changed else "")) if resume else "started"
        if models is not None and models != list(cfg.models):
            event += f" (training {', '.join(models)} only)"
        log_event(run_dir, event)

    distributed.on_main(write)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    return run_dir


def run_exists(run_dir: Path) -> FileExistsError:
    return FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or --out for a new one")


def remove_dead_temporaries(dirs: list[Path]) -> None:
    """Remove the temporary files (``.NAME.PID.THREAD.tmp``, ``files.write_file``) that writers
    killed mid-write left in ``dirs``; those of a process still alive are its writes in progress. A set
    of files that a kill left half renamed is completed first (``files.finish_pending``)."""
    for d in dirs:
        finish_pending(d)
    for tmp in (p for d in dirs for p in Path(d).rglob(".*.tmp")):
        m = re.fullmatch(r"\..+\.(\d{1,9})\.\d+\.tmp", tmp.name)
        if m and m[1] != str(os.getpid()) and _alive(int(m[1])):
            continue
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def abandon_if_untrained(run_dir: str | Path) -> bool:
    """After a failed or stopped start, or before a fresh one: remove what ``start_run`` wrote if no
    checkpoint exists yet, so the corrected command can start the run again (a run with
    checkpoints, or in which another process trains, is never touched). True if removed."""
    run_dir = Path(run_dir)
    if not distributed.is_main() or not (run_dir / "config.yaml").exists() or any(run_dir.rglob("*.pt")):
        return False
    if holder(run_dir):  # another process trains other models of the run (--only): its files stay
        return False
    for name in ("config.yaml", LOG, "metrics.csv"):
        for path in [run_dir / name, *run_dir.glob(f"*/{name}")]:
            path.unlink(missing_ok=True)
    for tb in [run_dir / "tb", *run_dir.glob("*/tb")]:
        shutil.rmtree(tb, ignore_errors=True)
    return True


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def deadline(time_limit: float) -> float:
    """The ``time.monotonic()`` value at which a run with ``train.time_limit`` seconds stops
    (shared by all the models a run trains); infinity for no limit."""
    return time.monotonic() + time_limit if time_limit else float("inf")


def read_eval(run_dir: str | Path, name: str | None = None) -> dict:
    """A run's ``eval.json`` (``eval-NAME.json`` with ``name``), with a message saying how to make it
    when it is missing."""
    path = Path(run_dir) / f"{eval_stem(name)}.json"
    if not path.exists():
        named = f" --name {name}" if name else ""
        raise FileNotFoundError(f"{path} not found; run `mamlkit eval {run_dir}{named}` first")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); run `mamlkit eval {run_dir}` again to rewrite it") from None


def eval_figures(run_dir: str | Path, name: str | None = None) -> Path:
    """Where the figures drawn from an evaluation go: ``RUN/plots/``, or ``RUN/plots/eval-NAME/``
    for a named one (the training curves, which need no evaluation, stay in ``RUN/plots/``)."""
    plots = Path(run_dir) / "plots"
    return plots if name is None else plots / eval_stem(name)


def stale_models(run_dir: str | Path, results: dict) -> dict[str, tuple[int, int]]:
    """``{model: (iteration evaluated, iteration of its checkpoint now)}`` for the models of an
    evaluation whose checkpoints have trained on since (a resume after ``mamlkit eval``)."""
    from . import checkpoint as ckpt
    from .loop import CHECKPOINT

    stale = {}
    for kind, m in results.get("models", {}).items():
        path = Path(run_dir) / kind / CHECKPOINT
        if isinstance(m, dict) and isinstance(m.get("iterations"), int) and path.exists():
            try:
                now = ckpt.load(path).get("iteration")
            except ckpt.CorruptCheckpoint:  # the plot reads eval.json; resume or eval names the damage
                continue
            if isinstance(now, int) and now != m["iterations"]:
                stale[kind] = (m["iterations"], now)
    return stale


def eval_stem(name: str | None = None) -> str:
    """The stem of an evaluation's files: ``eval`` (``eval.json``, ``eval.md``), or ``eval-NAME`` for
    ``mamlkit eval --name NAME``, which keeps other settings' results beside the default ones."""
    if name is None:
        return "eval"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(
            f"--name {name!r}: use letters, digits, '-', '_' or '.', "
            "e.g. --name tuned-lrs (written as eval-tuned-lrs.json)"
        )
    return f"eval-{name}"


def _strict_json(value):
    """``value`` with its non-finite floats as None: JSON has no NaN or Infinity, and strict readers
    (jq, JavaScript) reject Python's extension (a one-task interval is NaN, a diverged mean infinite)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def write_eval(run_dir: str | Path, results: dict, table: str, name: str | None = None) -> None:
    """A run's evaluation: ``eval.json`` (everything, strict JSON: an undefined number is null) and
    ``eval.md`` (the table), or ``eval-NAME.*``."""
    run_dir, stem = Path(run_dir), eval_stem(name)
    try:  # as a pair: a failed write or a stop never leaves one file from this evaluation, one from another
        write_files(
            {
                run_dir / f"{stem}.json": json.dumps(_strict_json(results), indent=2, allow_nan=False),
                run_dir / f"{stem}.md": table,
            }
        )
    except OSError as e:  # a full disk or a read-only run: the results are not lost, they are shown
        print(table)
        raise OSError(
            f"could not write the evaluation into {run_dir} ({e.strerror}); its table is above, and "
            f"{stem}.json and {stem}.md were left as they were"
        ) from e
