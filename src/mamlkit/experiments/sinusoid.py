"""Sinusoid regression: MAML, the pretrained baseline and the oracle (paper Section 5.1)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import to_dict
from ..engine import MAML, TaskBatch
from ..models import mlp, official_init_
from ..tasks import SinusoidTasks
from ..training import AdamUpdate, checkpoint_file, mean_ci
from ..training import checkpoint as ckpt
from ..training.runs import eval_figures, read_eval, write_eval
from . import build_maml, load_run, steps_label, train_models, trained_models
from .configs import SinusoidConfig

KINDS = ("maml", "pretrained", "oracle")
LABELS = {"maml": "MAML", "pretrained": "pretrained", "oracle": "oracle"}
# The inner loop's MAML++ options, off for the baselines, which take no inner step.
NO_INNER_LOOP_OPTIONS = {"multi_step_loss": False, "msl_iterations": 0, "lslr": False, "first_order_iterations": 0}
DIVERGED = 100.0  # an MSE this far above the data's variance (A² / 2 <= 12.5) means the steps diverged


def make_tasks(cfg: SinusoidConfig, kind: str) -> SinusoidTasks:
    t = cfg.task
    return SinusoidTasks(
        tuple(t.amplitude), tuple(t.phase), tuple(t.x_range), cfg.train.device, oracle=kind == "oracle"
    )


def make_learner(cfg: SinusoidConfig, kind: str) -> MAML:
    """MAML for ``maml``; for the baselines the same engine with no inner step, i.e. the plain loss."""
    tasks = make_tasks(cfg, kind)
    model = mlp(tasks.input_dim, cfg.model.hidden, 1)
    if cfg.model.init == "official":
        official_init_(model)
    model = model.to(cfg.train.device)
    if kind == "maml":
        return build_maml(model, F.mse_loss, cfg.maml)
    return build_maml(
        model,
        F.mse_loss,
        cfg.maml,
        inner_steps=0,
        first_order=False,
        adapt=None,
        learn_inner_lr=False,
        **NO_INNER_LOOP_OPTIONS,
    )


def make_sampler(cfg: SinusoidConfig, kind: str, tasks: SinusoidTasks):
    b, ks, kq = cfg.train.meta_batch_size, cfg.task.k_support, cfg.task.k_query
    if kind == "maml":
        return lambda g: tasks.batch(b, ks, kq, g)

    def pooled(g: torch.Generator) -> TaskBatch:
        # The baselines see the same number of points per task, all in one plain regression loss.
        s = tasks.batch(b, ks + kq, 0, g)
        return TaskBatch(s.support_inputs, s.support_targets, s.support_inputs, s.support_targets)

    return pooled


def train(
    cfg: SinusoidConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    changes: dict | None = None,
    only: list[str] | None = None,
) -> bool:
    """Train every model in ``cfg.models`` (or those in ``only``) into ``run_dir/<kind>/``; False if interrupted."""
    t = cfg.train

    def build(kind: str):
        learner = make_learner(cfg, kind)
        sample = make_sampler(cfg, kind, make_tasks(cfg, kind))
        update = AdamUpdate(
            learner,
            sample,
            t.meta_lr,
            t.grad_clip,
            lr_schedule=t.lr_schedule,
            min_lr=t.min_meta_lr,
            iterations=t.iterations,
        )
        return learner, update, {}

    hint = f"a step size too large (train.meta_lr={t.meta_lr:g}, maml.inner_lr={cfg.maml.inner_lr:g})"
    return train_models(cfg, run_dir, resume, progress, changes, build, only, hint=hint)


def load_learner(
    run_dir: str | Path, kind: str, device: str | None = None, overrides: list[str] = (), iteration: int | None = None
) -> tuple[MAML, SinusoidConfig, dict]:
    """A trained model, its config (``eval.*`` overrides applied) and its checkpoint."""
    path = checkpoint_file(Path(run_dir) / kind, iteration)
    cfg, state = load_run(path, run_dir, device, overrides)
    learner = make_learner(cfg, kind)
    ckpt.load_weights(learner, state, path)
    return learner, cfg, state


def test_tasks(cfg: SinusoidConfig, kind: str, n: int, k: int, seed: int) -> TaskBatch:
    """``n`` tasks from ``seed``: the same tasks and points for every model and every K ≤ max K
    (the first ``k`` of a fixed set of support points), and ``eval.query_points`` held-out points."""
    tasks = make_tasks(cfg, kind)
    g = torch.Generator(cfg.train.device).manual_seed(seed)
    amp, phase = tasks.sample_params(n, g)
    kmax = max(max(cfg.eval.shots), k)
    sx, sy = tasks.sample_points(amp, phase, kmax, g)
    qx, qy = tasks.sample_points(amp, phase, cfg.eval.query_points, g)
    return TaskBatch(sx[:, :k], sy[:, :k], qx, qy)


def evaluate(
    run_dir: str | Path,
    device: str | None = None,
    progress: bool = True,
    overrides: list[str] = (),
    models: list[str] | None = None,
    name: str | None = None,
    iteration: int | None = None,
) -> dict:
    """MSE after 0..steps gradient steps on K-shot support sets, for each trained model.

    The pretrained model's step size is tuned per K on held-out tasks (mean MSE over steps
    1..steps); the oracle needs no step. Writes ``eval.json`` and ``eval.md`` (``eval-NAME.*`` with ``name``).
    """
    run_dir = Path(run_dir)
    kinds = trained_models(run_dir, KINDS, models, iteration)
    results: dict = {"models": {}}
    for kind in tqdm(kinds, desc="eval", disable=not progress, dynamic_ncols=True):
        learner, cfg, state = load_learner(run_dir, kind, device, overrides, iteration)
        e = cfg.eval
        results["eval"] = to_dict(cfg)["eval"]
        per_k = {}
        for k in e.shots:
            steps = 0 if kind == "oracle" else e.steps
            if kind == "pretrained":
                lr, tuning = _tune_lr(learner, cfg, kind, k)
            else:
                learned = cfg.maml.learn_inner_lr or cfg.maml.lslr
                lr = e.inner_lr if e.inner_lr is not None else (None if learned else cfg.maml.inner_lr)
                tuning = None
            batch = test_tasks(cfg, kind, e.num_tasks, k, e.seed)
            mse = learner.adaptation_curve(batch, steps, lr=lr)["loss"]
            per_k[str(k)] = {"lr": lr if lr is not None else "learned", **summarise(mse)}
            if tuning:
                per_k[str(k)]["lr_tuning"] = tuning
        results["models"][kind] = {"iterations": state["iteration"], "shots": per_k}
    write_eval(run_dir, results, format_table(results), name)
    return results


def summarise(mse: torch.Tensor) -> dict:
    """Per-step statistics of a (tasks, steps + 1) MSE matrix.

    A task whose repeated steps blew up (MSE not finite or above ``DIVERGED``) would make the mean
    meaningless, even ``inf ± nan``: at each step, the mean ± 95% CI is over the other tasks and
    ``diverged`` counts the excluded ones (shown beside the mean, never hidden). The median is over
    all tasks, diverged ones included as the worst.
    """
    bad = ~torch.isfinite(mse) | (mse > DIVERGED)
    means, cis = zip(*(mean_ci(mse[~bad[:, s], s]) for s in range(mse.shape[1])))
    return {
        "mse": [m.item() for m in means],
        "ci95": [c.item() for c in cis],
        "median": mse.nan_to_num(nan=math.inf, posinf=math.inf).median(0).values.tolist(),
        "diverged": bad.sum(0).tolist(),
        "diverged_tasks": int(bad.any(1).sum()),  # at some step
    }


def _tune_lr(learner: MAML, cfg: SinusoidConfig, kind: str, k: int) -> tuple[float, dict]:
    e = cfg.eval
    batch = test_tasks(cfg, kind, e.tune_tasks, k, e.seed + 1)  # held-out tasks, never the test set
    scores = {}
    for lr in e.tune_lrs:
        curve = learner.adaptation_curve(batch, max(e.steps, 1), lr=lr)["loss"].mean(0)
        score = curve[1:].mean().item()
        scores[str(lr)] = score if score == score else float("inf")  # NaN (diverged) never wins
    best = min(e.tune_lrs, key=lambda lr: scores[str(lr)])
    return best, scores


def format_table(results: dict, steps_shown=(0, 1, 5, 10)) -> str:
    """A Markdown table: MSE ± 95% CI per model and K after selected numbers of steps, with the
    number of diverged tasks that each mean leaves out."""
    lines = []
    for kind, res in results["models"].items():
        for k, r in res["shots"].items():
            cells = [_cell(r, s) for s in steps_shown]
            lr = "–" if kind == "oracle" else r["lr"] if isinstance(r["lr"], str) else f"{r['lr']:g}"
            lines.append(f"| {LABELS[kind]} | {k} | {lr} | " + " | ".join(cells) + " |")
    e, models = results["eval"], results["models"]
    notes = []
    if "oracle" in models:
        notes.append("the oracle takes no steps")
    if "pretrained" in models:
        notes.append(
            f"the pretrained baseline's step size is chosen for each K among {e['tune_lrs']} on "
            f"{e['tune_tasks']} held-out tasks (lowest mean MSE over the steps)"
        )
    if any(any(r.get("diverged", [])) for m in models.values() for r in m["shots"].values()):
        notes.append(
            f"a task whose MSE after some steps is above {DIVERGED:g} or not finite has diverged: the mean "
            "leaves it out and the cell counts it (eval.json also has the median of all tasks)"
        )
    head = (
        f"MSE on {e['num_tasks']} test tasks (mean ± 95% CI)" + "".join(f"; {n}" for n in notes) + ".\n\n"
        "| model | K | step size | " + " | ".join(map(steps_label, steps_shown)) + " |\n"
        "|---|---|---|" + "---|" * len(steps_shown) + "\n"
    )
    return head + "\n".join(lines) + "\n"


def _cell(r: dict, steps: int) -> str:
    """``mean ± CI`` after ``steps`` steps and the diverged tasks the mean leaves out; "–" for a step
    count not run or a mean with no task left, no "± nan" where a single task leaves the CI undefined."""
    if steps >= len(r["mse"]):
        return "–"
    mean, ci = r["mse"][steps], r["ci95"][steps]
    cell = f"{mean:.3f}" + (f" ± {ci:.3f}" if _finite(ci) else "") if _finite(mean) else "–"
    diverged = r.get("diverged", [0] * len(r["mse"]))[steps]
    return cell + (f" ({diverged} diverged)" if diverged else "")


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)  # eval.json stores an undefined number as null


def plot(run_dir: str | Path, name: str | None = None, task_index: int = 0) -> list[Path]:
    """The paper's Figures 2 and 3 for a run once it is evaluated (``eval-NAME.json`` with ``name``),
    and its training curves."""
    import matplotlib.pyplot as plt

    from .. import plots

    run_dir = Path(run_dir)
    figures = eval_figures(run_dir, name)
    # The models' logged losses differ: say which each one is, on an axis named for what they share.
    losses = {
        "maml": "MAML: query MSE after the inner steps",
        "pretrained": "pretrained: MSE, no inner step",
        "oracle": "oracle: MSE, the task given as input",
    }
    curves = {losses[k]: run_dir / k for k in KINDS if (run_dir / k / "metrics.csv").exists()}
    out = [plots.training_curves(curves, run_dir / "plots" / "training_loss.png", ylabel="training MSE")]
    if name is None and not (run_dir / "eval.json").exists():
        return out
    results = read_eval(run_dir, name)
    models = results["models"]
    shots = list(next(iter(models.values()))["shots"])
    # Figure 3: MSE against gradient steps, one panel per K.
    out.append(plots.save(mse_figure(results), figures / "mse_vs_steps.png"))

    # Figure 2: K-shot fits of one test task after 0, 1 and 10 steps.
    fitted = [k for k in ("maml", "pretrained") if k in models]
    kshots = [k for k in ("5", "10") if k in shots] or shots[:1]
    fig, axes = plt.subplots(len(kshots), len(fitted), figsize=(5 * len(fitted), 3.6 * len(kshots)), squeeze=False)
    for row, k in zip(axes, kshots):
        for ax, kind in zip(row, fitted):
            learner, cfg, _ = load_learner(run_dir, kind, "cpu")
            lr = models[kind]["shots"][k]["lr"]
            _plot_fit(ax, learner, cfg, kind, int(k), None if lr == "learned" else lr, task_index)
            ax.set_title(f"{LABELS[kind]}, K = {k}")
    out.append(plots.save(fig, figures / "fits.png"))
    return out


def mse_figure(results: dict):
    """The paper's Figure 3 from ``eval.json``'s results: MSE against gradient steps, one panel per K."""
    import matplotlib.pyplot as plt

    from .. import plots

    models = results["models"]
    shots = list(next(iter(models.values()))["shots"])
    fig, axes = plt.subplots(1, len(shots), figsize=(4.5 * len(shots), 3.8), squeeze=False)
    for ax, k in zip(axes[0], shots):
        series = {}
        for kind, m in models.items():
            r = m["shots"][k]
            n = r.get("diverged_tasks", 0)
            label = LABELS[kind] + (f" ({n} of {results['eval']['num_tasks']} tasks diverged)" if n else "")
            series[label] = (r["mse"], r["ci95"])
        plots.steps_curves(ax, series, "mean squared error", legend={"fontsize": 8})
        _clip_to_unadapted(ax, series)
        ax.set_title(f"K = {k}")
    return fig


def _clip_to_unadapted(ax, series: dict[str, tuple[list, list]]) -> None:
    """Keep the y axis at the scale of the unadapted error, so that one curve that climbs (a large
    step size) does not flatten the others; its points above the axis are drawn as ▲ on the top edge."""
    unadapted = [mean[0] for mean, _ in series.values() if mean and _finite(mean[0])]
    if not unadapted:
        return
    top = 1.15 * max(unadapted)
    ax.set_ylim(0, top)
    # steps_curves draws one labelled line per series, in order (no published references here)
    for line, (mean, _) in zip([ln for ln in ax.get_lines() if not ln.get_label().startswith("_")], series.values()):
        above = [i for i, v in enumerate(mean) if not _finite(v) or v > top]
        if above and len(mean) > 1:
            ax.plot(above, [top] * len(above), "^", color=line.get_color(), clip_on=False, ms=6)


def _plot_fit(ax, learner: MAML, cfg: SinusoidConfig, kind: str, k: int, lr, task_index: int) -> None:
    tasks = make_tasks(cfg, kind)
    batch = test_tasks(cfg, kind, task_index + 1, k, cfg.eval.seed)
    xs = torch.linspace(*cfg.task.x_range, 200).view(1, -1, 1)
    # The task's (A, phi): the first draws of the seeded stream that test_tasks used.
    g = torch.Generator(cfg.train.device).manual_seed(cfg.eval.seed)
    amp, phase = tasks.sample_params(task_index + 1, g)
    amp, phase = amp[task_index : task_index + 1], phase[task_index : task_index + 1]
    si, st = batch.support_inputs[task_index], batch.support_targets[task_index]
    grid_in = tasks.inputs(xs, amp, phase)[0]
    ax.plot(xs.view(-1), tasks.targets(xs, amp, phase).view(-1), "r", lw=2, label="ground truth")
    ax.scatter(si[:, 0], st.view(-1), marker="^", c="purple", zorder=5, label=f"{k} support points")
    params = learner.params()
    with torch.no_grad():
        ax.plot(xs.view(-1), learner(grid_in, params).view(-1), ":", c="g", label="pre-update")
    for steps, style in ((1, "--"), (10, "-")):
        adapted = learner.adapt(si, st, steps=steps, lr=lr)
        with torch.no_grad():
            ax.plot(
                xs.view(-1), learner(grid_in, adapted).view(-1), style, label=f"{steps} grad step{'s' * (steps > 1)}"
            )
    ax.set_ylim(-6, 6)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(fontsize=7, loc="lower left")
