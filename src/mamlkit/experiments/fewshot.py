"""Few-shot image classification: Omniglot and MiniImagenet (paper Section 5.2), and folders of your own images."""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import distributed
from ..config import apply_overrides, to_dict
from ..engine import MAML
from ..models import ADAPT_ALL_BUT_NORM, classifier
from ..tasks.fewshot import FewShotTasks
from ..training import BEST, CHECKPOINT, AdamUpdate, Trainer, checkpoint_file, mean_ci, start_run
from ..training import checkpoint as ckpt
from ..training.runs import deadline, eval_figures, read_eval, write_eval
from . import build_maml, load_run, step_cells, steps_label
from .configs import FewShotConfig

MODERN_QUERY = 15
# A folder run's classes per split as it trained (data.split_file's format): --resume and evaluation
# read it, so classes added to the folder later (which reshuffle the default split) never move a
# training class into the test split.
SPLIT_RECORD = "split.csv"


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(-1) == labels).float().mean()


@functools.lru_cache(maxsize=2)
def _omniglot(root, resize: str, cache_dir):
    """Both archives, read once per process however many splits are asked for."""
    from ..data.omniglot import load_omniglot

    return load_omniglot(root, resize=resize, cache_dir=cache_dir)


def _folder_index(cfg: FewShotConfig):
    """The folder's classes, images and split, listed without reading a pixel."""
    from ..data.folder import scan_folder

    d = cfg.data
    return scan_folder(d.root, split_file=d.split_file, split_fractions=tuple(d.split_fractions))


def folder_needs(cfg: FewShotConfig, split: str) -> tuple[int, int]:
    """(images per class, classes) that tasks on ``split`` draw: the shots plus the most queries
    per class of that phase (training, validation, each test protocol), and ``n_way``."""
    k = cfg.task.k_shot
    queries = {"train": cfg.task.q_query, "val": k}.get(split)
    if queries is None:
        queries = max(k if p == "paper" else MODERN_QUERY for p in cfg.eval.query)
    return k + queries, cfg.task.n_way


def check_folder(cfg: FewShotConfig) -> None:
    """Refuse, before training, a folder whose splits cannot fill the run's tasks, test included
    (which only evaluation reads): a short class then stops the run now, not after it."""
    index = _folder_index(cfg)
    for split in ("train", "val", "test") if cfg.train.validate_every else ("train", "test"):
        index.check(split, *folder_needs(cfg, split))


def record_split(cfg: FewShotConfig, run_dir: Path) -> None:
    """Write the folder's split as the run trains on it to ``run_dir/split.csv``."""
    index = _folder_index(cfg)
    if not distributed.is_main():
        return
    tmp = run_dir / f".{SPLIT_RECORD}.tmp"  # then renamed: a crash never leaves half a split to resume from
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "split"])
        for split, ids in index.splits.items():
            writer.writerows([index.classes[c], split] for c in ids)
    os.replace(tmp, run_dir / SPLIT_RECORD)


def with_recorded_split(cfg: FewShotConfig, run_dir: str | Path) -> FewShotConfig:
    """``cfg`` reading a folder run's recorded split, where it has one (the run's config is unchanged)."""
    recorded = Path(run_dir) / SPLIT_RECORD
    if cfg.data.dataset != "folder" or not recorded.is_file():
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split_file=str(recorded)))


def load_split(cfg: FewShotConfig, split: str) -> Tensor:
    """The split's images ``[classes, examples, ...]`` on the training device, loaded once."""
    d = cfg.data
    if d.dataset == "omniglot":
        images = _omniglot(d.root, d.resize, d.cache_dir).split_images(split)
    elif d.dataset == "folder":
        from ..data.folder import load_folder

        channels, size, _ = d.image_shape()
        data = load_folder(
            d.root,
            image_size=size,
            channels=channels,
            split_file=d.split_file,
            split_fractions=tuple(d.split_fractions),
            cache_dir=d.cache_dir,
        )
        images = data.split_images(split, *folder_needs(cfg, split))
    else:
        from ..data.miniimagenet import load_miniimagenet

        images = load_miniimagenet(d.root, split, split_dir=d.split_dir, cache_dir=d.cache_dir).images
    return images.to(cfg.train.device)


def make_tasks(cfg: FewShotConfig, images: Tensor, q_query: int) -> FewShotTasks:
    omniglot = cfg.data.dataset == "omniglot"
    return FewShotTasks(
        images,
        cfg.task.n_way,
        cfg.task.k_shot,
        q_query,
        rotate=cfg.data.rotate and omniglot,
        scale=None if images.is_floating_point() else 1 / 255,
    )


def make_model(cfg: FewShotConfig) -> nn.Module:
    return classifier(cfg.model.arch, cfg.task.n_way, cfg.data.image_shape())


def make_learner(cfg: FewShotConfig) -> MAML:
    adapt = cfg.maml.adapt if cfg.maml.adapt is not None else ADAPT_ALL_BUT_NORM
    return build_maml(make_model(cfg).to(cfg.train.device), F.cross_entropy, cfg.maml, adapt=adapt)


def accuracy_curve(
    learner: MAML, tasks: FewShotTasks, n_tasks: int, chunk: int, steps: int, lr, seed: int, device, desc: str = ""
):
    """Query accuracy of ``n_tasks`` tasks (from ``seed``) after 0..steps inner steps: ``[n_tasks, steps+1]``;
    a progress bar in tasks when ``desc`` is given."""
    g = torch.Generator(device).manual_seed(seed)
    rows = []
    with tqdm(total=n_tasks, desc=desc, unit="task", disable=not desc, dynamic_ncols=True, leave=False) as bar:
        for start in range(0, n_tasks, chunk):
            batch = tasks.batch(min(chunk, n_tasks - start), g)
            rows.append(learner.adaptation_curve(batch, steps, lr=lr, metrics={"acc": accuracy})["acc"])
            bar.update(batch.support_targets.shape[0])
    return torch.cat(rows)


def _test_lr(cfg: FewShotConfig):
    if cfg.eval.inner_lr is not None:
        return cfg.eval.inner_lr
    return None if cfg.maml.learn_inner_lr or cfg.maml.lslr else cfg.maml.inner_lr


def train(
    cfg: FewShotConfig, run_dir: str | Path, resume: bool = False, progress: bool = True, changes: dict | None = None
) -> bool:
    data_cfg = with_recorded_split(cfg, run_dir) if resume else cfg  # the config itself stays as saved
    if cfg.data.dataset == "folder":
        check_folder(data_cfg)  # before start_run writes anything
    run_dir = start_run(cfg, run_dir, resume, changes)
    if cfg.data.dataset == "folder" and not resume:
        record_split(cfg, run_dir)
    t = cfg.train
    torch.manual_seed(t.seed)
    learner = make_learner(cfg)
    train_tasks = make_tasks(cfg, load_split(data_cfg, "train"), cfg.task.q_query)
    validate = None
    if t.validate_every:
        # Validation under the paper's protocol (K queries per class) after the training step count,
        # on the same tasks each time so that scores are comparable; it selects best.pt.
        val_tasks = make_tasks(cfg, load_split(data_cfg, "val"), cfg.task.k_shot)

        def validate() -> dict[str, float]:
            acc = accuracy_curve(
                learner, val_tasks, t.val_tasks, cfg.eval.task_batch, cfg.maml.inner_steps, None, t.seed + 7, t.device
            )[:, -1]
            return {"val_acc": acc.mean().item()}

    generator = torch.Generator(t.device).manual_seed(t.seed + 100)
    trainer = Trainer(
        run_dir,
        learner,
        AdamUpdate(
            learner,
            lambda g: train_tasks.batch(t.meta_batch_size, g),
            t.meta_lr,
            t.grad_clip,
            lr_schedule=t.lr_schedule,
            min_lr=t.min_meta_lr,
            iterations=t.iterations,
        ),
        generator,
        iterations=t.iterations,
        checkpoint_every=t.checkpoint_every,
        keep_every=t.keep_every,
        log_every=t.log_every,
        metadata={"config": to_dict(cfg)},
        validate=validate,
        validate_every=t.validate_every,
        select_on="val_acc" if validate else None,
        deadline=deadline(t.time_limit),
        name=run_dir.name,
        nonfinite=t.nonfinite,
        hint=f"a step size too large (train.meta_lr={t.meta_lr:g}, maml.inner_lr={cfg.maml.inner_lr:g})",
    )
    return trainer.fit(resume=resume, progress=progress)


def load_learner(
    run_dir: Path, device: str | None = None, overrides: list[str] = (), iteration: int | None = None
) -> tuple[MAML, FewShotConfig, dict]:
    """The weights that ``eval.checkpoint`` names (``best.pt``, chosen on validation, when the
    run has one; else the last checkpoint), or those kept of ``iteration``, with the config they
    were trained with."""
    asked = apply_overrides({}, list(overrides)).get("eval", {}).get("checkpoint")  # read before any file
    if iteration is not None:
        if asked:
            raise ValueError(f"--iteration {iteration} names the weights; drop --set eval.checkpoint={asked}")
        path = checkpoint_file(run_dir, iteration)
    elif (run_dir / BEST).exists() and asked != "last":
        path = run_dir / BEST
    else:
        path = run_dir / CHECKPOINT
    try:
        cfg, state = load_run(path, run_dir, device, overrides)
    except ckpt.CorruptCheckpoint as e:
        if path.name != BEST:
            raise
        raise ckpt.CorruptCheckpoint(f"{e}; evaluate the last checkpoint instead: --set eval.checkpoint=last") from None
    if path.name == BEST and cfg.eval.checkpoint == "last":  # "last" set in the run's config
        path = run_dir / CHECKPOINT
        cfg, state = load_run(path, run_dir, device, overrides)
    learner = make_learner(cfg)
    ckpt.load_weights(learner, state, path)
    return learner, cfg, {"checkpoint": path.name, "iteration": state["iteration"], "val_acc": state.get("val_acc")}


def evaluate(
    run_dir: str | Path,
    device: str | None = None,
    progress: bool = True,
    overrides: list[str] = (),
    models: list[str] | None = None,
    name: str | None = None,
    iteration: int | None = None,
) -> dict:
    """Test accuracy (mean ± 95% CI) after 0..steps steps, per query protocol; writes eval.json/eval.md
    (``eval-NAME.*`` with ``name``)."""
    run_dir = Path(run_dir)
    if models:
        raise ValueError("a few-shot run trains one model; evaluate it without --models")
    learner, cfg, source = load_learner(run_dir, device, overrides, iteration)
    test_images = load_split(with_recorded_split(cfg, run_dir), "test")
    results = {
        "source": source,
        "eval": to_dict(cfg)["eval"],
        "resize": cfg.data.resize,
        "dataset": cfg.data.dataset,
        "n_way": cfg.task.n_way,
        "k_shot": cfg.task.k_shot,
        # How BatchNorm normalised the test queries: transductive = with the query batch's statistics,
        # inductive = with running statistics from meta-training, per_step = MAML++'s (batch statistics).
        "norm": cfg.maml.norm,
        "protocols": {},
    }
    for protocol in cfg.eval.query:
        q = cfg.task.k_shot if protocol == "paper" else MODERN_QUERY
        tasks = make_tasks(cfg, test_images, q)
        acc = accuracy_curve(
            learner,
            tasks,
            cfg.eval.num_tasks,
            cfg.eval.task_batch,
            cfg.eval.steps,
            _test_lr(cfg),
            cfg.eval.seed,
            cfg.train.device,
            desc=f"eval ({protocol} query)" if progress else "",
        )
        mean, ci = mean_ci(acc * 100)
        results["protocols"][protocol] = {"query_per_class": q, "acc": mean.tolist(), "ci95": ci.tolist()}
    write_eval(run_dir, results, format_table(results), name)
    return results


def format_table(results: dict, steps_shown=(0, 1, 3, 5, 10)) -> str:
    src = results["source"]
    head = (
        f"{results['dataset']} {results['n_way']}-way {results['k_shot']}-shot, {results['eval']['num_tasks']} test "
        f"tasks, accuracy % (mean ± 95% CI); weights: {src['checkpoint']} (iteration {src['iteration']}"
        + (f", validation accuracy {src['val_acc']:.3f}" if src.get("val_acc") is not None else "")
        + f"); Omniglot resize: {results['resize']}"
        + (f"; BatchNorm: {results['norm']}" if results.get("norm", "transductive") != "transductive" else "")
        + ".\n\n"
    )
    lines = [
        "| query per class | " + " | ".join(map(steps_label, steps_shown)) + " |",
        "|---|" + "---|" * len(steps_shown),
    ]
    for protocol, r in results["protocols"].items():
        cells = step_cells(r["acc"], r["ci95"], steps_shown, 2)
        lines.append(f"| {r['query_per_class']} ({protocol}) | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def plot(run_dir: str | Path, name: str | None = None) -> list[Path]:
    """Learning curves (training loss, validation accuracy) and, once evaluated (``eval-NAME.json``
    with ``name``), test accuracy against steps."""
    import matplotlib.pyplot as plt

    from .. import plots

    run_dir = Path(run_dir)
    loss = "meta-training loss (query cross-entropy after the inner steps)"
    out = [plots.training_curves({"meta-training": run_dir}, run_dir / "plots" / "training_loss.png", ylabel=loss)]
    rows = [r for r in plots.read_metrics(run_dir / "metrics.csv") if "val_acc" in r]
    if rows:  # val_acc is logged as a fraction; the tables give accuracy in percent
        acc = {"key": "val_acc", "logy": False, "scale": 100, "ylabel": "validation accuracy (%)"}
        out.append(plots.training_curves({"validation tasks": run_dir}, run_dir / "plots" / "val_acc.png", **acc))
    if name is not None or (run_dir / "eval.json").exists():  # the learning curves need no evaluation
        results = read_eval(run_dir, name)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        series = {f"{r['query_per_class']} query/class": (r["acc"], r["ci95"]) for r in results["protocols"].values()}
        plots.steps_curves(ax, series, "test accuracy (%)")
        ax.set_title(f"{results['dataset']} {results['n_way']}-way {results['k_shot']}-shot")
        out.append(plots.save(fig, eval_figures(run_dir, name) / "accuracy_vs_steps.png"))
    return out
