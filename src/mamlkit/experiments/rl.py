"""Reinforcement learning: MAML with TRPO on 2D navigation, and the paper's baselines (Section 5.3).

Models: ``maml`` (TRPO through one inner REINFORCE step), ``pretrained`` (plain TRPO on all
tasks jointly), ``oracle`` (plain TRPO with the goal in the observation) and ``random`` (the
untrained initialisation). At test every model but the oracle is fine-tuned with REINFORCE.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import config as config_lib
from ..engine import MAML
from ..engine.functional import Params, detach
from ..rl.config import RLConfig
from ..rl.policy import GaussianMLPPolicy, reinforce_loss
from ..rl.sampler import advantages, policy_fn
from ..rl.tasks import MujocoTasks, NavigationTasks, make_tasks
from ..rl.trpo import MetaTRPO, TaskData
from ..training import RunExistsError, mean_ci
from ..training import checkpoint as ckpt
from ..training.metrics import MetricLog
from ..training.trainer import _stop_requests

KINDS = ("maml", "pretrained", "random", "oracle")
LABELS = {"maml": "MAML", "pretrained": "pretrained", "random": "random init", "oracle": "oracle"}
# Mean return over 40 test tasks after 0/1/2/3 steps (cbfinn/maml_rl result files; PAPER.md); None = not given.
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


def make_learner(cfg: RLConfig, kind: str, tasks=None) -> MAML:
    """The Gaussian policy inside ``MAML`` (no inner step for the baselines)."""
    tasks = tasks or make_tasks(cfg.env, oracle=kind == "oracle")
    policy = GaussianMLPPolicy(tasks.obs_dim, tasks.act_dim, cfg.policy.hidden, cfg.policy.init_log_std)
    m = cfg.maml
    steps = m.inner_steps if kind == "maml" else 0
    return MAML(
        policy.to(cfg.train.device),
        reinforce_loss,
        inner_lr=m.inner_lr,
        inner_steps=steps,
        first_order=m.first_order,
        adapt=m.adapt if steps else None,
        strategy="loop",
    )


def make_trpo(cfg: RLConfig, learner: MAML) -> MetaTRPO:
    a = cfg.algo
    return MetaTRPO(
        learner,
        inner_lr=cfg.maml.inner_lr,
        inner_steps=learner.inner_steps,
        first_order=cfg.maml.first_order,
        max_kl=a.max_kl,
        cg_iters=a.cg_iters,
        cg_damping=a.cg_damping,
        backtrack_ratio=a.backtrack_ratio,
        max_backtracks=a.max_backtracks,
    )


def _advantages(cfg: RLConfig, episodes) -> torch.Tensor:
    a = cfg.algo
    return advantages(episodes, a.gamma, a.gae_lambda, a.center_advantages, a.baseline_reg)


def collect(cfg: RLConfig, learner: MAML, family, goals: torch.Tensor, g: torch.Generator):
    """Sample a meta-batch: pre-update trajectories, the inner step on each task, post-update
    trajectories. Returns the ``TaskData`` for TRPO and the mean returns."""
    n = cfg.train.trajectories
    theta = detach(learner.params())
    info = {}
    pre = None
    if learner.inner_steps:
        pre = family.rollout(learner.fmodel, theta, goals, n, g)
        pre_adv = _advantages(cfg, pre)
        targets = [(pre.actions[i], pre_adv[i], pre.mask[i]) for i in range(len(goals))]
        adapted = [
            detach(learner.adapt(pre.obs[i], targets[i], steps=learner.inner_steps, lr=cfg.maml.inner_lr, params=theta))
            for i in range(len(goals))
        ]
        info["return_pre"] = pre.returns().mean().item()
    else:
        adapted = [theta] * len(goals)
    post = family.rollout(learner.fmodel, adapted, goals, n, g)
    post_adv = _advantages(cfg, post)
    with torch.no_grad():
        old_mean, old_log_std = policy_fn(learner.fmodel, adapted)(post.obs)
    info["return_post" if pre is not None else "return"] = post.returns().mean().item()
    tasks = [
        TaskData(
            pre.obs[i] if pre is not None else None,
            targets[i] if pre is not None else None,
            post.obs[i],
            post.actions[i],
            post_adv[i],
            post.mask[i],
            old_mean[i],
            old_log_std[i],
        )
        for i in range(len(goals))
    ]
    return tasks, info


def train(cfg: RLConfig, run_dir: str | Path, resume: bool = False, progress: bool = True) -> bool:
    """Train every model in ``cfg.models`` into ``run_dir/<kind>/``; False if interrupted."""
    run_dir = config_lib.start_run(cfg, run_dir, resume)  # also applies train.threads
    limit = cfg.train.time_limit
    deadline = time.monotonic() + limit if limit else float("inf")
    for i, kind in enumerate(cfg.models):
        if not _train_one(cfg, run_dir / kind, kind, cfg.train.seed + i, resume, progress, deadline):
            return False
    return True


def _train_one(
    cfg: RLConfig, out: Path, kind: str, seed: int, resume: bool, progress: bool, deadline: float = float("inf")
) -> bool:
    torch.manual_seed(seed)
    family = make_tasks(cfg.env, oracle=kind == "oracle")
    learner = make_learner(cfg, kind, family)
    g = torch.Generator(cfg.train.device).manual_seed(seed + 100)
    path = out / "checkpoint.pt"
    iterations = 0 if kind == "random" else cfg.train.iterations
    iteration = 0
    if path.exists():
        if not resume:
            raise RunExistsError(f"{out} already holds a run; pass --resume to continue it or --out for a new one")
        state = ckpt.load(path)
        learner.load_state_dict(state["learner"])
        ckpt.set_rng_state(state["rng"], g)
        iteration = state["iteration"]

    def save() -> None:
        ckpt.save_atomic(
            {
                "iteration": iteration,
                "learner": learner.state_dict(),
                "rng": ckpt.rng_state(g),
                "kind": kind,
                "config": config_lib.to_dict(cfg),
            },
            path,
        )

    if iterations == 0:
        save()
        return True
    trpo = make_trpo(cfg, learner)
    log = MetricLog(out, resume_from=iteration)
    bar = tqdm(total=iterations, initial=iteration, desc=kind, disable=not progress, dynamic_ncols=True)
    try:
        with _stop_requests() as stop:
            while iteration < iterations:
                t0 = time.perf_counter()
                goals = family.sample(cfg.train.meta_batch_size, g).to(cfg.train.device)
                tasks, info = collect(cfg, learner, family, goals, g)
                t1 = time.perf_counter()
                stats = trpo.step(tasks)
                iteration += 1
                row = {**info, **stats, "sample_s": t1 - t0, "update_s": time.perf_counter() - t1}
                if iteration % cfg.train.log_every == 0 or iteration == iterations:
                    log.log(iteration, **row)
                key = "return_post" if "return_post" in info else "return"
                bar.set_postfix({key: f"{info[key]:.1f}"}, refresh=False)
                bar.update(1)
                if time.monotonic() > deadline and iteration < iterations:
                    stop.set()
                if iteration % cfg.train.checkpoint_every == 0 or iteration == iterations or stop.is_set():
                    save()
                if stop.is_set():
                    bar.write(f"stopped at iteration {iteration}; checkpoint saved to {path} (--resume)")
                    return False
    finally:
        bar.close()
        log.close()
    return True


def load_learner(
    run_dir: str | Path, kind: str, device: str | None = None, overrides: list[str] = ()
) -> tuple[MAML, RLConfig, int, NavigationTasks | MujocoTasks]:
    """A trained model with its config (``eval.*`` overrides applied), iteration and task family."""
    state = ckpt.load(Path(run_dir) / kind / "checkpoint.pt")
    cfg = config_lib.override_eval(config_lib.build(state["config"]), overrides)
    if device:
        cfg.train.device = device
    family = make_tasks(cfg.env, oracle=kind == "oracle")
    learner = make_learner(cfg, kind, family)
    learner.load_state_dict(state["learner"])
    return learner, cfg, state["iteration"], family


def _adapt_all(cfg: RLConfig, learner: MAML, ep, params: list[Params], lr: float) -> list[Params]:
    """One REINFORCE step per task on its episodes ``ep``."""
    adv = _advantages(cfg, ep)
    return [
        detach(learner.adapt(ep.obs[i], (ep.actions[i], adv[i], ep.mask[i]), steps=1, lr=lr, params=params[i]))
        for i in range(len(params))
    ]


def adaptation_returns(
    cfg: RLConfig,
    learner: MAML,
    family,
    goals: torch.Tensor,
    steps: int,
    g: torch.Generator,
    lrs: list[float] | None = None,
) -> torch.Tensor:
    """Mean return per task ``[tasks, steps + 1]`` after 0..``steps`` REINFORCE steps, each on
    ``eval.trajectories`` fresh trajectories of the current policy (step sizes ``lrs``, the last
    one repeating; default ``eval.inner_lrs``)."""
    lrs = lrs or cfg.eval.inner_lrs
    params: list[Params] = [detach(learner.params())] * len(goals)
    out = []
    for s in range(steps + 1):
        ep = family.rollout(learner.fmodel, params, goals, cfg.eval.trajectories, g)
        out.append(ep.returns().mean(1))
        if s == steps:
            break
        params = _adapt_all(cfg, learner, ep, params, lrs[min(s, len(lrs) - 1)])
    return torch.stack(out, 1)


def tune_inner_lrs(cfg: RLConfig, learner: MAML, family, steps: int) -> tuple[list[float], list[list[float]]]:
    """Step sizes chosen among ``eval.tune_inner_lrs`` on validation tasks (``eval.tune_seed``),
    greedily: step s takes the candidate whose adapted policies return most, given the sizes
    already chosen. Returns ``(sizes, mean return of every candidate at every step)``."""
    e = cfg.eval
    goals = family.sample(e.num_tasks, torch.Generator().manual_seed(e.tune_seed)).to(cfg.train.device)
    g = torch.Generator(cfg.train.device).manual_seed(e.tune_seed + 1)
    params: list[Params] = [detach(learner.params())] * len(goals)
    ep = family.rollout(learner.fmodel, params, goals, e.trajectories, g)
    chosen, table = [], []
    for _ in range(steps):
        trials = []
        for lr in e.tune_inner_lrs:
            adapted = _adapt_all(cfg, learner, ep, params, lr)
            trial_ep = family.rollout(learner.fmodel, adapted, goals, e.trajectories, g)
            trials.append((trial_ep.returns().mean().item(), lr, adapted, trial_ep))
        table.append([t[0] for t in trials])
        _, lr, params, ep = max(trials, key=lambda t: t[0])
        chosen.append(lr)
    return chosen, table


def evaluate(run_dir: str | Path, device: str | None = None, progress: bool = True, overrides: list[str] = ()) -> dict:
    """Returns on ``eval.num_tasks`` fixed test tasks after 0..``eval.steps`` gradient steps for each
    trained model (mean ± 95% CI over tasks); the oracle takes no step. With ``eval.tune_inner_lrs``
    each model's step sizes are first chosen on validation tasks. Writes eval.json, eval.md."""
    run_dir = Path(run_dir)
    kinds = [k for k in KINDS if (run_dir / k / "checkpoint.pt").exists()]
    if not kinds:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint (expected {run_dir}/maml/checkpoint.pt); train first")
    results: dict = {"models": {}}
    for kind in tqdm(kinds, desc="eval", disable=not progress):
        learner, cfg, iteration, family = load_learner(run_dir, kind, device, overrides)
        e = cfg.eval
        results["eval"] = config_lib.to_dict(cfg)["eval"]
        results["env"] = cfg.env.name
        results["paper"] = PAPER[cfg.env.name]
        # The same test tasks and the same action noise stream for every model.
        goals = family.sample(e.num_tasks, torch.Generator().manual_seed(e.seed))
        g = torch.Generator(cfg.train.device).manual_seed(e.seed + 1)
        t0 = time.perf_counter()
        steps = 0 if kind == "oracle" else e.steps
        lrs, tuning = list(e.inner_lrs), None
        if e.tune_inner_lrs and steps:
            lrs, tuning = tune_inner_lrs(cfg, learner, family, steps)
        returns = adaptation_returns(cfg, learner, family, goals.to(cfg.train.device), steps, g, lrs)
        mean, ci = mean_ci(returns.cpu())
        results["models"][kind] = {
            "iterations": iteration,
            "first_order": cfg.maml.first_order if kind == "maml" else None,
            "inner_lrs": lrs if steps else [],
            "tuning": tuning,
            "returns": mean.tolist(),
            "ci95": ci.tolist(),
            "per_task": returns.cpu().tolist(),
            "eval_s": time.perf_counter() - t0,
        }
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    (run_dir / "eval.md").write_text(format_table(results))
    return results


def format_table(results: dict) -> str:
    """Markdown: mean return ± 95% CI per model after each number of gradient steps, beside the paper."""
    models = results["models"]
    steps = max(len(m["returns"]) for m in models.values())
    e = results["eval"]
    sizes = (
        f"step sizes chosen among {e['tune_inner_lrs']} on {e['num_tasks']} validation tasks (seed {e['tune_seed']})"
        if e.get("tune_inner_lrs")
        else f"step sizes {e['inner_lrs']}"
    )
    head = (
        f"Mean return on {e['num_tasks']} test tasks (± 95% CI over tasks), "
        f"{e['trajectories']} trajectories per step, {sizes}; "
        "the oracle takes no step. Paper: cbfinn/maml_rl result files.\n\n"
        "| model | meta-iterations | step sizes | " + " | ".join(f"{s} steps" for s in range(steps)) + " |\n"
        "|---|---|---|" + "---|" * steps + "\n"
    )
    lines = []
    for kind, m in models.items():
        cells = [f"{r:.2f} ± {c:.2f}" for r, c in zip(m["returns"], m["ci95"])] + [""] * (steps - len(m["returns"]))
        lrs = ", ".join(f"{x:g}" for x in m.get("inner_lrs", []))
        lines.append(f"| {LABELS[kind]} | {m['iterations']} | {lrs} | " + " | ".join(cells) + " |")
    for kind, ref in results.get("paper", {}).items():
        cells = ["–" if r is None else f"{r:g}" for r in ref[:steps]] + [""] * (steps - len(ref[:steps]))
        lines.append(f"| paper: {LABELS[kind]} | 500 (max) | | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def plot(run_dir: str | Path) -> list[Path]:
    """The paper's Figure 4 (return against gradient steps) and the training curves."""
    import matplotlib.pyplot as plt

    from .. import plots

    run_dir = Path(run_dir)
    eval_path = run_dir / "eval.json"
    if not eval_path.exists():
        raise FileNotFoundError(f"{eval_path} not found; run `mamlkit eval {run_dir}` first")
    models = json.loads(eval_path.read_text())["models"]
    fig, ax = plt.subplots(figsize=(5, 4))
    plots.steps_curves(ax, {LABELS[k]: (m["returns"], m["ci95"]) for k, m in models.items()}, "average return")
    ax.set_title(json.loads(eval_path.read_text()).get("env", "navigation2d"))
    out = [plots.save(fig, run_dir / "plots" / "return_vs_steps.png")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in models:
        path = run_dir / kind / "metrics.csv"
        if not path.exists():
            continue
        from ..training.metrics import read_metrics

        rows = read_metrics(path)
        for key in ("return_pre", "return_post", "return"):
            pts = [(r["iteration"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=f"{LABELS[kind]} {key.replace('return_', '')}".replace(" return", ""))
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel("average return (training tasks)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out.append(plots.save(fig, run_dir / "plots" / "training_returns.png"))
    return out
