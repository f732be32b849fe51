"""The experiments' configs and their registry: ``experiment: NAME`` in a preset picks the class."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import (
    ConfigError,
    MAMLConfig,
    TrainConfig,
    apply_overrides,
    build,
    check_models,
    check_pair,
    collect,
    did_you_mean,
    load_raw,
    seed_spec,
    spec,
    to_dict,
)
from ..models import CLASSIFIER_DATASET, CLASSIFIERS
from ..rl.config import RLConfig

# Images per class, and classes per split where the code fixes the split (Omniglot: 1100/100/423 characters).
DATASET_SIZES: dict[str, tuple[int, dict[str, int] | None]] = {
    "omniglot": (20, {"train": 1100, "val": 100, "test": 423}),
    "miniimagenet": (600, None),
}
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
        if problems:
            raise ConfigError(*problems)


@dataclass
class FewShotDataConfig:
    dataset: str = spec("omniglot", choices=("omniglot", "miniimagenet"))
    root: str | None = spec(None, doc="data directory; null = $MAMLKIT_OMNIGLOT_DIR / $MAMLKIT_MINIIMAGENET_DIR")
    split_dir: str | None = spec(None, doc="MiniImagenet split CSVs when not beside images/; null = data.root")
    cache_dir: str | None = spec(None, doc="preprocessed cache; null = $MAMLKIT_CACHE_DIR or ~/.cache/mamlkit")
    resize: str = spec(
        "nearest",
        choices=("nearest", "lanczos"),
        doc="Omniglot 28x28 resize: nearest = the official binary images, lanczos = gray levels",
    )
    rotate: bool = spec(True, doc="rotate each class of a task by a random multiple of 90 degrees (Omniglot)")


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
            shape = {"omniglot": "28x28 gray", "miniimagenet": "84x84 RGB"}[wanted]
            problems.append(f"model.arch {self.model.arch} expects data.dataset={wanted} ({shape})")
        problems += self._data_problems()
        if problems:
            raise ConfigError(*problems)

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
            if n > per_class:
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
