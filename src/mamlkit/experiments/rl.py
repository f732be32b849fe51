"""Reinforcement learning: MAML with TRPO on 2D navigation, and the paper's baselines (Section 5.3).

Models: ``maml`` (TRPO through one inner REINFORCE step), ``pretrained`` (plain TRPO on all
tasks jointly), ``oracle`` (plain TRPO with the goal in the observation) and ``random`` (the
untrained initialisation). At test every model but the oracle is fine-tuned with REINFORCE.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import kwargs_for, to_dict
from ..engine import MAML
from ..rl.config import MODELS, UNTRAINED, RLConfig
from ..rl.metabatch import MetaTRPOUpdate, adaptation_returns, advantage_fn, tune_inner_lrs
from ..rl.policy import GaussianMLPPolicy, reinforce_loss
from ..rl.task_sets import TaskSet, make_task_set, per_stratum, stratified_mean_ci
from ..rl.tasks import MujocoTasks, NavigationTasks, make_tasks
from ..rl.trpo import MetaTRPO
from ..training import checkpoint as ckpt
from ..training import checkpoint_file
from ..training.runs import eval_figures, read_eval, write_eval
from . import build_maml, load_run, steps_label, train_models, trained_models

# Mean return over 40 test tasks after 0/1/2/3 steps, from the official code's result files
# (docs/protocol.md#rl-evaluation); None = not given.
PAPER = {
    "navigation2d": {"maml": [-40.4, -11.7, -3.33, -3.23], "random": [-82.7, -58.0, -53.8, -46.8], "oracle": [-2.29]},
    "halfcheetah_vel": {
        "maml": [-129.5, -78.6, -66.6, -60.8],
        "pretrained": [-158.0, -135.4, -128.5, -133.6],
        "random": [-254.8, None, None, -230.8],
        "oracle": [-54.5],
    },
    "halfcheetah_dir": {
        "maml": [-50.7, 293.2, 313.5, 315.7],
        "pretrained": [-43.0, -24.8, -12.9, 19.6],
        "random": [-35.7, None, None, 86.2],
        "oracle": [442.7],
    },
    "ant_vel": {
        "maml": [30.6, 96.7, 100.1, 101.4],
        "pretrained": [-1.8, 6.1, 8.5, 9.5],
        "random": [-78.6, None, None, -35.6],
        "oracle": [107.9],
    },
    "ant_dir": {
        "maml": [8.7, 499.2, 500.7, 499.1],
        "pretrained": [3.2, 1.3, 6.5, 6.9],
        "random": [3.1, None, None, 26.1],
        "oracle": [524.8],
    },
}


def make_learner(cfg: RLConfig, kind: str, family=None) -> MAML:
    """The Gaussian policy inside ``MAML`` (no inner step for the baselines)."""
    family = family or make_tasks(cfg.env, oracle=kind == "oracle")
    policy = GaussianMLPPolicy(family.obs_dim, family.act_dim, cfg.policy.hidden, cfg.policy.init_log_std)
    baseline = {} if kind == "maml" else {"inner_steps": 0, "adapt": None}
    return build_maml(policy.to(cfg.train.device), reinforce_loss, cfg.maml, **baseline)


def _advantages(cfg: RLConfig):
    a = cfg.algo
    return advantage_fn(a.gamma, a.gae_lambda, a.center_advantages, a.baseline_reg)


def make_update(cfg: RLConfig, learner: MAML, family) -> MetaTRPOUpdate:
    """The outer step: a meta-batch of ``train.meta_batch_size`` tasks, then TRPO."""
    t = cfg.train
    trpo = MetaTRPO(learner, strategy=cfg.maml.strategy, **kwargs_for(MetaTRPO, cfg.algo))
    return MetaTRPOUpdate(trpo, family, t.meta_batch_size, t.trajectories, _advantages(cfg), t.device)


def train(
    cfg: RLConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    changes: dict | None = None,
    only: list[str] | None = None,
) -> bool:
    """Train every model in ``cfg.models`` (or those in ``only``) into ``run_dir/<kind>/``; False if interrupted."""

    def build(kind: str):
        family = make_tasks(cfg.env, oracle=kind == "oracle")
        learner = make_learner(cfg, kind, family)
        return learner, make_update(cfg, learner, family), {"iterations": 0} if kind in UNTRAINED else {}

    return train_models(
        cfg,
        run_dir,
        resume,
        progress,
        changes,
        build,
        only,
        hint=f"a step too large (maml.inner_lr={cfg.maml.inner_lr:g}, algo.max_kl={cfg.algo.max_kl:g})",
        show=("return_post", "return"),
    )


def load_learner(
    run_dir: str | Path, kind: str, device: str | None = None, overrides: list[str] = (), iteration: int | None = None
) -> tuple[MAML, RLConfig, int, NavigationTasks | MujocoTasks]:
    """A trained model with its config (``eval.*`` overrides applied), iteration and task family."""
    at = None if kind in UNTRAINED else iteration
    path = checkpoint_file(Path(run_dir) / kind, at)
    cfg, state = load_run(path, run_dir, device, overrides)
    family = make_tasks(cfg.env, oracle=kind == "oracle")
    learner = make_learner(cfg, kind, family)
    ckpt.load_weights(learner, state, path)
    return learner, cfg, state["iteration"], family


def evaluate(
    run_dir: str | Path,
    device: str | None = None,
    progress: bool = True,
    overrides: list[str] = (),
    models: list[str] | None = None,
    name: str | None = None,
    iteration: int | None = None,
) -> dict:
    """Returns on ``eval.num_tasks`` fixed test tasks (``eval.task_set``: balanced or random, see
    ``rl.task_sets``) after 0..``eval.steps`` gradient steps for each trained model: the task
    distribution's mean ± 95% CI, and the same within each stratum (goal third, direction); the
    oracle takes no step. With ``eval.tune_inner_lrs`` each model's step sizes are first chosen on
    validation tasks drawn the same way. Writes eval.json and eval.md (``eval-NAME.*`` with ``name``)."""
    run_dir = Path(run_dir)
    kinds = trained_models(run_dir, MODELS, models, iteration, untrained=UNTRAINED)
    results: dict = {"models": {}}
    per_task: dict[str, Tensor] = {}
    for kind in tqdm(kinds, desc="eval", disable=not progress):
        learner, cfg, trained_for, family = load_learner(run_dir, kind, device, overrides, iteration)
        e, adv = cfg.eval, _advantages(cfg)
        results["eval"] = to_dict(cfg)["eval"]
        results["env"] = cfg.env.name
        results["paper"] = PAPER[cfg.env.name]
        # The same test tasks and the same action noise stream for every model.
        ts = make_task_set(cfg.env.name, family, e.num_tasks, e.seed, e.task_set)
        tasks = ts.tasks.to(cfg.train.device)
        # Row i of every model's per_task is test task i: its goal velocity, direction or position.
        results["test_tasks"] = tasks.cpu().tolist()
        results["task_set"] = ts.describe()
        g = torch.Generator(cfg.train.device).manual_seed(e.seed + 1)
        t0 = time.perf_counter()
        steps = 0 if kind == "oracle" else e.steps
        lrs, tuning = list(e.model_inner_lrs.get(kind, e.inner_lrs)), None
        if e.tune_inner_lrs and steps:
            val_tasks = make_task_set(cfg.env.name, family, e.num_tasks, e.tune_seed, e.task_set).tasks
            val_tasks = val_tasks.to(cfg.train.device)
            val_g = torch.Generator(cfg.train.device).manual_seed(e.tune_seed + 1)
            lrs, tuning = tune_inner_lrs(
                learner, family, val_tasks, e.trajectories, steps, e.tune_inner_lrs, adv, val_g
            )
        returns = adaptation_returns(learner, family, tasks, e.trajectories, steps, lrs, adv, g)
        mean, ci = stratified_mean_ci(returns.cpu(), ts)
        # Does adapting further help? Paired over tasks, so the tasks' spread cancels.
        gain = stratified_mean_ci((returns[:, -1] - returns[:, 1]).cpu(), ts) if steps >= 2 else None
        results["models"][kind] = {
            "iterations": trained_for,
            "first_order": cfg.maml.first_order if kind == "maml" else None,
            "inner_lrs": [lrs[min(i, len(lrs) - 1)] for i in range(steps)],  # as used: the last repeats
            "tuning": tuning,
            "returns": mean.tolist(),
            "ci95": ci.tolist(),
            "gain_after_step_1": [gain[0].item(), gain[1].item()] if gain else None,
            "strata": per_stratum(returns.cpu(), ts),
            "per_task": returns.cpu().tolist(),
            "eval_s": time.perf_counter() - t0,
        }
        per_task[kind] = returns.cpu()
    if "maml" in per_task:
        results["maml_minus"] = maml_minus(per_task, ts)
    write_eval(run_dir, results, format_table(results), name)
    return results


def maml_minus(per_task: dict[str, Tensor], ts: TaskSet) -> dict:
    """MAML's return minus each other model's after the same number of steps (the oracle's only
    value for every step), paired over the shared test tasks: ``{model: {"mean", "ci95"}}``.
    Pairing cancels how hard each task is, so a gap can be clear where the two CIs overlap."""
    maml = per_task["maml"]
    out = {}
    for kind, other in per_task.items():
        if kind == "maml":
            continue
        steps = maml.shape[1] if other.shape[1] == 1 else min(maml.shape[1], other.shape[1])
        mean, ci = stratified_mean_ci(maml[:, :steps] - other[:, :steps].expand(-1, steps), ts)
        out[kind] = {"mean": mean.tolist(), "ci95": ci.tolist()}
    return out


def format_table(results: dict) -> str:
    """Markdown: mean return ± 95% CI per model after each number of gradient steps, beside the paper."""
    models = results["models"]
    steps = max(len(m["returns"]) for m in models.values())
    e = results["eval"]
    sizes = (
        f"step sizes chosen among {e['tune_inner_lrs']} on {e['num_tasks']} validation tasks (seed {e['tune_seed']})"
        if e.get("tune_inner_lrs")
        else f"step sizes {e['inner_lrs']}" + "".join(f", {k} {v}" for k, v in e.get("model_inner_lrs", {}).items())
    )
    gains = steps > 2  # a gain after step 1 needs a later step: with one step the column is empty
    ts = results["task_set"]
    split = ", ".join(f"{c} {label}" for c, label in zip(ts["counts"], ts["strata"]))
    one = len(ts["strata"]) == 1
    drawn = f"uniform draw, seed {ts['seed']}" if one else f"balanced: {split}; seed {ts['seed']}"
    ci = "stratified 95% CI" if len(ts["strata"]) > 1 else "95% CI over tasks"
    head = (
        f"Mean return on {e['num_tasks']} test tasks ({drawn}; ± {ci}), "
        f"{e['trajectories']} trajectories per step, {sizes}; "
        "the oracle takes no step. Paper: cbfinn/maml_rl result files.\n\n"
        "| model | meta-iterations | step sizes | "
        + " | ".join(map(steps_label, range(steps)))
        + (f" | {steps_label(steps - 1)} − 1 step (paired)" if gains else "")
        + " |\n|---|---|---|"
        + "---|" * (steps + gains)
        + "\n"
    )
    lines = []
    for kind, m in models.items():
        cells = [f"{r:.2f} ± {c:.2f}" for r, c in zip(m["returns"], m["ci95"])] + [""] * (steps - len(m["returns"]))
        gain = m.get("gain_after_step_1")
        if gains:
            cells.append(f"{gain[0]:+.2f} ± {gain[1]:.2f}" if gain else "")
        lrs = ", ".join(f"{x:g}" for x in m.get("inner_lrs", []))
        lines.append(f"| {MODELS[kind]} | {m['iterations']} | {lrs} | " + " | ".join(cells) + " |")
    for kind, ref in results.get("paper", {}).items():
        cells = ["–" if r is None else f"{r:g}" for r in ref[:steps]] + [""] * (steps - len(ref[:steps]))
        lines.append(f"| paper: {MODELS[kind]} | 500 (max) | | " + " | ".join(cells) + (" | |" if gains else " |"))
    return (
        head
        + "\n".join(lines)
        + "\n"
        + _paired_table(results.get("maml_minus", {}), steps)
        + _strata_table(models, ts["strata"], steps)
    )


def _strata_table(models: dict, strata: list[str], steps: int) -> str:
    """Each model's mean return within each stratum (goal third, direction): where it is strong or weak."""
    if len(strata) < 2:
        return ""
    head = (
        "\nBy stratum: mean return on the test tasks of each part of the task distribution (± 95% CI).\n\n"
        "| model | tasks | " + " | ".join(map(steps_label, range(steps))) + " |\n|---|---|" + "---|" * steps + "\n"
    )
    lines = []
    for kind, m in models.items():
        for label in strata:
            d = m["strata"][label]
            cells = [f"{r:.2f} ± {c:.2f}" for r, c in zip(d["returns"], d["ci95"])] + [""] * (steps - len(d["returns"]))
            lines.append(f"| {MODELS[kind]} | {label} ({d['tasks']}) | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _paired_table(diffs: dict, steps: int) -> str:
    if not diffs:
        return ""
    head = (
        "\nMAML minus each model after the same number of steps (the oracle takes none), "
        "paired over the same test tasks (± 95% CI).\n\n"
        "| MAML minus | " + " | ".join(map(steps_label, range(steps))) + " |\n|---|" + "---|" * steps + "\n"
    )
    lines = []
    for kind, d in diffs.items():
        cells = [f"{m:+.2f} ± {c:.2f}" for m, c in zip(d["mean"], d["ci95"])] + [""] * (steps - len(d["mean"]))
        lines.append(f"| {MODELS[kind]} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def plot(run_dir: str | Path, name: str | None = None) -> list[Path]:
    """The training curves and, once the run is evaluated (``eval-NAME.json`` with ``name``), the
    paper's Figure 4 (return against gradient steps)."""
    import matplotlib.pyplot as plt

    from .. import plots

    run_dir = Path(run_dir)
    out = []
    if name is not None or (run_dir / "eval.json").exists():  # the training curves need no evaluation
        results = read_eval(run_dir, name)
        models = results["models"]
        fig, ax = plt.subplots(figsize=(7, 4))
        env = results.get("env", "navigation2d")
        paper = {MODELS[k]: v for k, v in PAPER.get(env, {}).items() if k in models}
        plots.steps_curves(
            ax,
            {MODELS[k]: (m["returns"], m["ci95"]) for k, m in models.items()},
            "average return",
            reference=paper,
            # beside the axes: eight entries inside would hide the curves they label
            legend={"fontsize": 8, "loc": "center left", "bbox_to_anchor": (1.02, 0.5)},
        )
        ax.set_title(f"{env} (dotted: the paper's)" if paper else env)
        out.append(plots.save(fig, eval_figures(run_dir, name) / "return_vs_steps.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in MODELS:
        path = run_dir / kind / "metrics.csv"
        if not path.exists():
            continue
        rows = plots.read_metrics(path)
        for key in ("return_pre", "return_post", "return"):
            pts = [(r["iteration"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=f"{MODELS[kind]} {key.replace('return_', '')}".replace(" return", ""))
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("average return (training tasks)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out.append(plots.save(fig, run_dir / "plots" / "training_returns.png"))
    return out
