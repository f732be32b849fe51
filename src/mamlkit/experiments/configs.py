"""The experiments' configs and their registry: ``experiment: NAME`` in a preset picks the class."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

from ..config import (
    ConfigError,
    MAMLConfig,
    TrainConfig,
    apply_overrides,
    build,
    check_maml,
    check_models,
    check_pair,
    collect,
    did_you_mean,
    load_raw,
    seed_spec,
    spec,
    to_dict,
)
from ..models import CLASSIFIER_DATASET, CLASSIFIERS, classifier
from ..rl.config import RLConfig

# Images per class, and classes per split where the code fixes the split (Omniglot: 1100/100/423 characters).
# A folder's are known once it is read (data.folder checks them then).
DATASET_SIZES: dict[str, tuple[int | None, dict[str, int] | None]] = {
    "omniglot": (20, {"train": 1100, "val": 100, "test": 423}),
    "miniimagenet": (600, None),
    "folder": (None, None),
}
FOLDER_DEFAULT_SHAPE = (3, 84)  # (channels, image_size) of data.dataset=folder when not set
MODERN_QUERY = 15  # query examples per class under eval.query "modern" (as experiments.fewshot.MODERN_QUERY)


@dataclass
class SinusoidTaskConfig:
    k_support: int = spec(10, low=1, doc="support points per task at training")
    k_query: int = spec(10, low=1, doc="query points per task at training")
    amplitude: list[float] = spec([0.1, 5.0], doc="[low, high] of the amplitude A")
    phase: list[float] = spec([0.0, math.pi], doc="[low, high] of the phase phi")
    x_range: list[float] = spec([-5.0, 5.0], doc="[low, high] of the inputs x")


@dataclass
class SinusoidModelConfig:
    hidden: list[int] = spec([40, 40], low=1, doc="hidden layer widths of the ReLU MLP ([] = a linear model)")
    init: str = spec(
        "official",
        choices=("official", "torch"),
        doc="official = weights ~ truncated N(0, 0.01²), zero biases (cbfinn/maml); torch = PyTorch defaults",
    )


@dataclass
class SinusoidEvalConfig:
    num_tasks: int = spec(600, low=1, doc="test tasks")
    shots: list[int] = spec([5, 10, 20], low=1, nonempty=True, doc="K values to evaluate")
    steps: int = spec(10, low=0, doc="gradient steps at test")
    query_points: int = spec(100, low=1, doc="held-out points per test task")
    inner_lr: float | None = spec(None, low=0.0, doc="MAML step size at test; null = training step size")
    seed: int = seed_spec(1000, doc="seed of the test tasks (shared by every model); eval.seed + 1 tunes")
    tune_tasks: int = spec(100, low=1, doc="held-out tasks on which the pretrained step size is tuned")
    tune_lrs: list[float] = spec(
        [0.001, 0.002, 0.005, 0.01, 0.02, 0.05], low=0.0, nonempty=True, doc="step sizes tried for pretrained"
    )


@dataclass
class SinusoidConfig:
    experiment: str = spec("sinusoid", choices=("sinusoid",))
    description: str = spec("", doc="one line shown by `mamlkit presets`")
    models: list[str] = spec(["maml", "pretrained", "oracle"], doc="which of maml, pretrained, oracle to train")
    model: SinusoidModelConfig = field(default_factory=SinusoidModelConfig)
    maml: MAMLConfig = field(default_factory=MAMLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: SinusoidTaskConfig = field(default_factory=SinusoidTaskConfig)
    eval: SinusoidEvalConfig = field(default_factory=SinusoidEvalConfig)

    def check(self) -> None:
        problems: list[str] = []
        collect(problems, check_pair, self.task.amplitude, "task.amplitude")
        collect(problems, check_pair, self.task.phase, "task.phase")
        collect(problems, check_pair, self.task.x_range, "task.x_range")
        collect(problems, check_models, self.models, ("maml", "pretrained", "oracle"))
        collect(problems, check_maml, self.maml, self.train)
        if self.maml.norm != "transductive":
            problems.append(
                f"maml.norm={self.maml.norm}: the sinusoid MLP has no BatchNorm to change; leave maml.norm=transductive"
            )
        if problems:
            raise ConfigError(*problems)


@dataclass
class FewShotDataConfig:
    dataset: str = spec(
        "omniglot",
        choices=("omniglot", "miniimagenet", "folder"),
        doc="folder = your own images, root/CLASS/*.png|jpg|... (mamlkit.data.folder)",
    )
    root: str | None = spec(
        None,
        doc="data directory; null = $MAMLKIT_OMNIGLOT_DIR / $MAMLKIT_MINIIMAGENET_DIR (folder: required)",
    )
    split_dir: str | None = spec(None, doc="MiniImagenet split CSVs when not beside images/; null = data.root")
    cache_dir: str | None = spec(None, doc="preprocessed cache; null = $MAMLKIT_CACHE_DIR or ~/.cache/mamlkit")
    resize: str = spec(
        "nearest",
        choices=("nearest", "lanczos"),
        doc="Omniglot 28x28 resize: nearest = the official binary images, lanczos = gray levels",
    )
    rotate: bool = spec(True, doc="rotate each class of a task by a random multiple of 90 degrees (Omniglot)")
    # The folder dataset's own settings; the other datasets have fixed shapes and splits.
    image_size: int | None = spec(
        None, low=16, high=1024, doc="folder: side of the square images after resizing; null = 84"
    )
    channels: int | None = spec(None, choices=(1, 3), doc="folder: 1 = gray, 3 = RGB (images converted); null = 3")
    split_file: str | None = spec(
        None, doc="folder: a file of `CLASS,SPLIT` lines (train, val or test); null = split by split_fractions"
    )
    split_fractions: list[float] = spec(
        [0.64, 0.16, 0.2],
        low=0.0,
        high=1.0,
        doc="folder without split_file: train, val, test fractions of the classes (sorted, seeded shuffle)",
    )

    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the images the model sees."""
        if self.dataset != "folder":
            return IMAGE_SHAPE[self.dataset]
        channels, size = self.channels or FOLDER_DEFAULT_SHAPE[0], self.image_size or FOLDER_DEFAULT_SHAPE[1]
        return (channels, size, size)


@dataclass
class FewShotTaskConfig:
    n_way: int = spec(5, low=2, doc="classes per task")
    k_shot: int = spec(1, low=1, doc="support examples per class")
    q_query: int = spec(1, low=1, doc="query examples per class at training")


@dataclass
class FewShotModelConfig:
    arch: str = spec("omniglot_conv4", choices=tuple(CLASSIFIERS))


@dataclass
class FewShotEvalConfig:
    num_tasks: int = spec(600, low=1, doc="test tasks")
    steps: int = spec(10, low=0, doc="gradient steps at test (accuracy reported after each)")
    inner_lr: float | None = spec(None, low=0.0, doc="step size at test; null = training step size")
    query: list[str] = spec(
        ["paper", "modern"], nonempty=True, doc=f"paper = K query examples per class, modern = {MODERN_QUERY}"
    )
    task_batch: int = spec(32, low=1, doc="test tasks computed together")
    checkpoint: str = spec("best", choices=("best", "last"), doc="best = chosen on validation accuracy")
    seed: int = seed_spec(2000, doc="seed of the test tasks")


@dataclass
class FewShotConfig:
    experiment: str = spec("fewshot", choices=("fewshot",))
    description: str = spec("", doc="one line shown by `mamlkit presets`")
    data: FewShotDataConfig = field(default_factory=FewShotDataConfig)
    task: FewShotTaskConfig = field(default_factory=FewShotTaskConfig)
    model: FewShotModelConfig = field(default_factory=FewShotModelConfig)
    maml: MAMLConfig = field(default_factory=MAMLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: FewShotEvalConfig = field(default_factory=FewShotEvalConfig)

    def check(self) -> None:
        problems: list[str] = []
        bad = set(self.eval.query) - {"paper", "modern"}
        if bad or not self.eval.query:
            hint = did_you_mean(sorted(bad)[0], ("paper", "modern")) if bad else ""
            problems.append(f"eval.query: {sorted(bad) or 'empty'} not allowed; choose from paper, modern{hint}")
        t = self.train
        if t.validate_every and t.validate_every % t.log_every:
            problems.append(
                f"train.validate_every ({t.validate_every}) must be a multiple of train.log_every ({t.log_every})"
            )
        wanted = CLASSIFIER_DATASET[self.model.arch]
        if self.data.dataset != wanted:
            shape = {"omniglot": "28x28 gray", "miniimagenet": "84x84 RGB", "folder": "any size"}[wanted]
            fix = "; data.dataset=folder trains model.arch=conv4" if self.data.dataset == "folder" else ""
            problems.append(f"model.arch {self.model.arch} expects data.dataset={wanted} ({shape}){fix}")
        collect(problems, check_maml, self.maml, self.train)
        problems += self._folder_problems()
        problems += self._data_problems()
        if problems:
            raise ConfigError(*problems)

    def _folder_problems(self) -> list[str]:
        """The folder dataset's settings: set only for it, fractions that split."""
        d, defaults, problems = self.data, FewShotDataConfig(), []
        if d.dataset != "folder":
            for name in ("image_size", "channels", "split_file", "split_fractions"):
                if getattr(d, name) != getattr(defaults, name):
                    problems.append(
                        f"data.{name} applies to data.dataset=folder only; {d.dataset} has a fixed shape and "
                        f"split, so leave data.{name} out"
                    )
            return problems
        fractions = d.split_fractions
        if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
            problems.append(
                f"data.split_fractions: {fractions} must be 3 fractions (train, val, test) summing to 1, "
                "e.g. [0.64, 0.16, 0.2]"
            )
        return problems

    def _data_problems(self) -> list[str]:
        """Tasks the dataset cannot fill: more examples per class than a class holds, more classes
        than a split holds (the splits the code fixes: Omniglot's; MiniImagenet's come from CSVs)."""
        per_class, classes = DATASET_SIZES[self.data.dataset]
        k, problems = self.task.k_shot, []
        wanted = {"task.k_shot + task.q_query": (k + self.task.q_query, "task.k_shot or task.q_query")}
        for protocol in self.eval.query:
            q = k if protocol == "paper" else MODERN_QUERY
            wanted[f"task.k_shot + its {protocol} queries at test ({q})"] = (k + q, f"task.k_shot or drop {protocol}")
        if self.train.validate_every:
            wanted[f"task.k_shot + its queries at validation ({k})"] = (2 * k, "task.k_shot")
        for what, (n, fix) in wanted.items():
            if per_class is not None and n > per_class:
                problems.append(f"{what} = {n}: a {self.data.dataset} class holds {per_class} images; lower {fix}")
        splits = {"train": True, "val": bool(self.train.validate_every), "test": True}
        for split, n in (classes or {}).items():
            if splits[split] and self.task.n_way > n:
                problems.append(
                    f"task.n_way: {self.task.n_way}-way tasks need {self.task.n_way} classes but the "
                    f"{self.data.dataset} {split} split holds {n}; use task.n_way <= {n}"
                )
        return problems


CONFIGS: dict[str, type] = {"sinusoid": SinusoidConfig, "fewshot": FewShotConfig, "rl": RLConfig}


def build_config(raw: dict):
    """A validated experiment config from a raw dict (its ``experiment`` key picks the class)."""
    if "experiment" not in raw:
        raise ConfigError(
            "the config names no experiment: start it with `base: PRESET` (a preset to build on, e.g. "
            f"`base: sinusoid`; `mamlkit presets` lists them) or `experiment: {' | '.join(sorted(CONFIGS))}`"
        )
    name = raw["experiment"]
    if not isinstance(name, str) or name not in CONFIGS:
        hint = did_you_mean(name, CONFIGS)
        raise ConfigError(f"experiment: {name!r} not allowed; choose from {sorted(CONFIGS)}{hint}")
    return build(CONFIGS[name], raw)


def load_config(preset_or_path: str, overrides: list[str] = ()):
    """A preset name or YAML path, with ``--set``-style overrides applied, validated."""
    return build_config(apply_overrides(load_raw(preset_or_path), list(overrides)))


def override_eval(cfg, overrides: list[str] = ()):
    """``cfg`` with ``eval.*`` overrides applied: what ``mamlkit eval --set`` may change."""
    if not overrides:
        return cfg
    bad = [o for o in overrides if not o.strip().startswith("eval.")]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: only eval.* settings change at evaluation; train a new run for others")
    return build_config(apply_overrides(to_dict(cfg), list(overrides)))


# -- what the machine can hold -------------------------------------------------------------------
#
# Checked when a run starts (``check_machine``), not when a config is built: a run's saved config
# must still load on a smaller machine (to be evaluated, say).

GIB = 2**30
FLOAT = 4  # bytes of a float32
IMAGE_SHAPE = {"omniglot": (1, 28, 28), "miniimagenet": (3, 84, 84)}
# Bytes of a dataset held in memory during training (uint8 images; Omniglot's lanczos ones are float32).
DATA_BYTES = {"omniglot": 1623 * 20 * 28 * 28 * FLOAT, "miniimagenet": 80 * 600 * 3 * 84 * 84}
# (observation, action) sizes of the RL families, and the bytes of one MuJoCo copy (its MjData, roughly).
RL_DIMS = {"navigation2d": (2, 2, 0), "halfcheetah": (20, 6, 60_000), "ant": (125, 8, 150_000)}


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_memory(device: str) -> tuple[int, str] | None:
    """Bytes free for a run on ``device`` and what they are: a present CUDA GPU's free memory,
    else the system's MemAvailable (``/proc/meminfo``; ``os.sysconf`` elsewhere); None if unknown."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None  # train.device is refused by check_device instead
        free, _ = torch.cuda.mem_get_info(torch.device(device) if ":" in device else None)
        return free, f"free on {device}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available"
    except (ValueError, OSError, AttributeError):
        return None


def check_machine(cfg) -> None:
    """Refuse thread counts above this machine's CPUs and sizes its memory cannot hold (one
    ``ConfigError`` listing all); call it before a run writes anything."""
    import dataclasses

    problems: list[str] = []
    cpus = usable_cpus()
    for section, name in (("train", "threads"), ("env", "sim_threads")):
        part = getattr(cfg, section, None)
        value = getattr(part, name, 0) if part is not None and dataclasses.is_dataclass(part) else 0
        if value > cpus:
            problems.append(
                f"{section}.{name}={value}: more than the {cpus} CPUs this process may use; use at most {cpus} "
                "(0 = as many as it may use)"
            )
    collect(problems, check_memory, cfg)
    if problems:
        raise ConfigError(*problems)


def check_memory(cfg) -> None:
    """Refuse a config whose rough memory estimate (``estimate_memory``) exceeds the memory
    available to its device, naming the settings that size it, those raised most first."""
    found = available_memory(cfg.train.device)
    if found is None:
        return
    available, what = found
    problems = []
    for phase, (need, keys) in estimate_memory(cfg).items():
        if need <= available:
            continue
        ranked = sorted(keys, key=lambda k: -_raised(cfg, k))
        shown = ", ".join(f"{k}={_get(cfg, k)}" for k in ranked)
        problems.append(
            f"{phase} needs roughly {_size(need)}, more than the {_size(available)} of memory available "
            f"({what}); lower {ranked[0]} (the sizes: {shown})"
        )
    if problems:
        raise ConfigError(*problems)


def estimate_memory(cfg) -> dict[str, tuple[int, list[str]]]:
    """Rough bytes each phase of a run holds at once, with the settings that size it.

    Training: 4 bytes x 3 (forward and backward) x meta_batch_size x examples per task x the
    model's activations per example x the inner steps whose graph second order keeps (1 with
    first order), plus per-task adapted weights, Adam's state and the data. Evaluation: the test
    tasks computed together x their examples x activations (RL: tasks x trajectories x horizon x
    (observation, action and policy sizes), plus a MuJoCo state per episode). An order of
    magnitude, not a promise: it errs high (a meta-batch taken as computed at once)."""
    return {"sinusoid": _sinusoid_memory, "fewshot": _fewshot_memory, "rl": _rl_memory}[cfg.experiment](cfg)


def _kept_steps(maml) -> int:
    """Inner steps whose activations the meta-gradient keeps: all with second order, else one."""
    return 1 if maml.first_order else max(maml.inner_steps, 1)


def _mlp_sizes(n_in: int, hidden: list[int], n_out: int) -> tuple[int, int]:
    """(parameters, activations per example) of an MLP."""
    widths = [n_in, *hidden, n_out]
    return sum((a + 1) * b for a, b in zip(widths, widths[1:])), 2 * sum(hidden) + n_out


def _sinusoid_memory(cfg) -> dict[str, tuple[int, list[str]]]:
    t, e, m = cfg.train, cfg.eval, cfg.maml
    params, acts = _mlp_sizes(1, cfg.model.hidden, 1)
    points = cfg.task.k_support + cfg.task.k_query
    train = FLOAT * (
        3 * t.meta_batch_size * points * acts * (_kept_steps(m) + 1)
        + params * (4 + (m.learn_inner_lr or 0) + 2 * t.meta_batch_size * (m.inner_steps + 1))
    )
    tasks = max(e.num_tasks, e.tune_tasks)
    # The query losses keep their graphs across the steps.
    evaluate = FLOAT * tasks * (e.steps + 1) * ((max(e.shots) + e.query_points) * acts + 2 * params)
    which = "eval.num_tasks" if e.num_tasks >= e.tune_tasks else "eval.tune_tasks"
    return {
        "training (one meta-batch)": (
            train,
            ["train.meta_batch_size", "task.k_support", "task.k_query", "model.hidden"]
            + (["maml.inner_steps"] if not m.first_order else []),
        ),
        "evaluation": (evaluate, [which, "eval.query_points", "eval.shots", "model.hidden"]),
    }


def _classifier_sizes(arch: str, n_way: int, shape: tuple[int, int, int]) -> tuple[int, int]:
    """(parameters, activation floats per image) of a classifier: its layers' outputs counted in
    one forward pass on the meta device (shapes only, no memory); about what a backward keeps."""
    return _classifier_sizes_cached(arch, min(n_way, 10**6), shape)


@functools.lru_cache(maxsize=64)
def _classifier_sizes_cached(arch: str, n_way: int, shape: tuple[int, int, int]) -> tuple[int, int]:
    import torch

    with torch.device("meta"):
        model = classifier(arch, n_way, shape)
    outputs = [0]

    def count(module, inputs, output) -> None:
        outputs[0] += output.numel() if isinstance(output, torch.Tensor) else 0

    for module in model.modules():
        if not list(module.children()):
            module.register_forward_hook(count)
    model(torch.empty(1, *shape, device="meta"))
    return sum(p.numel() for p in model.parameters()), outputs[0]


def _fewshot_memory(cfg) -> dict[str, tuple[int, list[str]]]:
    t, e, m, task = cfg.train, cfg.eval, cfg.maml, cfg.task
    params, acts = _classifier_sizes(cfg.model.arch, task.n_way, cfg.data.image_shape())
    params = params * task.n_way // min(task.n_way, 10**6)  # the head grows with n_way beyond the cap
    data = DATA_BYTES.get(cfg.data.dataset, 0)  # a folder's size is known only once it is read
    per_task = task.n_way * (task.k_shot * _kept_steps(m) + task.q_query) * acts
    train = data + FLOAT * (
        3 * t.meta_batch_size * per_task
        + params * (4 + (m.learn_inner_lr or 0) + 2 * t.meta_batch_size * (m.inner_steps + 1))
    )
    q = max(task.k_shot if p == "paper" else MODERN_QUERY for p in e.query)
    # A test step: the support's forward and backward, then the query's forward, whose graph is
    # dropped once its accuracy is taken.
    evaluate = data + FLOAT * e.task_batch * (task.n_way * (2 * task.k_shot + q) * acts + 2 * params)
    sizes = ["task.n_way", "task.k_shot"]
    return {
        "training (one meta-batch)": (
            train,
            ["train.meta_batch_size", *sizes, "task.q_query"] + (["maml.inner_steps"] if not m.first_order else []),
        ),
        "evaluation (eval.task_batch tasks at once)": (evaluate, ["eval.task_batch", *sizes]),
    }


def _rl_memory(cfg) -> dict[str, tuple[int, list[str]]]:
    t, e, m = cfg.train, cfg.eval, cfg.maml
    robot = "navigation2d" if cfg.env.name == "navigation2d" else cfg.env.name.split("_")[0]
    obs, act, sim = RL_DIMS[robot]
    params, acts = _mlp_sizes(obs, cfg.policy.hidden, act)
    # A step of an episode: observation, action, noise, reward, return, advantage, baseline
    # features (~2 x obs), and the policy's activations, forward and backward.
    per_step = 4 * obs + 3 * act + 8 + 3 * acts

    def rollouts(tasks: int, trajectories: int, rounds: int) -> int:
        episodes = tasks * trajectories
        held = FLOAT * (rounds * episodes * cfg.env.horizon * per_step + 2 * tasks * params * (m.inner_steps + 1))
        return held + episodes * sim

    size = ["env.horizon", "policy.hidden"]
    return {
        "training (one meta-batch)": (
            rollouts(t.meta_batch_size, t.trajectories, 2),
            ["train.meta_batch_size", "train.trajectories", *size],
        ),
        "evaluation": (rollouts(e.num_tasks, e.trajectories, 1), ["eval.num_tasks", "eval.trajectories", *size]),
    }


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _raised(cfg, key: str) -> float:
    """How many times its default a setting is (a list: its total), to name the likely culprit first."""
    section, name = key.split(".")
    default = getattr(type(getattr(cfg, section))(), name)
    value = _get(cfg, key)
    total = lambda v: sum(v) if isinstance(v, list) else v or 0
    return total(value) / max(total(default), 1)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
