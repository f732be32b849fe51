"""MAML: adapt on each task's support set, score the adapted model on its query set."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_step_size, check_steps, step_sizes, task_count
from .functional import FunctionalModel, Params, select_names, unmatched_patterns
from .mamlpp import check_options, msl_weights
from .norm import InductiveBatchNorm, PerStepBatchNorm, convert_norms
from .norm import phase as norm_phase
from .recompute import recomputed_inner_step
from .step_sizes import _key, _step_size, migrate_old_keys
from .strategies import (
    _VMAP_UNSAFE_SECOND_ORDER,
    _VMAP_UNSAFE_SECOND_ORDER_OPS,
    ModelOps,
    candidate_strategies,
    fastest,
    map_tasks,
    module_label,
    record_ops,
    refuse_checkpoint,
    refuse_second_order_ops,
    refuse_vmap_for_ops,
    vmap_unsafe_modules,
)

LossFn = Callable[[Any, Any], Tensor]
StepSize = float | Tensor | Sequence[float | Tensor] | None

_log = logging.getLogger("mamlkit")


class TaskBatch(NamedTuple):
    """A meta-batch: every field has a leading task dimension (inputs and targets may be pytrees)."""

    support_inputs: Any
    support_targets: Any
    query_inputs: Any
    query_targets: Any

    def to(self, device) -> TaskBatch:
        return TaskBatch(*torch.utils._pytree.tree_map(lambda t: t.to(device), tuple(self)))


class MAML(nn.Module):
    """Model-Agnostic Meta-Learning over any ``nn.Module`` and any differentiable loss.

    Args:
        model: the network; its trainable parameters are the meta-parameters.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` used in the inner loop.
        query_loss_fn: loss on the query set (defaults to ``loss_fn``).
        inner_lr: inner step size α: a finite number >= 0 (0 takes no step), or a one-element tensor
            (one that requires grad is meta-learned like a parameter).
        inner_steps: inner gradient steps at training.
        first_order: drop second derivatives (FOMAML).
        adapt: which parameters the inner loop adapts: glob patterns (``["head.*"]``,
            ``["*", "!*.bn.bias"]``; a parameter matches by any of its names), a predicate on names,
            or ``None`` for all. The others are still meta-learned. The set is fixed here, for every
            strategy: a parameter frozen later is still adapted, and gets no meta-gradient.
        learn_inner_lr: Meta-SGD: learn a step size per parameter element.
        strategy: ``"loop"``, ``"vmap"`` or ``"auto"``: the faster of the two, measured on the
            first meta-batch (only the loop where the model holds layers, or calls operations,
            whose second-order gradients vmap gets wrong; an explicit ``"vmap"`` is then refused).
            ``self.strategy`` tells the choice, ``self.strategy_timings`` the measurements, and the
            ``mamlkit`` logger says it and why, once (INFO).
        compile: run the meta-batch computation under ``torch.compile``.
        cuda_graphs: with ``compile`` on CUDA, replay the compiled meta-batch computation as a
            CUDA graph (``mode="reduce-overhead"``): one launch instead of hundreds of small
            kernels per meta-iteration. Shapes must stay fixed; outputs are copied out of the
            graph's buffers so that they survive the next replay.
        checkpoint_inner: trade time for memory in second-order MAML: each inner step keeps only
            its inputs, and its second-order graph is rebuilt in the meta-backward pass, so memory
            grows with the parameter count per step instead of the activations. Each inner step's
            support forward runs twice (once forward, once recomputed). Runs the tasks in a loop,
            eagerly (torch.func transforms cannot recompute).
        autocast: ``"bf16"`` runs the meta-batch computation under ``torch.autocast`` in bfloat16
            (matrix products and convolutions in bf16, parameters and their gradients in float32).
        multi_step_loss: MAML++'s multi-step loss: the meta-loss is a weighted sum of the query losses
            after every inner step, weights by :func:`~mamlkit.engine.mamlpp.msl_weights` at the
            iteration :meth:`set_iteration` gave.
        msl_iterations: the meta-iterations over which those weights anneal from uniform to the
            final step's (after them, the final step's query loss alone); 0 = uniform throughout.
        lslr: MAML++'s LSLR: learn one inner step size per adapted parameter tensor and per inner
            step (``self.step_lrs``, each ``[inner_steps]``, initialised to ``inner_lr``). Steps
            beyond ``inner_steps`` (at evaluation) reuse the last step's sizes.
        first_order_iterations: MAML++'s derivative-order annealing: first order for the first N
            meta-iterations (as :meth:`set_iteration` counts them), second order after; 0 = off.
        norm: BatchNorm mode (:mod:`mamlkit.engine.norm`): ``"transductive"`` (the model as it is:
            batch statistics at training and test), ``"inductive"`` (running statistics from the
            training queries normalise the queries at evaluation) or ``"per_step"`` (MAML++'s
            weight and bias per inner step).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn = F.mse_loss,
        *,
        query_loss_fn: LossFn | None = None,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        adapt: Iterable[str] | Callable[[str], bool] | None = None,
        learn_inner_lr: bool = False,
        strategy: str = "auto",
        compile: bool = False,
        cuda_graphs: bool = False,
        checkpoint_inner: bool = False,
        autocast: str | None = "none",
        multi_step_loss: bool = False,
        msl_iterations: int = 0,
        lslr: bool = False,
        first_order_iterations: int = 0,
        norm: str = "transductive",
    ):
        super().__init__()
        inner_steps = check_steps(inner_steps, "inner_steps")
        check_step_size(inner_lr, "inner_lr")
        check_options(
            inner_steps=inner_steps,
            first_order=first_order,
            learn_inner_lr=learn_inner_lr,
            strategy=strategy,
            compile=compile,
            multi_step_loss=multi_step_loss,
            msl_iterations=msl_iterations,
            lslr=lslr,
            first_order_iterations=first_order_iterations,
            norm=norm,
        )
        self.norm = norm
        replaced = convert_norms(model, norm, inner_steps)
        if norm != "transductive" and not replaced:
            raise ValueError(
                f"norm={norm!r} found no batch normalisation layer (mamlkit.models.BatchNorm, nn.BatchNorm1d/2d/3d) "
                f"in {type(model).__name__}: use norm='transductive' for a model without one"
            )
        layers = [model.get_submodule(n) for n in replaced]
        self._per_step_layers = [m for m in layers if isinstance(m, PerStepBatchNorm)]
        self._step_names = [f"{n}.step" for n, m in zip(replaced, layers) if isinstance(m, PerStepBatchNorm)]
        self._step_cache: list[dict[str, Tensor]] = []
        self._inductive_layers = [m for m in layers if isinstance(m, InductiveBatchNorm)]
        self.multi_step_loss = multi_step_loss
        self.msl_iterations = msl_iterations
        self.first_order_iterations = first_order_iterations
        self.iteration = 0
        # Whether this iteration is in derivative-order annealing's first-order phase: read inside the
        # (compiled) meta-batch computation, it changes once, at the switch, never per iteration.
        self._fo_now = first_order_iterations > 0
        _check_running_stats(model)
        self.model = model
        self.fmodel = FunctionalModel(model)
        self.loss_fn = loss_fn
        self.query_loss_fn = query_loss_fn or loss_fn
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.first_order = first_order
        if isinstance(adapt, str):  # one pattern, not one per character
            adapt = [adapt]
        # Fixed here, for every strategy: freezing a parameter later stops its meta-gradient, not its adaptation.
        self.adapted_names = select_names(self.fmodel.all_names, adapt)
        names = [a for aliases in self.fmodel.all_names.values() for a in aliases]
        if inner_steps > 0 and not self.adapted_names:
            raise ValueError(f"adapt={adapt!r} matches no trainable parameter; names are {names}")
        missed = unmatched_patterns(self.fmodel.all_names, adapt)
        if inner_steps > 0 and missed:
            raise ValueError(f"adapt pattern(s) {missed} match no trainable parameter (a typo?); names are {names}")
        self.learn_inner_lr = learn_inner_lr
        if learn_inner_lr:
            params = self.fmodel.params()
            init = float(inner_lr)
            self.inner_lrs = nn.ParameterDict(
                {_key(n): nn.Parameter(torch.full_like(params[n].detach(), init)) for n in self.adapted_names}
            )
        self.lslr = lslr
        if lslr:
            params = self.fmodel.params()
            init = float(inner_lr)
            self.step_lrs = nn.ParameterDict(
                {
                    _key(n): nn.Parameter(
                        torch.full((inner_steps,), init, dtype=params[n].dtype, device=params[n].device)
                    )
                    for n in self.adapted_names
                }
            )
        if checkpoint_inner and (strategy == "vmap" or compile):
            raise ValueError(
                "checkpoint_inner=True recomputes inner steps with autograd, which torch.func's vmap and "
                "torch.compile cannot do: use strategy='loop' or 'auto' and compile=False"
            )
        self.checkpoint_inner = checkpoint_inner
        if autocast not in (None, "none", "bf16"):
            raise ValueError(f"autocast must be None, 'none' or 'bf16', got {autocast!r}")
        self.autocast = None if autocast == "none" else autocast
        self._second_order = not first_order and inner_steps > 0
        self._requested = strategy
        loop_only = checkpoint_inner or norm == "inductive"
        self._candidates = candidate_strategies("loop" if loop_only else strategy, model, self._second_order)
        self.strategy = self._candidates[0]
        self._ops: ModelOps | None = None  # what one support forward runs, recorded once
        self._mutated_buffers: list[str] = []  # buffers that forward updates in place
        self.strategy_timings: dict[str, float] = {}
        if cuda_graphs and not compile:
            raise ValueError("cuda_graphs=True needs compile=True (the graphs are captured by torch.compile)")
        self._compile = compile
        self._cuda_graphs = cuda_graphs
        self._fns: dict[str, Callable] = {}
        self._warned_unrolled = False
        self._strategy_chosen = False
        self._kept_strategy: str | None = None  # a resumed run's choice, used instead of timing once
        self._vmap_failed_without_graph = False
        # One torch.func.grad transform over the meta-loss beats autograd's backward once compiled
        # (a single compiled graph, no autograd graph to walk), but not in eager mode, where
        # autograd's backward is the faster: see BENCHMARKS.md, sinusoid speed.
        self._functional_grad = compile and not vmap_unsafe_modules(model)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Meta-SGD step sizes saved under their old keys load under the new ones."""
        if self.learn_inner_lr:
            migrate_old_keys(state_dict, prefix, self.adapted_names)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def compiles(self) -> bool:
        """Whether the meta-batch computation runs under ``torch.compile`` (its first calls compile)."""
        return self._compile

    # -- functional pieces -------------------------------------------------------------

    def params(self) -> Params:
        """The meta-parameters by name (shared weights once)."""
        return self.fmodel.params()

    def forward(self, inputs, params: Params | None = None, steps: int | None = None):
        """The model's output on ``inputs`` with ``params`` (default: the meta-parameters).

        ``steps``: how many inner steps ``params`` took, for ``norm="per_step"`` (whose query after
        k steps uses step k's BatchNorm row): by default 0 for the meta-parameters and
        ``inner_steps`` for given ones. Other modes ignore it."""
        if steps is None:
            steps = 0 if params is None else self.inner_steps
        return self._model_at(max(steps - 1, 0))(self.params() if params is None else params, inputs)

    def set_iteration(self, iteration: int) -> None:
        """Tell the engine the meta-iteration (0-based) of the next meta-batch: the multi-step
        loss's weights and the derivative order (``first_order_iterations``) follow it. The
        training loop calls it before every iteration, so a resumed run continues both exactly.
        Under ``strategy="auto"`` the switch to second order re-measures the strategies on the
        next meta-batch (their ranking can change with the order)."""
        self.iteration = check_steps(iteration, "iteration")
        first_order = self.iteration < self.first_order_iterations
        if first_order != self._fo_now:
            self._fo_now = first_order
            if self._strategy_chosen and len(self._candidates) > 1:
                self._strategy_chosen = False

    def keep_strategy(self, strategy: str) -> None:
        """Under ``strategy="auto"``, take ``strategy`` as the next choice instead of timing the
        candidates (the model's checks still run; a strategy they rule out is timed as usual). A
        resumed run keeps the strategy it trained with: timing can rank the strategies differently
        from one start to the next, and each rounds differently in float32, so a resume that chose
        anew would not continue the run it resumes."""
        self._kept_strategy = strategy

    def msl_weights(self) -> list[float] | None:
        """The multi-step loss's weights at this iteration (None: the final query loss alone)."""
        if not self.multi_step_loss:
            return None
        return msl_weights(self.inner_steps, self.iteration, self.msl_iterations)

    def _msl_weights(self) -> Tensor | None:
        weights = self.msl_weights()
        if weights is None:
            return None
        p = next(iter(self.params().values()))
        return torch.tensor(weights, dtype=p.dtype, device=p.device)

    def _learned_lr(self):
        """The learned step sizes handed to the meta-batch computation: Meta-SGD's or LSLR's."""
        if self.learn_inner_lr:
            return self.inner_lrs
        return self.step_lrs if self.lslr else None

    def _lslr_at(self, lrs, step: int) -> dict:
        """LSLR's step sizes of inner step ``step`` (the last step's beyond ``inner_steps``)."""
        i = min(step, self.inner_steps - 1)
        return {key: v[i] for key, v in lrs.items()}

    def _model_at(self, step: int, phase: str | None = None) -> Callable:
        """The functional model as inner step ``step`` (0-based) calls it: with that step's
        BatchNorm row under ``norm="per_step"``, with the inductive layers in ``phase``
        (``"batch"``, ``"accumulate"``; None: at rest, running statistics) under
        ``norm="inductive"``, else the functional model itself."""
        if self._per_step_layers:
            buffers = self._step_buffers(step)
            fmodel = self.fmodel
            return lambda p, *args: fmodel.call_with(p, buffers, *args)
        if self._inductive_layers and phase is not None:
            layers, fmodel = self._inductive_layers, self.fmodel

            def call(p, *args):
                with norm_phase(layers, phase):
                    return fmodel(p, *args)

            return call
        return self.fmodel

    def _step_buffers(self, step: int) -> dict[str, Tensor]:
        """The per-step layers' ``step`` buffers for inner step ``step``: one index tensor per step,
        made once (again after the model moves device), so no call creates a tensor."""
        device = self._per_step_layers[0].step.device
        if not self._step_cache or next(iter(self._step_cache[0].values())).device != device:
            self._step_cache = [
                dict.fromkeys(self._step_names, torch.tensor(i, device=device)) for i in range(self.inner_steps)
            ]
        return self._step_cache[min(step, self.inner_steps - 1)]

    def adapt(
        self,
        inputs,
        targets,
        steps: int | None = None,
        lr: StepSize = None,
        params: Params | None = None,
        create_graph: bool = False,
    ) -> Params:
        """Adapt to one task's support set; returns new parameters, the model is untouched.

        ``lr`` may be a float or one value per step (the RL protocol's 0.1 then 0.05);
        ``None`` uses the training step size (learned ones under Meta-SGD).
        """
        steps = self.inner_steps if steps is None else check_steps(steps)
        lrs = self._lrs(lr, steps)
        if params is None:
            params = self.params()
        else:
            missing = [n for n in self.fmodel.aliases if n not in params]
            if missing:
                raise ValueError(f"params lacks {missing}: give every meta-parameter, as MAML.params() names them")
        if steps and torch._C._functorch.peek_interpreter_stack() is None:
            # Not inside a torch.func transform, where recording would see batched calls.
            self._check_ops(self._model_ops(params, inputs, targets), create_graph and torch.is_grad_enabled())
        return self._adapt(params, inputs, targets, lrs, create_graph)

    def _adapt(self, params: Params, inputs, targets, lrs: list, create_graph: bool) -> Params:
        for step, lr in enumerate(lrs):
            params = self._inner_step(params, inputs, targets, lr, create_graph, step)
        return params

    def _inner_step(self, params: Params, inputs, targets, lr, create_graph: bool, step: int = 0) -> Params:
        if self.checkpoint_inner and create_graph and torch.is_grad_enabled():
            return self._recomputed_inner_step(params, inputs, targets, lr, step)
        adapted = {n: params[n] for n in self.adapted_names}
        model = self._model_at(step, "batch")

        def support_loss(sub: Params) -> Tensor:
            return self.loss_fn(model({**params, **sub}, inputs), targets)

        if (
            torch.is_grad_enabled()
            and torch._C._functorch.peek_interpreter_stack() is None
            and all(p.requires_grad for p in adapted.values())
        ):
            # Outside torch.func transforms (the loop strategy, adapt): autograd's grad is the same
            # derivative with less bookkeeping per call than the torch.func.grad transform.
            names = list(adapted)
            grads = torch.autograd.grad(
                support_loss(adapted), [adapted[n] for n in names], create_graph=create_graph, materialize_grads=True
            )
            grads = dict(zip(names, grads))
        else:
            grads = torch.func.grad(support_loss)(adapted)
        if not create_graph:
            grads = {n: g.detach() for n, g in grads.items()}
        step = _step_size(lr)
        return {**params, **{n: p - step(n) * grads[n] for n, p in adapted.items()}}

    def _recomputed_inner_step(self, params: Params, inputs, targets, lr, step: int = 0) -> Params:
        """A second-order inner step that keeps only its inputs and rebuilds its graph in the
        backward pass (``checkpoint_inner``; :func:`recompute.recomputed_inner_step`)."""
        # The parameters fixed at construction, as the other strategies adapt, whatever requires_grad says now.
        buffers = dict(self.model.named_buffers()) if self._mutated_buffers else {}
        replay = [buffers[n] for n in self._mutated_buffers]
        return recomputed_inner_step(
            self._model_at(step, "batch"), self.loss_fn, self.adapted_names, params, inputs, targets, lr, _key, replay
        )

    def _lrs(self, lr: StepSize, steps: int) -> list:
        if lr is None:
            if self.lslr:
                return [self._lslr_at(self.step_lrs, k) for k in range(steps)]
            return [self.inner_lrs if self.learn_inner_lr else self.inner_lr] * steps
        return step_sizes(lr, steps)

    # -- meta-batch ----------------------------------------------------------------------

    def meta_forward(self, batch: TaskBatch) -> tuple[Tensor, Any]:
        """Per-task query losses (shape ``[tasks]``) and query outputs after adaptation."""
        task_count(batch)
        if not self.learn_inner_lr:
            check_step_size(self.inner_lr, "inner_lr")  # it may have been set after construction
        lr = self._learned_lr()
        self._ensure_strategy(lr, batch)
        weights = self._msl_weights()
        return self._call("forward", self.params(), lr, *batch, *(() if weights is None else (weights,)))

    def meta_loss(self, batch: TaskBatch) -> Tensor:
        """Mean query loss after adaptation, differentiable w.r.t. the meta-parameters."""
        return self.meta_forward(batch)[0].mean()

    def meta_backward(self, batch: TaskBatch) -> Tensor:
        """Accumulate the meta-gradient into ``.grad`` (as ``meta_loss(batch).backward()`` would)
        and return the detached meta-loss.

        Under ``compile``, where it is exact (no normalisation layer whose second derivatives
        torch.func gets wrong), the whole meta-gradient is one ``torch.func.grad`` transform:
        a single compiled forward computation, with no autograd graph to walk. Otherwise it is
        ``meta_loss(batch).backward()``.
        """
        task_count(batch)
        lr = self._learned_lr()
        self._ensure_strategy(lr, batch)  # may turn the functional path off
        # The transform differentiates the parameters and Meta-SGD's step sizes; a step size that is a
        # tensor requiring grad (a learned scalar) needs autograd, which follows every input.
        learned_scalar = isinstance(self.inner_lr, Tensor) and self.inner_lr.requires_grad
        if not self._functional_grad or learned_scalar:
            loss = self.meta_loss(batch)
            loss.backward()
            return loss.detach()
        params = self.params()
        detached_lr = None if lr is None else {k: v.detach() for k, v in lr.items()}
        weights = self._msl_weights()
        extra = () if weights is None else (weights,)
        grads, lr_grads, loss = self._call(
            "grad", {n: p.detach() for n, p in params.items()}, detached_lr, *batch, *extra
        )
        _accumulate(params, grads)
        if lr is not None:
            _accumulate(dict(lr.items()), lr_grads)
        return loss

    def _meta_grad_impl(self, params, lr, si, st, qi, qt, weights=None):
        def loss(p, lr_):
            return self._meta_forward_impl(p, lr_, si, st, qi, qt, weights)[0].mean()

        if lr is None:
            grads, value = torch.func.grad_and_value(lambda p: loss(p, None))(params)
            return grads, {}, value
        (grads, lr_grads), value = torch.func.grad_and_value(loss, argnums=(0, 1))(params, lr)
        return grads, lr_grads, value

    def _call(self, kind: str, *args):
        """Run the meta-batch computation (``forward`` or ``grad``), compiled on first use if asked."""
        if self._per_step_layers:
            self._step_buffers(0)  # the step indices made here, eagerly, not while torch.compile traces
        if kind not in self._fns:
            fn = self._meta_forward_impl if kind == "forward" else self._meta_grad_impl
            if self._compile:
                self._warn_unrolled(task_count(TaskBatch(*args[2:6])))
                fn = torch.compile(fn, dynamic=False, mode="reduce-overhead" if self._cuda_graphs else None)
            self._fns[kind] = fn
        if not self._cuda_graphs:
            return self._fns[kind](*args)
        # A graph's outputs live in buffers that its next replay overwrites: copy them out.
        torch.compiler.cudagraph_mark_step_begin()
        out = self._fns[kind](*args)
        return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, out)

    def _ensure_strategy(self, lr, batch: TaskBatch) -> None:
        """Check the model's operations and choose the strategy on the first meta-batch: refuse what no
        strategy computes right, drop vmap where it would be inexact or cannot run, then time what is
        left. The choice is made with gradients on (a first batch under ``torch.no_grad()`` cannot
        time meta-gradients), and leaves the model's buffers and the random-number stream as it found them."""
        if self._strategy_chosen:
            return
        why = ""
        if self.inner_steps > 0:
            si, st = (torch.utils._pytree.tree_map(lambda t: t[0], x) for x in batch[:2])
            found = self._model_ops(self.params(), si, st)
            self._check_ops(found, self._second_order)
            why = self._drop_vmap(found)
        self._strategy_chosen = True
        if len(self._candidates) < 2:
            self._log_choice(why)
            return
        kept, self._kept_strategy = self._kept_strategy, None
        if kept in self._candidates:
            self.strategy = kept
            self._log_choice("the strategy the run trained with, kept from the checkpoint it resumed from")
            return
        params = self.params()
        leaves = [p for p in params.values() if p.requires_grad]
        device = next(iter(params.values())).device
        # Timed on a few tasks of the batch, once each after a warm-up: the ranking is what matters,
        # and timing whole batches several times took minutes for large convolutional models on a CPU.
        # A close call on a few tasks is timed again on the whole batch: vmap's lead grows with the
        # tasks it batches (the sinusoid's 25: a tie on 4 tasks, several times faster on all 25).
        n = task_count(batch)
        probed = min(n, PROBE_TASKS)
        probe = TaskBatch(*torch.utils._pytree.tree_map(lambda t: t[:probed], tuple(batch)))
        key = (_measurement_key(self, probe), n)
        if key in _MEASURED:
            timings, errors = _MEASURED[key]
            self.strategy_timings = dict(timings)
            finite = {k: v for k, v in self.strategy_timings.items() if v < float("inf")}
            self.strategy = min(finite, key=finite.get) if finite else "loop"
            self._log_choice(why, errors, "measured before in this process for this model and these shapes")
            return
        _log.info(
            "strategy='auto': timing %s on %d task(s) of the first meta-batch of %s",
            " and ".join(self._candidates),
            probed,
            type(self.model).__name__,
        )

        def on(tasks: TaskBatch) -> Callable[[str], None]:
            def run(strategy: str) -> None:
                self.strategy = strategy
                losses, _ = self._meta_forward_impl(params, lr, *tasks, self._msl_weights())
                if leaves:  # every parameter may have been frozen since construction
                    torch.autograd.grad(losses.mean(), leaves, allow_unused=True)  # no .grad side effects

            return run

        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        errors: dict[str, str] = {}
        with (
            torch.enable_grad(),
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            self._buffers_kept(),
        ):
            self.strategy_timings = fastest(on(probe), self._candidates, sync, repeats=1, errors=errors)
            finite = sorted(v for v in self.strategy_timings.values() if v < float("inf"))
            if n > probed and len(finite) > 1 and finite[-1] < CLOSE_CALL * finite[0]:
                _log.info("strategy='auto': a close call on %d tasks; timing again on all %d", probed, n)
                errors.clear()
                self.strategy_timings = fastest(on(batch), self._candidates, sync, repeats=1, errors=errors)
        _MEASURED[key] = (dict(self.strategy_timings), dict(errors))
        finite = {k: v for k, v in self.strategy_timings.items() if v < float("inf")}
        # Where every candidate failed, the loop's own error is the clearest the next call can give.
        self.strategy = min(finite, key=finite.get) if finite else "loop"
        self._log_choice(why, errors)

    def _drop_vmap(self, found: ModelOps) -> str:
        """Keep vmap out of the candidates where the recorded operations make it inexact (second order
        through a fused normalisation) or unable to run (buffers updated in place); refuse an explicit
        ``strategy='vmap'`` there. Returns why, for the log."""
        if "vmap" not in self._candidates:
            return ""
        why = ""
        if self._mutated_buffers:
            if self._candidates == ["vmap"]:
                raise ValueError(
                    f"strategy='vmap' cannot run a model whose forward updates buffers in place "
                    f"({', '.join(self._mutated_buffers)}; spectral norm in training mode does): use "
                    "strategy='loop' or 'auto' (which then runs the loop), or put that module in eval mode."
                )
            why = (
                f"the forward updates the buffers {self._mutated_buffers} in place, which vmap cannot batch; "
                "put that module in eval mode for vmap"
            )
        unsafe = {op: _VMAP_UNSAFE_SECOND_ORDER_OPS[op] for op in found.ops if op in _VMAP_UNSAFE_SECOND_ORDER_OPS}
        if self._second_order and unsafe:
            if self._candidates == ["vmap"]:
                refuse_vmap_for_ops(dict(sorted(unsafe.items())))  # raises, and again on the next call
            self._functional_grad = False  # as for the layers the module guard finds
            op = sorted(unsafe)[0]
            why = why or (
                f"{self._module_label(found.ops[op][0])} runs {op} ({unsafe[op]}), which keeps second-order MAML "
                "on the per-task loop (vmap's second derivatives through fused normalisation are wrong); use "
                "mamlkit.models.layers.BatchNorm or first_order=True for vmap"
            )
        if why:
            self._candidates = ["loop"]
            self.strategy = "loop"
        return why

    def _module_label(self, path: str) -> str:
        return module_label(self.model, path)

    def _warn_unrolled(self, tasks: int) -> None:
        """Say once that the compiled loop is unrolled: one graph holds every task of the meta-batch,
        so compiling it takes several times as long as vmap's one batched task (BENCHMARKS.md). Not
        where ``auto`` timed vmap and found the loop faster: that was a choice, made on this model."""
        chosen_over_vmap = self.strategy_timings.get("vmap", float("inf")) < float("inf")
        if self.strategy != "loop" or tasks < 2 or self._warned_unrolled or chosen_over_vmap:
            return
        self._warned_unrolled = True
        _log.warning(
            "compile with strategy 'loop' unrolls the %d tasks of a meta-batch into one graph: compiling "
            "takes several times as long as with vmap, and grows with the meta-batch; where that is too "
            "long, set compile=False, or let vmap run (strategy 'auto' or 'vmap'; mamlkit.models.layers."
            "BatchNorm for batch-statistics BatchNorm under second order)",
            tasks,
        )

    def _log_choice(self, why: str, errors: dict[str, str] | None = None, note: str = "") -> None:
        """Say once, on the ``mamlkit`` logger, which strategy ``auto`` chose and why."""
        if self._requested != "auto":
            return
        if self.checkpoint_inner:
            reason = "checkpoint_inner=True recomputes inner steps with autograd, which vmap cannot"
        elif self.norm == "inductive":
            reason = "norm='inductive' updates running statistics in place, which vmap cannot"
        elif why:
            reason = why
        elif not self.strategy_timings:
            unsafe = [n for n, m in self.model.named_modules() if isinstance(m, _VMAP_UNSAFE_SECOND_ORDER)]
            reason = "it is the only candidate"
            if unsafe and self._second_order:
                reason = (
                    f"{self._module_label(unsafe[0])} keeps second-order MAML on the per-task loop (vmap's second "
                    "derivatives through fused normalisation are wrong); use mamlkit.models.layers.BatchNorm or "
                    "first_order=True for vmap"
                )
        else:
            timed = ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in self.strategy_timings.items() if v < float("inf"))
            parts = [f"the fastest meta-gradient on the first meta-batch ({timed})"] if timed else []
            parts += [f"{k} failed ({e})" for k, e in (errors or {}).items()]
            reason = "; ".join(parts)
        if note:
            reason = f"{reason} ({note})"
        _log.info("strategy='auto' chose %s for %s: %s", self.strategy, type(self.model).__name__, reason)

    def _model_ops(self, params: Params, inputs, targets) -> ModelOps:
        """The operations of one support forward and loss, recorded once per model
        (:func:`~mamlkit.engine.strategies.record_ops`), and which buffers it updates in place.

        Runs the model once on one task's support set, as the inner loop would (gradients on, the same
        autocast), and leaves the random-number stream and the buffers as they were. Recording what
        runs, rather than the module types it is built of, catches an operation however it is called;
        one support forward costs far less than the meta-gradients the strategy choice already times.
        For vmap's normalisation fault, comparing vmap's meta-gradient with the loop's on that batch
        was not chosen: in float32 two exact strategies can differ by more than the 0.1-1% this fault
        makes (docs/traps.md, float32 comparisons), so no tolerance separates the two.
        """
        if self._ops is not None:
            return self._ops
        device = next(iter(params.values())).device
        # Every parameter needs a gradient here, as in the inner loop, whatever the caller's params
        # (detached ones for sampling, say): the record says which operations a gradient goes through.
        params = {n: p.detach().requires_grad_() for n, p in params.items()}

        def support_loss():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast == "bf16"):
                return self.loss_fn(self._model_at(0, "batch")(params, inputs), targets)

        with (
            torch.enable_grad(),
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            self._buffers_kept(record=True),
        ):
            self._ops = record_ops(support_loss, self.model)
        return self._ops

    def _check_ops(self, found: ModelOps, second_order: bool) -> None:
        """Refuse what no strategy computes right: checkpointing inside the model, and second order
        through an operation whose double backward is wrong or missing."""
        refuse_checkpoint(found, self.model)
        if second_order:
            refuse_second_order_ops(found, self.model)

    @contextlib.contextmanager
    def _buffers_kept(self, record: bool = False):
        """Put back the model's buffers that the block updates in place (the strategy choice's runs
        are measurements, not training); ``record`` notes their names."""
        buffers = dict(self.model.named_buffers())
        saved = {n: (b._version, b.detach().clone()) for n, b in buffers.items()}
        try:
            yield
        finally:
            with torch.no_grad():
                for n, (version, value) in saved.items():
                    if buffers[n]._version != version:
                        buffers[n].copy_(value)
                        if record and n not in self._mutated_buffers:
                            self._mutated_buffers.append(n)

    def _meta_forward_impl(self, params, lr, si, st, qi, qt, weights=None):
        if self.autocast:
            device = next(iter(params.values())).device.type
            with torch.autocast(device, dtype=torch.bfloat16):
                losses, out = self._meta_forward_tasks(params, lr, si, st, qi, qt, weights)
            return losses.float(), out
        return self._meta_forward_tasks(params, lr, si, st, qi, qt, weights)

    def _meta_forward_tasks(self, params, lr, si, st, qi, qt, weights=None):
        if self.lslr and lr is not None:
            lrs = [self._lslr_at(lr, k) for k in range(self.inner_steps)]
        else:
            lrs = [self.inner_lr if lr is None else lr] * self.inner_steps
        create_graph = not (self.first_order or self._fo_now)
        last = max(self.inner_steps - 1, 0)

        def one_task(si, st, qi, qt):
            if weights is not None:  # MAML++'s multi-step loss: the query after every step, weighed
                p, total = params, None
                for k, lr_k in enumerate(lrs):
                    p = self._inner_step(p, si, st, lr_k, create_graph, k)
                    # Inductive running statistics are those of adapted queries: the final step's alone.
                    out = self._model_at(k, "accumulate" if k == last else "batch")(p, qi)
                    term = weights[k] * self.query_loss_fn(out, qt)
                    total = term if total is None else total + term
                return total, out
            adapted = self._adapt(params, si, st, lrs, create_graph)
            out = self._model_at(last, "accumulate")(adapted, qi)
            return self.query_loss_fn(out, qt), out

        return map_tasks(one_task, (0, 0, 0, 0), si, st, qi, qt, strategy=self.strategy)

    @torch.no_grad()
    def adaptation_curve(
        self,
        batch: TaskBatch,
        steps: int,
        lr: StepSize = None,
        metrics: dict[str, LossFn] | None = None,
        params: Params | None = None,
    ) -> dict[str, Tensor]:
        """Query metrics after 0..``steps`` inner steps on each task's support set.

        Returns ``{name: tensor[tasks, steps + 1]}``; ``metrics`` default to the query loss.
        """
        task_count(batch)
        steps = check_steps(steps)
        metrics = metrics or {"loss": self.query_loss_fn}
        lrs = self._lrs(lr, steps)
        params = self.params() if params is None else params
        if steps:
            si, st = (torch.utils._pytree.tree_map(lambda t: t[0], x) for x in batch[:2])
            self._check_ops(self._model_ops(params, si, st), second_order=False)

        def one_task(si, st, qi, qt):
            p = params
            rows = {k: [] for k in metrics}
            for s in range(steps + 1):
                if s:
                    p = self._inner_step(p, si, st, lrs[s - 1], create_graph=False, step=s - 1)
                out = self._model_at(max(s - 1, 0))(p, qi)
                for k, m in metrics.items():
                    rows[k].append(m(out, qt))
            return {k: torch.stack(v) for k, v in rows.items()}

        return self._map_tasks_without_graph(one_task, *batch)

    def _map_tasks_without_graph(self, fn: Callable, *args):
        """``map_tasks`` over every argument's task dimension, for a computation that takes no
        meta-gradient (``adaptation_curve``).

        Under ``auto``, vmap is not trusted to run a computation it has not run before: before
        the first meta-batch has chosen (a loaded checkpoint evaluated, say), vmap is untested on
        this model, and after it, an evaluation batch can be larger than the training ones. So a
        vmap that raises (an operation with no batching rule, such as ``aten::gru``; out of
        memory) gives way to the loop, from the random-number state vmap started with, and the
        loop is kept for such computations. An explicit ``strategy`` runs as asked. Choosing here
        as the first meta-batch does was not the design: it would time second-order
        meta-gradients, which this computation does not take, on an evaluation batch, and fix the
        training's strategy by that batch.
        """
        in_dims = (0,) * len(args)
        if self.strategy != "vmap" or "loop" not in self._candidates:
            return map_tasks(fn, in_dims, *args, strategy=self.strategy)
        if self._vmap_failed_without_graph:
            return map_tasks(fn, in_dims, *args, strategy="loop")
        device = next(iter(self.params().values())).device
        devices = [device] if device.type == "cuda" else []
        rng = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
        try:
            return map_tasks(fn, in_dims, *args, strategy="vmap")
        except Exception:
            torch.set_rng_state(rng[0])
            for d, state in zip(devices, rng[1]):
                torch.cuda.set_rng_state(state, d)
            self._vmap_failed_without_graph = True
            return map_tasks(fn, in_dims, *args, strategy="loop")


PROBE_TASKS = 4  # tasks of the first meta-batch on which auto times the strategies
CLOSE_CALL = 2.0  # timings on the probe within this factor are timed again on the whole meta-batch
# Strategy timings (and the candidates' errors) by model and shapes, for this process.
_MEASURED: dict[tuple, tuple[dict[str, float], dict[str, str]]] = {}


def _measurement_key(maml: MAML, probe: TaskBatch) -> tuple:
    """What the strategy timings depend on: the model's structure, the options that change the
    computation, the device and dtypes, and the probe's shapes."""
    params = maml.params()
    return (
        repr(maml.model),
        getattr(maml.loss_fn, "__name__", repr(maml.loss_fn)),
        tuple((n, tuple(p.shape), p.dtype, p.device) for n, p in params.items()),
        tuple((tuple(t.shape), t.dtype) for t in torch.utils._pytree.tree_leaves(tuple(probe))),
        tuple(maml.adapted_names),
        maml.inner_steps,
        maml.first_order,
        maml._fo_now,
        maml.learn_inner_lr,
        maml.lslr,
        maml.multi_step_loss,
        maml.norm,
        maml.autocast,
        tuple(maml._candidates),
    )


def _accumulate(tensors: dict[str, Tensor], grads: dict[str, Tensor]) -> None:
    """Add ``grads`` into ``.grad`` as ``backward()`` would: not into a tensor frozen since construction."""
    for name, t in tensors.items():
        if not t.requires_grad:
            continue
        g = grads[name]
        if t.grad is None:
            t.grad = g
        else:
            t.grad += g


def _check_running_stats(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training:
            raise ValueError(
                f"{type(m).__name__} '{name}' updates running statistics in place during training, "
                "which cannot happen inside the inner loop's gradient transform. Build it with "
                "track_running_stats=False (the paper's MAML uses batch statistics at train and test)."
            )
