"""The ``mamlkit`` command: train, eval, plot, compare, presets."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from . import config as config_lib
from . import distributed, experiments
from .experiments.configs import check_machine
from .training import runs
from .training.files import RunWriteError


def _run_config(run_dir: Path) -> dict:
    """A run directory's config, raw: its ``config.yaml`` checked against its checkpoints' configs."""
    return runs.run_config(run_dir, experiments.build_config)


def _experiment_of(raw: dict):
    return experiments.get(raw.get("experiment", "sinusoid"))


def _note_other_config(name: str, run, overrides: list[str], out: Path) -> None:
    """On --resume the run's own config.yaml (``run``, built with ``--set``) is what continues:
    say where the config argument ``name`` (with the same ``--set``) would differ from it (its
    description aside)."""
    if int(os.environ.get("RANK", "0")):
        return
    try:
        given = experiments.build_config(config_lib.apply_overrides(config_lib.load_raw(name), list(overrides)))
    except (ValueError, OSError):
        return  # not a config that builds: the argument is not used on --resume anyway
    if given.experiment != run.experiment:
        print(
            f"note: {out} is a {run.experiment} run, not made from {name!r}; "
            "--resume continues it as its config.yaml says"
        )
        return
    diff = runs.changed_settings(config_lib.to_dict(run), config_lib.to_dict(given))
    diff.pop("description", None)
    if diff:
        shown = "; ".join(f"{k}: {a!r} here, {b!r} in {name}" for k, (a, b) in list(diff.items())[:6])
        more = f"; and {len(diff) - 6} more" if len(diff) > 6 else ""
        print(
            f"note: {out}/config.yaml differs from {name!r} ({shown}{more}); --resume continues it as its "
            "config.yaml says (`--set KEY=VALUE` changes what a resume may change)"
        )


def cmd_presets(args) -> int:
    if args.name:
        raw = config_lib.load_raw(args.name)
        experiments.build_config(copy.deepcopy(raw))  # validated as a run would be, before it is shown

        class Dumper(yaml.SafeDumper):  # lists of plain values on one line, as the presets write them
            pass

        Dumper.add_representer(
            list,
            lambda d, v: d.represent_sequence(
                "tag:yaml.org,2002:seq", v, flow_style=not any(isinstance(x, list | dict) for x in v)
            ),
        )
        print(
            f"# {args.name}, its base presets merged in; settings not listed take their defaults (a run's "
            "config.yaml lists every one); `--set` applies on top of this"
        )
        print(yaml.dump(raw, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=1000), end="")
        return 0
    for name in config_lib.preset_names():
        raw = config_lib.load_raw(name)
        print(f"{name:36s} {raw.get('description', '')}")
    return 0


def cmd_train(args) -> int:
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    saved = out / "config.yaml"
    changes = None
    if args.resume:
        if not saved.is_file():
            raise FileNotFoundError(f"{out} holds no run to resume (no config.yaml); start it without --resume")
        raw = _run_config(out)
        cfg = experiments.build_config(config_lib.apply_overrides(copy.deepcopy(raw), args.set))
        _note_other_config(args.config, cfg, args.set, out)
        # Nothing is written until the resume is known to continue the same experiment.
        changes = runs.check_resume(config_lib.to_dict(experiments.build_config(raw)), config_lib.to_dict(cfg))
        if distributed.is_main():
            runs.check_before_resume(out, cfg.train.log_every)
    else:
        cfg = experiments.build_config(config_lib.apply_overrides(config_lib.load_raw(args.config), args.set))
        if saved.is_file() and runs.abandon_if_untrained(out):  # stopped before its first checkpoint
            print(f"note: {out} held a start that wrote no checkpoint (stopped before its first one); starting anew")
    config_lib.check_device(cfg.train.device, "train.device", present=True)
    check_machine(cfg)  # thread counts and a memory estimate: an impossible run stops before it starts
    if cfg.train.wandb and importlib.util.find_spec("wandb") is None:
        raise config_lib.ConfigError(
            f"train.wandb={cfg.train.wandb!r} asks for Weights & Biases, which is not installed: "
            "`pip install wandb`, or leave train.wandb unset (metrics.csv and TensorBoard log every run)"
        )
    exp = experiments.get(cfg.experiment)
    only = _only(args.only, cfg) if args.only is not None else {}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and cfg.train.device.startswith("cuda:"):
        raise ValueError(
            f"train.device={cfg.train.device} under torchrun would put every process on one GPU; "
            "use train.device=cuda: each process takes the GPU of its local rank"
        )
    distributed.setup(cfg.train.device)  # under torchrun: join the other ranks
    main = distributed.is_main()
    if distributed.active() and main:
        print(f"{distributed.world_size()} processes: each computes its share of every meta-batch")
    try:
        finished = exp.train(cfg, out, resume=args.resume, progress=not args.quiet, changes=changes, **only)
    except BaseException as e:
        if not args.resume and not isinstance(e, runs.RunLockedError | FileExistsError):
            runs.abandon_if_untrained(out)  # a failed start leaves nothing that blocks the corrected command
        raise
    finally:
        runs.release(out)
        distributed.teardown()
    if not finished:
        return 130
    if main:
        print(f"trained: {out}   next: mamlkit eval {out}")
    return 0


def _only(names: str, cfg) -> dict:
    """``--only`` as ``train``'s keyword: some of the run's models, checked against ``models``."""
    models = getattr(cfg, "models", None)
    if models is None:
        raise ValueError(f"--only: a {cfg.experiment} run trains one model; leave --only out")
    only = [n.strip() for n in names.split(",") if n.strip()]
    if not only:
        raise ValueError(f"--only: no model named; name some of this run's models ({', '.join(models)})")
    unknown = [n for n in only if n not in models]
    if unknown:
        raise ValueError(
            f"--only: {', '.join(unknown)} not among this run's models ({', '.join(models)}); "
            "--only picks some of them, --set models=[...] changes them for a new run"
        )
    return {"only": only}


def cmd_eval(args) -> int:
    if int(os.environ.get("RANK", "0")):  # evaluation is one process's work; under torchrun rank 0 does it
        return 0
    run_dir = Path(args.run_dir)
    models = [m.strip() for m in args.models.split(",")] if args.models else None
    if args.iteration is not None and args.name is None:  # never over the latest weights' eval.json
        args.name = f"iteration-{args.iteration}"
    stem = runs.eval_stem(args.name)  # a bad name fails now, not after the evaluation
    raw = _run_config(run_dir)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device:
        config_lib.check_device(args.device, "--device", present=True)
    else:
        trained_on = str(raw.get("train", {}).get("device", "cpu"))
        if trained_on.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"{run_dir} trained on {trained_on}, and no CUDA GPU is visible here; add --device cpu")
    holder = runs.holder(run_dir)
    if holder:
        print(f"note: {run_dir} is still training ({holder}); evaluating the checkpoints it has written so far")
    _hint_long_evaluation(raw, args)
    _experiment_of(raw).evaluate(
        run_dir, device=args.device, overrides=args.set, models=models, name=args.name, iteration=args.iteration
    )
    print((run_dir / f"{stem}.md").read_text())
    print(f"written: {run_dir / f'{stem}.json'}, {run_dir / f'{stem}.md'}")
    return 0


def _hint_long_evaluation(raw: dict, args) -> None:
    """On a CPU, the paper's test protocols (600 image tasks, 40 RL tasks of full episodes) take
    minutes: say which settings make a quicker look."""
    device = args.device or str(raw.get("train", {}).get("device", "cpu"))
    if raw.get("experiment") not in ("fewshot", "rl") or not device.startswith("cpu"):
        return
    e = config_lib.apply_overrides(copy.deepcopy(raw), list(args.set)).get("eval", {})
    tasks, steps = e.get("num_tasks"), e.get("steps")
    if isinstance(tasks, int) and tasks >= 40:
        print(
            f"note: evaluating {tasks} test tasks, {steps} steps each, on the CPU can take many minutes; for a "
            "quicker look: --set eval.num_tasks=N --set eval.steps=S --name quick (the paper's numbers need the "
            "defaults)"
        )


def cmd_plot(args) -> int:
    run_dir = Path(args.run_dir)
    exp = _experiment_of(_run_config(run_dir))
    stem = runs.eval_stem(args.name)
    evaluated = (run_dir / f"{stem}.json").exists()
    if args.name is not None and not evaluated:
        runs.read_eval(run_dir, args.name)  # refused, saying how to make it
    stale = runs.stale_models(run_dir, runs.read_eval(run_dir, args.name)) if evaluated else {}
    if stale:
        which = ", ".join(f"{k} at iteration {a} (its checkpoint is now at {b})" for k, (a, b) in stale.items())
        named = f" --name {args.name}" if args.name else ""
        print(f"note: {stem}.json evaluated {which}; `mamlkit eval {run_dir}{named}` first to plot the current models")
    if not evaluated:
        print(f"note: {run_dir} has no eval.json: only the training curves are drawn; `mamlkit eval {run_dir}` first")
    for path in exp.plot(run_dir, name=args.name):
        print(f"written: {path}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare

    labels = args.labels.split(",") if args.labels else None
    for path in compare(args.run_dirs, args.out, labels=labels, key=args.key, name=args.name, steps=args.steps):
        print(f"written: {path}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mamlkit")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mamlkit", description="Model-Agnostic Meta-Learning experiments.")
    p.add_argument("--version", action="version", version=f"mamlkit {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a preset or YAML config")
    t.add_argument("config", help="preset name (see `mamlkit presets`) or path to a YAML file")
    t.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.iterations=1000"
    )
    t.add_argument("--out", help="run directory (default: runs/<preset>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "--only",
        metavar="M1,M2",
        help="train only these of the run's models (each exactly as the whole run would), "
        "e.g. `--only maml` in one process and `--resume --only pretrained,oracle` in another",
    )
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate a trained run (writes eval.json and eval.md)")
    e.add_argument("run_dir")
    e.add_argument("--device", help="evaluate on this device instead of the training one")
    e.add_argument(
        "--set", action="append", default=[], metavar="eval.KEY=VALUE", help="change an eval setting, e.g. eval.steps=5"
    )
    e.add_argument("--models", help="comma-separated models to evaluate (default: every model the run trained)")
    e.add_argument(
        "--name",
        help="write eval-NAME.json and eval-NAME.md instead of eval.json and eval.md, keeping earlier evaluations "
        "(`mamlkit plot` draws eval.json)",
    )
    e.add_argument(
        "--iteration",
        type=int,
        help="evaluate the checkpoints kept of this iteration (train.keep_every) instead of the latest; "
        "writes eval-iteration-N.* unless --name is given",
    )
    e.set_defaults(func=cmd_eval)
    pl = sub.add_parser("plot", help="draw a run's figures into RUN_DIR/plots/")
    pl.add_argument("run_dir")
    pl.add_argument(
        "--name", help="draw the evaluation eval-NAME.json (`mamlkit eval --name NAME`) into RUN_DIR/plots/eval-NAME/"
    )
    pl.set_defaults(func=cmd_plot)
    c = sub.add_parser(
        "compare", help="draw runs' validation curves against iterations and training time, and tabulate them"
    )
    c.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    c.add_argument("--out", required=True, help="folder for the figure and compare.md")
    c.add_argument("--labels", metavar="L1,L2", help="a label per run, in order (default: the directory names)")
    c.add_argument("--key", default="val_acc", help="the metrics.csv column compared (default: val_acc)")
    c.add_argument("--name", help="tabulate each run's eval-NAME.json instead of eval.json")
    c.add_argument(
        "--steps", type=int, help="test accuracy after this many inner steps (default: each run's training steps)"
    )
    c.set_defaults(func=cmd_compare)
    pr = sub.add_parser("presets", help="list the shipped presets, or print one resolved")
    pr.add_argument(
        "name", nargs="?", help="print this preset (or YAML file) as the run would use it, its base presets merged"
    )
    pr.set_defaults(func=cmd_presets)
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class _LogLine(logging.Handler):
    """The library's INFO messages (the strategy ``auto`` chose and why) as lines above the
    progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(f"mamlkit: {record.getMessage()}", file=sys.stderr)


def _show_library_messages() -> None:
    log = logging.getLogger("mamlkit")
    if not any(isinstance(h, _LogLine) for h in log.handlers) and int(os.environ.get("RANK", "0")) == 0:
        log.addHandler(_LogLine())
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _show_library_messages()
    # SIGTERM and SIGHUP stop a command as Ctrl-C does, at any moment: before training starts (a
    # start then removes what it wrote), during evaluation; training turns them into a clean stop.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(args)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _run(args) -> int:
    try:
        return args.func(args)
    except KeyboardInterrupt:  # training handles Ctrl-C itself; this is evaluation, plotting or a start
        print("mamlkit: interrupted; nothing more was written", file=sys.stderr)
        return 130
    except ModuleNotFoundError as e:
        if e.name not in ("gymnasium", "mujoco"):
            raise
        print(f"mamlkit: error: {e.name} is not installed; {INSTALL_RL}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, RuntimeError, ValueError, OSError) as e:  # config, data, run problems
        if os.environ.get("MAMLKIT_DEBUG"):
            raise
        print(f"mamlkit: error: {_sentence(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ != "DependencyNotInstalled":  # gymnasium's, e.g. MuJoCo missing
            raise
        print(f"mamlkit: error: {e}; {INSTALL_RL}", file=sys.stderr)
        return 2


INSTALL_RL = "the RL experiments need `pip install 'mamlkit[rl]'` (`'mamlkit[mujoco]'` for the MuJoCo tasks)"


def _sentence(e: Exception) -> str:
    """An error as one line: an OSError with its file (a full disk, a read-only directory)."""
    if isinstance(e, RunWriteError):
        return e.strerror
    if isinstance(e, OSError) and e.filename and not isinstance(e, FileNotFoundError | FileExistsError):
        return f"{e.strerror or e} ({e.filename}): check the disk space and permissions of that directory"
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
