"""The RL experiment's config (registered as ``experiment: rl`` in ``mamlkit.config``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..config import ConfigError, MAMLConfig, check_models, check_pair, collect, seed_spec, spec, wandb_spec
from .families import FAMILIES, NAVIGATION, VARIANTS
from .task_sets import strata_count

# The models an RL run can train, in the order evaluation reports them, with their labels.
MODELS = {"maml": "MAML", "pretrained": "pretrained", "random": "random init", "oracle": "oracle"}
UNTRAINED = ("random",)  # models that take no training iteration: the same weights at every iteration
# The MAML options the RL experiment uses; the others must keep their defaults. ``strategy`` is
# how TRPO computes the tasks' inner steps and policy outputs (loop or vmap; auto: by device).
MAML_OPTIONS = ("inner_lr", "inner_steps", "first_order", "adapt", "strategy")


@dataclass
class RLEnvConfig:
    name: str = spec(
        "navigation2d",
        choices=FAMILIES,
        doc="task family",
    )
    horizon: int = spec(100, low=1, doc="steps per episode (paper: 100 navigation, 200 MuJoCo)")
    goal_range: list[float] = spec([-0.5, 0.5], doc="navigation: [low, high] of each goal coordinate")
    max_action: float = spec(0.1, low=0.0, doc="navigation: actions are clipped to [-max_action, max_action]")
    goal_tolerance: float = spec(0.01, low=0.0, doc="navigation: an episode ends this close (Euclidean) to the goal")
    normalize_actions: bool = spec(
        True,
        doc="navigation: the policy acts in [-1, 1], scaled by max_action then clipped (rllab's normalize(), "
        "as in cbfinn/maml_rl's point env); false = its action is clipped directly to +-max_action",
    )
    variant: str = spec(
        "gym",
        choices=VARIANTS,
        doc="MuJoCo: gym = gymnasium's HalfCheetah-v5/Ant-v5 models and observations with the official code's "
        "step, clipping and reward weights; paper = rllab's own environments as the official code ran them "
        "(rllab's model files, observations of 20/125 numbers, torso centre-of-mass velocity, rllab's reset "
        "noise; docs/protocol.md#rl-mujoco)",
    )
    frame_skip: int = spec(
        0,
        low=0,
        doc="MuJoCo: simulator steps per environment step; 0 = the official code's (rllab's models: "
        "half-cheetah 1 = 0.01 s, ant 2 = 0.02 s on gymnasium's 0.01 s models, 1 on the paper variant's "
        "0.02 s ant); gymnasium's own default is 5",
    )
    sim_threads: int = spec(
        0,
        low=0,
        doc="MuJoCo: simulator threads stepping every episode of a rollout together (0 = the CPUs this "
        "process may use, also the most allowed); torch's own threads are train.threads",
    )


@dataclass
class RLPolicyConfig:
    hidden: list[int] = spec(
        [100, 100], low=1, doc="hidden layer widths of the ReLU Gaussian MLP ([] = a linear policy)"
    )
    init_log_std: float = spec(0.0, doc="initial state-independent log standard deviation (rllab: std 1)")


@dataclass
class RLAlgoConfig:
    gamma: float = spec(0.99, low=0.0, high=1.0, doc="discount")
    gae_lambda: float = spec(1.0, low=0.0, high=1.0, doc="GAE lambda (1 = Monte Carlo returns minus baseline)")
    center_advantages: bool = spec(True, doc="normalise advantages per task to mean 0, std 1 (rllab center_adv)")
    baseline_reg: float = spec(1e-5, low=0.0, doc="ridge coefficient of the linear feature baseline")
    max_kl: float = spec(0.01, low=0.0, doc="TRPO bound on the mean KL(old || new) of the post-update policies")
    cg_iters: int = spec(10, low=1, doc="conjugate gradient iterations")
    cg_damping: float = spec(1e-5, low=0.0, doc="added to the KL Hessian-vector products (rllab reg_coeff)")
    backtrack_ratio: float = spec(0.8, low=0.0, high=1.0, doc="line search step shrink factor")
    max_backtracks: int = spec(15, low=1, doc="line search steps")


@dataclass
class RLTrainConfig:
    iterations: int = spec(500, low=1, doc="meta-iterations (TRPO steps)")
    meta_batch_size: int = spec(20, low=1, doc="tasks per meta-iteration")
    trajectories: int = spec(20, low=1, doc="trajectories per task per gradient step")
    checkpoint_every: int = spec(10, low=1, doc="iterations between checkpoints")
    keep_every: int = spec(
        0,
        low=0,
        doc="also keep the checkpoint of every N-th iteration as <model>/checkpoint-N.pt, to test earlier "
        "weights with `mamlkit eval --iteration N`; 0 = keep only the latest",
    )
    log_every: int = spec(1, low=1, doc="iterations between metric rows")
    seed: int = seed_spec(0, doc="seed of the initialisation, the task stream and the action noise")
    device: str = spec("cpu", doc="torch device: cpu, cuda, ... or auto")
    threads: int = spec(
        0, low=0, doc="torch.set_num_threads during training, at most the CPUs this process may use; 0 = default"
    )
    time_limit: float = spec(
        0.0,
        low=0.0,
        doc="seconds of training (all models together) after which it stops as Ctrl-C does, with a "
        "checkpoint that --resume continues; 0 = no limit",
    )
    wandb: str | None = wandb_spec()
    nonfinite: str = spec(
        "stop",
        choices=("stop", "skip"),
        doc="a meta-batch whose surrogate or its gradient is nan/inf: stop (the last checkpoint kept, exit "
        "non-zero) or skip it (counted in metrics.csv as 'skipped')",
    )


@dataclass
class RLEvalConfig:
    num_tasks: int = spec(40, low=1, doc="fixed test tasks (and validation tasks for tune_inner_lrs)")
    task_set: str = spec(
        "balanced",
        choices=("balanced", "random"),
        doc="how the test and validation tasks are drawn: balanced = an equal share per goal third (velocity) or "
        "per direction, uniform goals for 2D navigation, with stratified intervals; random = a uniform draw "
        "(evaluations before 2026-12-04)",
    )
    steps: int = spec(3, low=0, doc="gradient steps at test (returns after 0..steps)")
    trajectories: int = spec(20, low=1, doc="trajectories per task per gradient step")
    inner_lrs: list[float] = spec(
        [0.1, 0.05], low=0.0, nonempty=True, doc="step sizes of steps 1, 2, ...; the last one repeats"
    )
    model_inner_lrs: dict[str, list[float]] = spec(
        {},
        doc="step sizes for some models instead of inner_lrs, e.g. {pretrained: [0.2, 0.1], random: [1.0, 0.5]} "
        "(the official test scripts gave each model its own)",
    )
    seed: int = seed_spec(1000, doc="seed of the test tasks and of the action noise (shared by every model)")
    tune_inner_lrs: list[float] = spec(
        [],
        doc="candidate step sizes: when given, each model's step sizes are chosen among them step by step "
        "(greedily, highest mean return) on validation tasks drawn from tune_seed, then tested; "
        "empty = use inner_lrs",
    )
    tune_seed: int = seed_spec(
        2000, doc="seed of the validation tasks that tune_inner_lrs chooses on (not the test seed)"
    )


@dataclass
class RLConfig:
    # Settings of earlier versions that no longer exist: dropped with a warning when a saved run
    # or an old config is read, so every run kept under results/ still loads.
    RETIRED = {
        "env.num_envs": "every episode of a rollout is stepped together now",
        "env.asynchronous": "every episode of a rollout is stepped together now",
        "env.processes": "every episode of a rollout is stepped together now; see env.sim_threads",
    }

    experiment: str = spec("rl", choices=("rl",))
    description: str = spec("", doc="one line shown by `mamlkit presets`")
    # The order sets each model's seed (train.seed + position), so it stays as first released.
    models: list[str] = spec(["maml", "pretrained", "oracle", "random"], doc="which of " + ", ".join(MODELS))
    env: RLEnvConfig = field(default_factory=RLEnvConfig)
    policy: RLPolicyConfig = field(default_factory=RLPolicyConfig)
    maml: MAMLConfig = field(default_factory=lambda: MAMLConfig(inner_lr=0.1, inner_steps=1, strategy="loop"))
    algo: RLAlgoConfig = field(default_factory=RLAlgoConfig)
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    eval: RLEvalConfig = field(default_factory=RLEvalConfig)

    def check(self) -> None:
        problems: list[str] = []
        collect(problems, check_models, self.models, MODELS)
        collect(problems, check_pair, self.env.goal_range, "env.goal_range")
        if self.env.name == NAVIGATION and self.env.variant != "gym":
            problems.append(
                f"env.variant={self.env.variant}: the variants are of the MuJoCo families; navigation2d has "
                "only 'gym' (its one definition)"
            )
        if self.env.name != "navigation2d" and self.train.device == "auto":
            self.train.device = "cpu"  # the MuJoCo sampler's policy runs on the CPU, beside the simulator
        if self.env.name != "navigation2d" and self.train.device != "cpu":
            problems.append(
                f"train.device={self.train.device}: the MuJoCo tasks run their policy beside the simulator, on "
                "the CPU; use train.device=cpu (torchrun spreads a run over processes)"
            )
        changed = [
            f"maml.{f.name}"
            for f in fields(MAMLConfig)
            if f.name not in MAML_OPTIONS and getattr(self.maml, f.name) != f.default
        ]
        if changed:
            problems.append(
                f"{', '.join(changed)}: not supported by the RL experiment; it uses only "
                + ", ".join(f"maml.{k}" for k in MAML_OPTIONS)
            )
        if self.maml.inner_steps < 1 and "maml" in self.models:
            problems.append("maml.inner_steps: MAML needs at least 1 inner step")
        if any(lr <= 0 for lr in self.eval.tune_inner_lrs):
            problems.append(
                f"eval.tune_inner_lrs: step sizes must be positive, got {self.eval.tune_inner_lrs} "
                "([] = no tuning: eval.inner_lrs are used)"
            )
        strata = strata_count(self.env.name, self.eval.task_set)
        if self.eval.num_tasks < strata:
            problems.append(
                f"eval.num_tasks={self.eval.num_tasks}: a balanced set of {self.env.name} tasks has {strata} strata "
                f"and needs a task in each; use eval.num_tasks >= {strata}, or eval.task_set=random"
            )
        if self.eval.tune_inner_lrs and self.eval.tune_seed == self.eval.seed:
            problems.append("eval.tune_seed equals eval.seed: step sizes would be chosen on the test tasks")
        stepping = [m for m in MODELS if m != "oracle"]  # the oracle is measured without a step
        for model, lrs in self.eval.model_inner_lrs.items():
            if model not in stepping:
                problems.append(
                    f"eval.model_inner_lrs: {model!r} is not a model that takes steps; use {', '.join(stepping)}"
                )
            elif not lrs or any(not 0 <= lr < float("inf") for lr in lrs):
                problems.append(f"eval.model_inner_lrs.{model}: expected non-negative step sizes, got {lrs}")
        if problems:
            raise ConfigError(*problems)
