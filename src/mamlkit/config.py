"""Configs: typed dataclasses, shipped presets, ``--set key=value`` overrides, validation.

Every field is checked before training starts; a bad key or value raises ``ConfigError``
naming the key and what it accepts.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .engine.maml import MAML
from .engine.mamlpp import LR_SCHEDULES, NORMS, check_options


class ConfigError(ValueError):
    """Config keys or values that cannot be used, each with what would be accepted.

    ``problems`` lists every one; the message is the single problem, or all of them one a line."""

    def __init__(self, *problems: str):
        self.problems = list(problems)
        if len(problems) == 1:
            super().__init__(problems[0])
        else:
            super().__init__(f"{len(problems)} problems in the config:\n" + "\n".join(f"  {p}" for p in problems))


# Seeds get small offsets added (train.seed + model index + 100, eval.seed + 1, ...): the room
# kept below 2**32 keeps every derived seed valid for torch, numpy (< 2**32) and random.
SEED_ROOM = 2**16
SEED_HIGH = 2**32 - 1 - SEED_ROOM
# Integer settings without a bound of their own: counts beyond this overflow torch's int32 sizes
# long before they could finish, so they are typos.
INT_HIGH = 2**31 - 1


def spec(default, *, low=None, high=None, choices=None, nonempty: bool = False, doc: str = ""):
    """A config field with an allowed range (inclusive; for a list, of each item) or set of
    choices; ``nonempty`` refuses an empty list."""
    meta = {"low": low, "high": high, "choices": choices, "nonempty": nonempty, "doc": doc}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def seed_spec(default: int, doc: str):
    """A seed: non-negative (numpy refuses negative seeds) and small enough for every derived one."""
    return spec(default, low=0, high=SEED_HIGH, doc=doc)


def wandb_spec():
    """``train.wandb``, one setting of every experiment's training section."""
    return spec(
        None,
        doc="a Weights & Biases project to log the metrics to as well (needs `pip install wandb`; a resume "
        "continues the same W&B run); null = off",
    )


def _engine_default(name: str):
    """``MAML``'s own default for an option: the engine's signature is the one source of defaults."""
    return inspect.signature(MAML).parameters[name].default


@dataclass
class MAMLConfig:
    """``MAML``'s options: the field names are its keyword arguments (passed on whole with
    ``kwargs_for``); the defaults are read from its signature; ranges and docs live here."""

    inner_lr: float = spec(_engine_default("inner_lr"), low=0.0, doc="inner step size alpha")
    inner_steps: int = spec(_engine_default("inner_steps"), low=0, doc="inner gradient steps at training")
    first_order: bool = spec(_engine_default("first_order"), doc="drop second derivatives (FOMAML)")
    learn_inner_lr: bool = spec(
        _engine_default("learn_inner_lr"), doc="Meta-SGD: learn a step size per parameter element"
    )
    adapt: list[str] | None = spec(
        _engine_default("adapt"), doc="glob patterns of parameters the inner loop adapts; null = all"
    )
    strategy: str = spec(
        _engine_default("strategy"), choices=("auto", "loop", "vmap"), doc="how tasks of a meta-batch are computed"
    )
    compile: bool = spec(_engine_default("compile"), doc="run the meta-batch under torch.compile")
    cuda_graphs: bool = spec(
        _engine_default("cuda_graphs"),
        doc="with compile on CUDA, replay the meta-batch computation as a CUDA graph (fixed shapes)",
    )
    autocast: str = spec(
        _engine_default("autocast"),
        choices=("none", "bf16"),
        doc="bf16 = meta-batch under torch.autocast in bfloat16 (GPU speed option)",
    )
    checkpoint_inner: bool = spec(
        _engine_default("checkpoint_inner"),
        doc="recompute inner-step activations in the backward pass: less memory, more time (loop, eager)",
    )
    # MAML++ (Antoniou et al., ICLR 2019); each off by default.
    multi_step_loss: bool = spec(
        _engine_default("multi_step_loss"),
        doc="MAML++ multi-step loss: the meta-loss weighs the query loss after every inner step",
    )
    msl_iterations: int = spec(
        _engine_default("msl_iterations"),
        low=0,
        doc="iterations over which the multi-step loss anneals from uniform weights to the final step's "
        "(then the final step alone); 0 = uniform throughout",
    )
    lslr: bool = spec(
        _engine_default("lslr"),
        doc="MAML++ LSLR: learn one inner step size per adapted tensor and per inner step (from inner_lr)",
    )
    first_order_iterations: int = spec(
        _engine_default("first_order_iterations"),
        low=0,
        doc="MAML++ derivative-order annealing: first order for this many iterations, then second order; 0 = off",
    )
    norm: str = spec(
        _engine_default("norm"),
        choices=NORMS,
        doc="BatchNorm: transductive = batch statistics at train and test (the paper's), inductive = running "
        "statistics of the training queries normalise test queries, per_step = MAML++'s weights per inner step",
    )


@dataclass
class TrainConfig:
    iterations: int = spec(70000, low=1, doc="meta-iterations")
    meta_batch_size: int = spec(25, low=1, doc="tasks per meta-iteration")
    meta_lr: float = spec(1e-3, low=0.0, doc="Adam step size beta")
    checkpoint_every: int = spec(5000, low=1, doc="iterations between checkpoints")
    keep_every: int = spec(
        0,
        low=0,
        doc="also keep the checkpoint of every N-th iteration as <model>/checkpoint-N.pt, to test earlier "
        "weights with `mamlkit eval --iteration N`; 0 = keep only the latest",
    )
    log_every: int = spec(100, low=1, doc="iterations between metric rows")
    seed: int = seed_spec(0, doc="seed of the model's initialisation and of the task stream")
    device: str = spec("cpu", doc="torch device: cpu, cuda, cuda:1, ..., or auto (cuda when available)")
    threads: int = spec(
        0,
        low=0,
        doc="CPU threads for torch (0 = torch's default), at most the CPUs this process may use; 1 keeps "
        "tiny models fast when other processes share the cores",
    )
    validate_every: int = spec(0, low=0, doc="iterations between validations (0 = never)")
    val_tasks: int = spec(200, low=1, doc="validation tasks per validation")
    grad_clip: float | None = spec(None, low=0.0, doc="clip meta-gradients elementwise to [-c, c]")
    lr_schedule: str = spec(
        "constant",
        choices=LR_SCHEDULES,
        doc="outer step size over the run: constant = meta_lr, cosine = annealed from meta_lr to min_meta_lr "
        "over train.iterations (MAML++)",
    )
    min_meta_lr: float = spec(0.0, low=0.0, doc="the outer step size that lr_schedule=cosine ends at")
    time_limit: float = spec(
        0.0, low=0.0, doc="stop (checkpoint saved, resumable) after this many seconds of training; 0 = no limit"
    )
    wandb: str | None = wandb_spec()
    nonfinite: str = spec(
        "stop",
        choices=("stop", "skip"),
        doc="a batch whose meta-loss or meta-gradient is nan/inf: stop (the last checkpoint kept, exit non-zero) "
        "or skip it (counted in metrics.csv as 'skipped')",
    )


def check_maml(maml: MAMLConfig, train: TrainConfig | None = None) -> None:
    """The ``maml:`` options (MAML++'s included) that no engine path computes, and the outer step
    size's schedule, refused as ``MAML(...)`` would refuse them, before a run starts."""
    problems = []
    try:
        check_options(**kwargs_for(check_options, maml))
    except ValueError as e:
        problems.append(f"maml: {e}")
    if train is not None and train.lr_schedule == "cosine" and train.min_meta_lr > train.meta_lr:
        problems.append(
            f"train.min_meta_lr ({train.min_meta_lr:g}) is above train.meta_lr ({train.meta_lr:g}): the cosine "
            "schedule anneals down to it; lower train.min_meta_lr"
        )
    if problems:
        raise ConfigError(*problems)


def did_you_mean(word: Any, options) -> str:
    """`` (did you mean 'x'?)`` for a close match of ``word`` among ``options``, else ``""``."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def collect(problems: list[str], check, *args) -> None:
    """Run ``check(*args)``, adding the problems of a ``ConfigError`` it raises to ``problems``."""
    try:
        check(*args)
    except ConfigError as e:
        problems.extend(e.problems)


def check_pair(v: list[float], key: str) -> None:
    if len(v) != 2 or not v[0] <= v[1]:
        raise ConfigError(f"{key}: expected [low, high] with low <= high, got {v}")


def check_models(models: list[str], allowed) -> None:
    """A run's ``models``: not empty, each one of ``allowed``, none twice."""
    unknown = set(models) - set(allowed)
    if unknown or not models:
        raise ConfigError(f"models: {sorted(unknown) or 'empty'} not allowed; choose from {', '.join(allowed)}")
    twice = sorted({m for m in models if models.count(m) > 1})
    if twice:
        raise ConfigError(f"models: {', '.join(twice)} listed more than once; list each once")


# -- loading --------------------------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


def load_raw(preset_or_path: str) -> dict:
    """A preset name (``mamlkit presets``) or a path to a YAML file, as a raw dict.

    A top-level ``base:`` names another config this one builds on: a shipped preset, or a YAML
    path (a relative one is resolved against the folder of the file that names it). The base is
    loaded the same way, its own ``base`` included, and this file's keys are merged over it:
    mappings key by key, lists and scalars replaced. ``base`` itself is not in the result.
    """
    path = Path(preset_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        source = _file_source(path)
    else:
        source = _preset_source(preset_or_path)
        if source is None:
            raise ConfigError(
                f"unknown preset {preset_or_path!r}{did_you_mean(preset_or_path, preset_names())}; "
                f"presets are {preset_names()}, or pass a YAML file path"
            )
    return _resolve(source, [])


class _Source(typing.NamedTuple):
    """Where a raw config comes from: ``label`` names it in messages, ``key`` identifies the file
    (to find cycles), ``folder`` is where its relative ``base`` paths start."""

    label: str
    file: Any  # a Path, or an importlib.resources Traversable for a shipped preset
    folder: Any
    key: str


def _presets_dir():
    return resources.files("mamlkit.presets")


def _preset_source(name: str) -> _Source | None:
    res = _presets_dir() / f"{name}.yaml"
    if not res.is_file():
        return None
    key = str(res.resolve()) if isinstance(res, Path) else str(res)
    return _Source(name, res, _presets_dir(), key)


def _file_source(path) -> _Source:
    if isinstance(path, Path):
        return _Source(str(path), path, path.parent, str(path.resolve()))
    return _Source(str(path), path, path.parent, str(path))  # a Traversable inside the presets


def _base_source(base: Any, including: _Source) -> _Source:
    """The config that ``including``'s ``base: <base>`` names."""
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{including.label}: base must be a preset name or a YAML file path (a string), got {base!r}")
    if base.endswith((".yaml", ".yml")) or "/" in base or os.sep in base:
        path = Path(base).expanduser()
        target = path if path.is_absolute() else including.folder / base
        if not target.is_file():
            raise ConfigError(f"{including.label}: base {base!r} not found (looked for {target})")
        return _file_source(target)
    source = _preset_source(base)
    if source is None:
        raise ConfigError(
            f"{including.label}: unknown base preset {base!r}{did_you_mean(base, preset_names())}; "
            f"presets are {preset_names()}, "
            "or give a path to a .yaml file"
        )
    return source


def _resolve(source: _Source, chain: list[_Source]) -> dict:
    """``source``'s raw dict merged over its base's, recursively; ``chain`` = the files that led here."""
    if source.key in [s.key for s in chain]:
        cycle = " -> ".join(s.label for s in [*chain, source])
        raise ConfigError(f"base: cycle {cycle} (each names the next as its base)")
    raw = _parse(source)
    if "base" not in raw:
        return raw
    base = raw.pop("base")
    return _deep_merge(_resolve(_base_source(base, source), [*chain, source]), raw)


def _parse(source: _Source) -> dict:
    where = str(source.file) if source.label == str(source.file) else f"preset {source.label} ({source.file})"
    try:
        raw = yaml.safe_load(source.file.read_text())
    except yaml.YAMLError as e:
        mark, context = getattr(e, "problem_mark", None), getattr(e, "context", None)
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        started = getattr(e, "context_mark", None)
        if context and started is not None and (mark is None or started.line != mark.line):
            context = f"{context} from line {started.line + 1}"
        what = "; ".join(str(p) for p in (context, getattr(e, "problem", None)) if p) or str(e)
        raise ConfigError(f"{where}{at}: invalid YAML ({what})") from e
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    return raw


def _deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: mappings key by key, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.iterations=1000")
        key, text = item.split("=", 1)
        parts = [p.strip() for p in key.strip().split(".")]
        if not all(parts):
            raise ConfigError(
                f"--set {item!r}: the key {key.strip()!r} has an empty part; write section.name=value, "
                "e.g. train.iterations=1000"
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            what = "; ".join(str(p) for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p)
            raise ConfigError(
                f"--set {item!r}: the value {text!r} is not valid YAML ({what or e}); close its brackets "
                "or quote it, e.g. train.iterations=1000, models=[maml], maml.adapt=['0.*']"
            ) from None
        node = raw
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                section = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"--set {item!r}: {section} is not a section (it holds {node!r}); set {section}=VALUE instead"
                )
        node[parts[-1]] = value
    return raw


def check_device(device: str, key: str, present: bool = False) -> None:
    """Refuse a ``device`` string torch cannot parse, and with ``present`` a CUDA device on a
    machine without one, naming ``key`` (the setting or option it came from)."""
    import torch

    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key}: {device!r} is not a torch device; use cpu, cuda, cuda:N or auto") from None
    if present and kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={device} but no CUDA GPU is visible; use cpu or auto")


def build(cls: type, raw: dict):
    """Validate a raw dict into the config dataclass ``cls`` (its ``check()`` included). Keys that
    ``cls.RETIRED`` lists (settings earlier versions had) are dropped with a warning. Every
    problem is reported at once, in one ``ConfigError``."""
    raw = _drop_retired(raw, getattr(cls, "RETIRED", {}))
    found: dict[str, list[str]] = {}  # key -> its problems
    cfg = _from_dict(cls, raw, "", found)
    problems = [p for ps in found.values() for p in ps]
    later: list[str] = []
    if hasattr(cfg, "check"):
        collect(later, cfg.check)
    device = getattr(getattr(cfg, "train", None), "device", None)
    if isinstance(device, str):
        collect(later, check_device, device, "train.device")
    # A bad value was replaced by its default to run the checks across settings: one of those
    # that names such a key would be about the default, not the user's value.
    problems += [p for p in later if not any(_names(p, key) for key in found)]
    if problems:
        raise ConfigError(*problems)
    if device == "auto":
        import torch

        cfg.train.device = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


def _names(message: str, key: str) -> bool:
    """Whether ``message`` names the setting ``key`` (not just a longer key starting with it)."""
    start = message.find(key)
    while start >= 0:
        end = start + len(key)
        before = message[start - 1] if start else " "
        after = message[end] if end < len(message) else " "
        if not (before.isalnum() or before in "._") and not (after.isalnum() or after == "_"):
            return True
        start = message.find(key, start + 1)
    return False


def _drop_retired(raw: dict, retired: dict[str, str]) -> dict:
    raw = copy.deepcopy(raw) if retired else raw  # the caller's dict stays as it was
    for key, why in retired.items():
        *path, last = key.split(".")
        node = raw
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            del node[last]
            warnings.warn(f"config key {key} is no longer used ({why}); ignored", stacklevel=3)
    return raw


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dumps(cfg) -> str:
    """A resolved config as the YAML a run saves (config.yaml)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def kwargs_for(fn, section) -> dict:
    """The fields of a config ``section`` that ``fn`` takes as keyword arguments, by name: a
    section whose names are a constructor's (``MAMLConfig`` and ``MAML``) is passed on whole."""
    names = inspect.signature(fn).parameters
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name in names}


def _from_dict(cls, raw: Any, prefix: str, found: dict[str, list[str]]):
    """``cls`` from ``raw``; each bad key or value adds its problem to ``found`` (by key) and the
    field keeps its default."""
    here = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        found.setdefault(here, []).append(f"{here}: expected a mapping of settings, got {raw!r}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            hint = did_you_mean(key, fields)
            if hint:
                hint = hint.replace("'", f"'{prefix}", 1) if isinstance(key, str) else hint
            found.setdefault(f"{prefix}{key}", []).append(
                f"unknown key '{prefix}{key}'{hint}; allowed keys here: {sorted(fields)}"
            )
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key, tp = prefix + name, hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _from_dict(tp, raw[name], key + ".", found)
            continue
        try:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            values[name] = _check_value(key, _coerce(key, raw[name], tp), f.metadata, tp, default)
        except ConfigError as e:
            found.setdefault(key, []).extend(e.problems)
    return cls(**values)


def _coerce(key: str, value: Any, tp) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, e.g. {{name: value}}, got {value!r}")
        return {_coerce(f"{key} (a key)", k, args[0]): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, e.g. [1, 2], got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float
            raise ConfigError(f"{key}: {value!r} is not a finite number; use a smaller value") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _is_int(tp) -> bool:
    """Whether a field's values are integers (``int``, ``list[int]``, optionally ``| None``)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return len(args) == 1 and _is_int(args[0])
    if typing.get_origin(tp) is list:
        return args == [int]
    return tp is int


def _check_value(key: str, value: Any, meta, tp=None, default: Any = None) -> Any:
    if value is None:
        return value
    choices, low, high = meta.get("choices"), meta.get("low"), meta.get("high")
    if high is None and tp is not None and _is_int(tp):
        high = INT_HIGH
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} not allowed; choose from {list(choices)}{did_you_mean(value, choices)}")
    if meta.get("nonempty") and isinstance(value, list) and not value:
        example = yaml.safe_dump(default or [1], default_flow_style=True).strip()
        raise ConfigError(f"{key}: empty; give at least one value, e.g. {key}={example}")
    items = value if isinstance(value, list) else [value]
    for v in items:
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key}: {v!r} is not a finite number")
        if isinstance(v, int | float) and not isinstance(v, bool):
            if (low is not None and v < low) or (high is not None and v > high):
                rng = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
                raise ConfigError(f"{key}: {v!r} out of range; allowed {rng}")
    return value
