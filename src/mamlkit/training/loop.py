"""The one meta-training loop: every experiment's models train here.

The loop owns what every run needs (resume, the time limit, Ctrl-C and SIGTERM, the metric
log, the progress bar, checkpoints, validation and ``best.pt``); the outer update is a piece
it is given: ``AdamUpdate`` for supervised MAML, ``mamlkit.rl.MetaTRPOUpdate`` for RL.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import distributed
from ..engine import NonFinite, TaskBatch
from ..engine.mamlpp import LR_SCHEDULES, cosine_lr
from . import checkpoint as ckpt
from .files import write_file
from .metrics import MetricLog

CHECKPOINT = "checkpoint.pt"


def kept_checkpoint(model_dir: str | Path, iteration: int) -> Path:
    """The checkpoint of ``iteration`` that ``train.keep_every`` kept in ``model_dir``."""
    return Path(model_dir) / f"checkpoint-{iteration}.pt"


def kept_iterations(model_dir: str | Path) -> list[int]:
    """The iterations whose checkpoints ``train.keep_every`` kept in ``model_dir``, in order."""
    found = (re.fullmatch(r"checkpoint-(\d+)\.pt", p.name) for p in Path(model_dir).glob("checkpoint-*.pt"))
    return sorted(int(m[1]) for m in found if m)


def checkpoint_file(model_dir: str | Path, iteration: int | None = None) -> Path:
    """``model_dir``'s latest checkpoint, or with ``iteration`` the one kept of that iteration;
    a missing kept one is refused with the iterations that were kept."""
    if iteration is None:
        return Path(model_dir) / CHECKPOINT
    path = kept_checkpoint(model_dir, iteration)
    if not path.exists():
        kept = kept_iterations(model_dir)
        raise FileNotFoundError(
            f"{model_dir}: no checkpoint of iteration {iteration} was kept; "
            + (f"kept: {kept}" if kept else "train with train.keep_every=N to keep every N-th iteration's checkpoint")
        )
    return path


BEST = "best.pt"


class RunExistsError(RuntimeError):
    pass


class DivergedError(RuntimeError):
    """Training stopped at a batch whose meta-loss or meta-gradient is not finite."""


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite (one device synchronisation)."""
    tensors = [t for t in tensors if t is not None]
    # The max-norm: an L2 norm of large finite values can overflow to inf (a false alarm).
    return bool(torch.stack(torch._foreach_norm(tensors, float("inf"))).isfinite().all()) if tensors else True


class Update(Protocol):
    """One outer step of the meta-parameters: draws its own batch from ``generator``, changes
    the learner in place and returns the step's metrics (floats or scalar tensors)."""

    def step(self, generator: torch.Generator) -> dict[str, float | Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    params = list(params)
    try:  # fused Adam is faster per step than foreach on small models (BENCHMARKS.md)
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr)


class AdamUpdate:
    """Supervised MAML's outer step: the meta-gradient of a batch from ``sample(generator)``
    (``learner.meta_backward``), clipped elementwise to ``[-grad_clip, grad_clip]`` if given,
    then one Adam step.

    Under ``torchrun`` every rank draws the same batch from the shared task stream and computes
    its own share of the tasks; the shares' meta-gradients and losses are summed, weighted by
    task counts, so every rank takes the same step as one process would.

    ``lr_schedule="cosine"`` anneals Adam's step size from ``meta_lr`` at iteration 0 to ``min_lr``
    at ``iterations`` (:func:`~mamlkit.engine.mamlpp.cosine_lr`, MAML++). The step size, the
    learner's multi-step loss weights and derivative order are functions of the iteration, which
    the ``Trainer`` gives :meth:`set_iteration` before every step, so a resumed run reproduces them.
    """

    def __init__(
        self,
        learner: nn.Module,
        sample: Callable[[torch.Generator], TaskBatch],
        meta_lr: float,
        grad_clip: float | None = None,
        lr_schedule: str = "constant",
        min_lr: float = 0.0,
        iterations: int | None = None,
    ):
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
        if lr_schedule == "cosine" and not iterations:
            raise ValueError("lr_schedule='cosine' anneals over the run: give iterations (the run's length)")
        if distributed.active() and getattr(learner, "norm", None) == "inductive":
            raise ValueError(
                "norm='inductive' accumulates running statistics from each process's own share of the tasks, so "
                "the processes of a torchrun run would disagree: train it in one process, or use another maml.norm"
            )
        self.learner, self.sample, self.grad_clip = learner, sample, grad_clip
        self.meta_lr, self.lr_schedule, self.min_lr, self.iterations = meta_lr, lr_schedule, min_lr, iterations
        self.optimizer = make_optimizer(learner.parameters(), meta_lr)

    def set_iteration(self, iteration: int) -> None:
        """Set what depends on the iteration (0-based) before its step: the outer step size under
        the cosine schedule, and the learner's own (``MAML.set_iteration``)."""
        if self.lr_schedule == "cosine":
            lr = cosine_lr(self.meta_lr, self.min_lr, iteration, self.iterations)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        set_learner = getattr(self.learner, "set_iteration", None)
        if set_learner is not None:
            set_learner(iteration)

    def step(self, generator: torch.Generator) -> dict[str, Tensor]:
        batch = self.sample(generator)
        self.optimizer.zero_grad(set_to_none=True)
        if not distributed.active():
            loss = self.learner.meta_backward(batch)
        else:
            n = torch.utils._pytree.tree_leaves(batch.support_inputs)[0].shape[0]
            part = distributed.shard(n)
            loss = self.learner.meta_backward(TaskBatch(*torch.utils._pytree.tree_map(lambda t: t[part], tuple(batch))))
            share = (part.stop - part.start) / n
            grads = [p.grad for p in self.learner.parameters() if p.grad is not None]
            for g in grads:
                g.mul_(share)
            loss = loss * share
            distributed.all_reduce_sum_([*grads, loss])
        if not all_finite([loss.reshape(1)]):
            raise NonFinite("meta-loss")
        if not all_finite([p.grad for p in self.learner.parameters()]):
            raise NonFinite("meta-gradient")
        if self.grad_clip:
            for p in self.learner.parameters():
                if p.grad is not None:
                    p.grad.clamp_(-self.grad_clip, self.grad_clip)
        self.optimizer.step()
        if self.lr_schedule != "constant":  # the step size taken, logged (a window's mean) beside the loss
            return {"loss": loss, "meta_lr": self.optimizer.param_groups[0]["lr"]}
        return {"loss": loss}

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


class Trainer:
    """Trains ``learner`` with ``update`` for ``iterations`` outer steps in ``run_dir``.

    ``run_dir`` receives ``checkpoint.pt`` (every ``checkpoint_every`` iterations, at the end and
    when stopped; also kept as ``checkpoint-N.pt`` every ``keep_every`` iterations),
    ``metrics.csv`` and ``tb/`` (each metric averaged over ``log_every`` iterations, with
    ``its_per_s``), and ``best.pt`` when ``validate`` and ``select_on`` are given (the weights
    with the highest ``select_on``). ``fit(resume=True)`` continues from the
    checkpoint with the same weights, update state and random-number state.

    ``deadline`` (a ``time.monotonic()`` value) stops training as Ctrl-C does once passed:
    the checkpoint is saved and ``--resume`` continues. ``show`` names the metrics the progress
    bar displays.

    A batch whose meta-loss or meta-gradient is not finite (the update raises ``NonFinite``
    before it changes anything) stops training with ``DivergedError``, keeping the last
    checkpoint and ``best.pt`` (``nonfinite="stop"``), or is skipped and counted
    (``nonfinite="skip"``); ``hint`` names the likely cause in the message.
    """

    def __init__(
        self,
        run_dir: str | Path,
        learner: nn.Module,
        update: Update,
        generator: torch.Generator,
        *,
        iterations: int,
        checkpoint_every: int,
        log_every: int,
        keep_every: int = 0,
        metadata: dict | None = None,
        validate: Callable[[], dict[str, float]] | None = None,
        validate_every: int = 0,
        select_on: str | None = None,
        deadline: float = float("inf"),
        name: str = "train",
        show: tuple[str, ...] = ("loss",),
        nonfinite: str = "stop",
        hint: str = "",
        wandb: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.learner, self.update, self.generator = learner, update, generator
        self.iterations = iterations
        self.checkpoint_every, self.log_every, self.keep_every = checkpoint_every, log_every, keep_every
        self.metadata = metadata or {}
        self.validate, self.validate_every, self.select_on = validate, validate_every, select_on
        self.best = float("-inf")
        self.deadline = deadline
        self.name, self.show = name, show
        self.nonfinite, self.hint = nonfinite, hint
        self.wandb = wandb
        self.iteration = 0

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def save(self) -> None:
        if not distributed.is_main():
            return
        ckpt.save_atomic(
            {
                "iteration": self.iteration,
                "learner": self.learner.state_dict(),
                "update": self.update.state_dict(),
                "rng": ckpt.rng_state(self.generator),
                "best": self.best,
                **self._strategy(),
                **self.metadata,
            },
            self.checkpoint_path,
        )
        if self._keeps(self.iteration):
            self._keep()

    def _keeps(self, iteration: int) -> bool:
        return bool(self.keep_every and iteration and iteration % self.keep_every == 0)

    def _keep(self) -> None:
        """Give the checkpoint just written a second name, ``checkpoint-N.pt``, which later saves
        leave alone (they replace ``checkpoint.pt`` by a rename). Made under a temporary name and
        renamed too, so a kill never leaves a partial one."""
        kept = kept_checkpoint(self.run_dir, self.iteration)
        tmp = kept.with_name(f".{kept.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:  # a hard link: no copy
            os.link(self.checkpoint_path, tmp)
        except OSError:  # a file system without hard links
            with open(self.checkpoint_path, "rb") as src:
                write_file(kept, lambda f: shutil.copyfileobj(src, f))
            return
        os.replace(tmp, kept)

    def _maybe_save_best(self, row: dict) -> None:
        """Keep the weights with the best validation score (``select_on``, higher is better)."""
        if (
            not distributed.is_main()
            or self.select_on is None
            or self.select_on not in row
            or not row[self.select_on] > self.best
        ):
            return
        self.best = row[self.select_on]
        ckpt.save_atomic(
            {
                "iteration": self.iteration,
                "learner": self.learner.state_dict(),
                self.select_on: self.best,
                **self.metadata,
            },
            self.run_dir / BEST,
        )

    def _strategy(self) -> dict:
        """The strategy ``auto`` chose and the device it chose on, for a resume to keep
        (``MAML.keep_strategy``)."""
        learner = self.learner
        if getattr(learner, "_requested", None) == "auto" and getattr(learner, "_strategy_chosen", False):
            return {"strategy": learner.strategy, "strategy_device": self._device_type()}
        return {}

    def _device_type(self) -> str:
        return next((p.device.type for p in self.learner.parameters()), "cpu")

    def _keep_strategy(self, state: dict, reseeded: bool) -> None:
        """Keep the strategy the run trained with, unless it was chosen on another device type: the
        ranking there says nothing about this one (a CPU's choice of the loop made a GPU run many times
        slower), and the run does not continue exactly across devices anyway."""
        kept = state.get("strategy")
        if not isinstance(kept, str) or not hasattr(self.learner, "keep_strategy"):
            return
        # Checkpoints written before the device was recorded: a reseeded task stream means another device.
        chosen_on = state.get("strategy_device", "another" if reseeded else self._device_type())
        if chosen_on == self._device_type():
            self.learner.keep_strategy(kept)
        elif distributed.is_main() and getattr(self.learner, "_requested", None) == "auto":
            where = "another device" if chosen_on == "another" else f"a {chosen_on} device"
            print(f"{self.name}: the strategy {kept!r} was chosen on {where}; 'auto' chooses anew on this one")

    def restore(self) -> None:
        # Rank 0 reads the checkpoint and hands it to the others (no shared disk needed).
        advice = ckpt.resume_advice(self.name)
        try:
            state = distributed.on_main(lambda: ckpt.load(self.checkpoint_path, training=True))
            ckpt.load_weights(self.learner, state, self.checkpoint_path)
            # Checkpoints written before the update piece existed keep Adam's state as "optimizer".
            update_state = state.get("update", state.get("optimizer"))
            if update_state is not None:
                try:
                    self.update.load_state_dict(update_state)
                except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
                    raise ckpt.CorruptCheckpoint(
                        f"checkpoint {self.checkpoint_path}: its outer optimiser's state does not fit this run's "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                    ) from None
            try:
                reseeded = not ckpt.set_rng_state(
                    state["rng"], self.generator, reseed=1_000_003 * (state["iteration"] + 1)
                )
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise ckpt.CorruptCheckpoint(
                    f"checkpoint {self.checkpoint_path}: its random-number state is damaged ({type(e).__name__}: {e})"
                ) from None
        except ckpt.CorruptCheckpoint as e:
            raise ckpt.CorruptCheckpoint(f"{e}{advice}") from None
        if reseeded and distributed.is_main():
            print(
                f"{self.name}: resumed on a {self.generator.device.type} device; the task stream of the other "
                "device cannot continue here, so it continues from a seed of its own (the run is no longer "
                "the one an uninterrupted run on one device would give)"
            )
        self.iteration = state["iteration"]
        self.best = state.get("best", float("-inf"))
        self._keep_strategy(state, reseeded)

    def fit(self, resume: bool = False, progress: bool = True) -> bool:
        """Train to ``iterations``; returns False if stopped early (checkpoint saved).

        Under ``torchrun`` rank 0 alone logs, validates and writes checkpoints; a stop (signal or
        time limit) on any rank stops every rank after the same iteration."""
        exists = distributed.broadcast(self.checkpoint_path.exists())
        stale = distributed.broadcast([] if exists else kept_iterations(self.run_dir))
        if stale:  # a new run would mix its kept checkpoints with these
            raise RunExistsError(
                f"{self.run_dir} holds kept checkpoints of iterations {stale} but no {CHECKPOINT}; restore "
                f"{CHECKPOINT}, or move the checkpoint-N.pt files away to train {self.name} anew there"
            )
        if exists:
            if not resume:
                raise RunExistsError(
                    f"{self.run_dir} already holds a run; pass --resume to continue it or --out for a new one"
                )
            self.restore()
            if distributed.is_main():
                if self._keeps(self.iteration) and not kept_checkpoint(self.run_dir, self.iteration).exists():
                    self._keep()  # killed between the save and the keep
                done = self.iteration >= self.iterations
                print(
                    f"{self.name}: already trained, {self.iteration} of {self.iterations} iterations; nothing to do"
                    if done
                    else f"{self.name}: resuming from iteration {self.iteration} ({self.checkpoint_path})"
                )
        if self.iteration >= self.iterations:
            if not exists:  # nothing to train (the random-init baseline)
                self.save()
            return True
        main = distributed.is_main()
        log = (
            MetricLog(
                self.run_dir,
                resume_from=self.iteration,
                log_every=self.log_every,
                wandb_project=self.wandb,
                name=self.name,
                config=self.metadata.get("config"),
            )
            if main
            else _NoLog()
        )
        bar = tqdm(
            total=self.iterations,
            initial=self.iteration,
            desc=self.name,
            disable=not (progress and main),
            dynamic_ncols=True,
        )
        window = _Window()
        if main and getattr(self.learner, "compiles", False):  # else minutes pass without a sign
            device = self._device_type()
            inert = getattr(self.learner, "_cuda_graphs", False) and device != "cuda"
            bar.write(
                f"{self.name}: compiling the meta-batch computation (torch.compile); the first iterations are slow"
                + (f" (maml.cuda_graphs does nothing on a {device} device: CUDA graphs are CUDA's)" if inert else "")
            )
        set_iteration = getattr(self.update, "set_iteration", None)  # an update whose step depends on it
        try:
            with _stop_requests() as stop:
                while self.iteration < self.iterations:
                    if set_iteration is not None:
                        set_iteration(self.iteration)
                    try:
                        window.add(self.update.step(self.generator))
                    except NonFinite as e:
                        if self.nonfinite != "skip":
                            raise self._diverged(e) from None
                        window.add({"skipped": 1.0})
                    self.iteration += 1
                    it, final = self.iteration, self.iteration == self.iterations
                    if it % self.log_every == 0 or final:
                        count, row = window.count, window.flush()
                        if main and self.validate and self.validate_every and (it % self.validate_every == 0 or final):
                            row.update(self.validate())
                            self._maybe_save_best(row)
                        log.log(it, **row)
                        bar.set_postfix({k: f"{row[k]:.4g}" for k in self.show if k in row}, refresh=False)
                        bar.update(count)
                        window.restart_clock()  # validation and logging do not count as training time
                    if it % self.checkpoint_every == 0 or final or self._keeps(it):
                        if window.count:  # a row ends at every checkpoint: a resume then logs each iteration once
                            bar.update(window.count)
                            log.log(it, **window.flush())
                            window.restart_clock()
                        self.save()
                    if distributed.any_rank(stop.is_set() or (not final and time.monotonic() > self.deadline)):
                        if window.count:  # the partial window's metrics, so the log ends where training did
                            bar.update(window.count)
                            log.log(it, **window.flush())
                        self.save()
                        why = "time limit reached" if time.monotonic() > self.deadline else "stopped"
                        if main:  # the rank that saved it
                            bar.write(f"{why} at iteration {it}; checkpoint saved to {self.checkpoint_path} (--resume)")
                        return False
        finally:
            bar.close()
            log.close()
        return True

    def _diverged(self, e: NonFinite) -> DivergedError:
        path = self.checkpoint_path
        kept = (
            f"the last checkpoint ({path}, iteration {ckpt.load(path)['iteration']}) is kept"
            if path.exists()
            else "no checkpoint had been written yet"
        )
        return DivergedError(
            f"{self.name}: at iteration {self.iteration + 1} {e}; training stopped before that update, "
            f"so no weights were changed by it, and {kept}"
            + (" with best.pt" if (self.run_dir / BEST).exists() else "")
            + f". Likely cause: {self.hint or 'a step size too large'}. "
            "Or set train.nonfinite=skip to skip such batches."
        )


class _NoLog:
    """The metric log of ranks other than 0: they compute, rank 0 writes."""

    def log(self, iteration: int, **values) -> None:
        pass

    def close(self) -> None:
        pass


class _Window:
    """Metrics over the iterations since the last log row: each the mean over the iterations that
    reported it, but ``skipped``, a count. Tensors stay on their device until the row is
    written, so logging costs one synchronisation per row."""

    def __init__(self):
        self.sums: dict = {}
        self.counts: dict[str, int] = {}
        self.count = 0
        self.t0 = time.perf_counter()

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            v = v.detach() if isinstance(v, Tensor) else v
            self.sums[k] = v if k not in self.sums else self.sums[k] + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.count += 1

    def flush(self) -> dict[str, float]:
        row = {k: float(v) / (1 if k == "skipped" else self.counts[k]) for k, v in self.sums.items()}
        row["its_per_s"] = self.count / (time.perf_counter() - self.t0)
        self.sums, self.counts, self.count = {}, {}, 0
        return row

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()


@contextmanager
def _stop_requests():
    """Turn SIGINT, SIGTERM and SIGHUP into a flag checked between iterations, so a checkpoint is never torn."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def handler(signum, frame):
        if flag.is_set():  # a second Ctrl-C stops at once
            signal.default_int_handler(signum, frame)
        flag.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
