"""Meta-iterations per second on the MAML sinusoid setup: mamlkit against its peers, in one run.

The workload is the paper's (Finn et al., 2017, Section 5.1), identical for every implementation:
an MLP 1-40-40-1 with ReLU, MSE loss, 25 tasks per meta-batch, K=10 support and 10 query points
per task, one inner SGD step (alpha = 0.01), the second-order meta-gradient and an Adam (lr 1e-3)
meta-update, in float32 on the CPU. One meta-iteration = sample a meta-batch + meta-forward +
backward + optimiser step.

Before timing, every implementation's meta-gradient on one fixed batch, from the same initial
weights, is checked against mamlkit's. Peers that are not installed show up as "not installed"
rows (``benchmarks/install_peers.sh`` installs them).

Usage:
    python benchmarks/sinusoid_speed.py [--windows 5] [--write BENCHMARKS.md] [--only mamlkit-vmap,torch-loop]
                                        [--threads 1] [--warm-cache]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mamlkit import MAML, TaskBatch
from mamlkit.models import mlp
from mamlkit.tasks import SinusoidTasks
from mamlkit.training.trainer import make_optimizer

# -- the workload -------------------------------------------------------------------------------
META_BATCH = 25
K_SUPPORT = 10
K_QUERY = 10
INNER_LR = 0.01
META_LR = 1e-3
HIDDEN = [40, 40]
RTOL, ATOL = 1e-4, 1e-5  # meta-gradient agreement with mamlkit

START_MARK = "<!-- sinusoid-speed:start -->"
END_MARK = "<!-- sinusoid-speed:end -->"


def make_net() -> nn.Sequential:
    """The paper's sinusoid network: Linear(1,40)-ReLU-Linear(40,40)-ReLU-Linear(40,1)."""
    return mlp(1, HIDDEN, 1)


# -- implementations ------------------------------------------------------------------------------
# Each builder takes the network and returns (meta-parameters, forward_backward). forward_backward(batch)
# leaves the meta-gradient of the mean query loss in the parameters' .grad (which the caller zeroes) and
# returns the loss. The meta-parameters are the network's own nn.Parameters, in net.parameters() order.

ForwardBackward = Callable[[TaskBatch], Tensor]


@dataclass
class Impl:
    key: str  # for --only
    name: str  # in the table
    build: Callable[[nn.Sequential], ForwardBackward]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def default_adam(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """What a user of the peer libraries would write."""
    return torch.optim.Adam(params, lr=META_LR)


def mamlkit_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """mamlkit's trainer's optimiser (fused Adam where available)."""
    return make_optimizer(params, META_LR)


def build_mamlkit(strategy: str, compile: bool) -> Callable[[nn.Sequential], ForwardBackward]:
    def build(net: nn.Sequential) -> ForwardBackward:
        maml = MAML(net, F.mse_loss, inner_lr=INNER_LR, inner_steps=1, strategy=strategy, compile=compile)

        # meta_backward is what mamlkit's trainer calls: it fills .grad like loss.backward() does.
        return maml.meta_backward

    return build


def build_torch_loop(net: nn.Sequential) -> ForwardBackward:
    """A plain per-task loop: autograd.grad(create_graph=True) + functional_call (learn2learn's pattern)."""
    params = dict(net.named_parameters())

    def forward_backward(batch: TaskBatch) -> Tensor:
        si, st, qi, qt = batch
        total = 0.0
        for i in range(si.shape[0]):
            support_loss = F.mse_loss(functional_call(net, params, (si[i],)), st[i])
            grads = torch.autograd.grad(support_loss, list(params.values()), create_graph=True)
            fast = {name: p - INNER_LR * g for (name, p), g in zip(params.items(), grads, strict=True)}
            total = total + F.mse_loss(functional_call(net, fast, (qi[i],)), qt[i])
        loss = total / si.shape[0]
        loss.backward()
        return loss

    return forward_backward


def import_l2l_maml() -> type:
    """learn2learn's MAML class without running ``learn2learn/__init__.py``.

    That file imports every subpackage (vision, gym, text, data), which pull in torchvision, gym,
    requests, qpth, ... -- and torchvision fails to import beside torch 2.13. The algorithm itself only
    needs torch and ``learn2learn.utils``. So we register empty package modules for ``learn2learn`` and
    ``learn2learn.algorithms`` whose ``__path__`` points at the installed directories, and import
    ``learn2learn.algorithms.maml`` through them: its own imports (``base_learner``, ``utils``) then
    resolve normally, and none of the heavy subpackages is ever loaded.
    """
    spec = importlib.util.find_spec("learn2learn")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("learn2learn is not installed")
    root = list(spec.submodule_search_locations)[0]
    for name, path in [("learn2learn", root), ("learn2learn.algorithms", os.path.join(root, "algorithms"))]:
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [path]
            sys.modules[name] = stub
    return importlib.import_module("learn2learn.algorithms.maml").MAML


def build_learn2learn(net: nn.Sequential) -> ForwardBackward:
    """learn2learn 0.2.0: clone(), adapt(), summed query losses (its maml_sine.py example)."""
    maml = import_l2l_maml()(net, lr=INNER_LR, first_order=False)

    def forward_backward(batch: TaskBatch) -> Tensor:
        si, st, qi, qt = batch
        total = 0.0
        for i in range(si.shape[0]):
            learner = maml.clone()
            learner.adapt(F.mse_loss(learner(si[i]), st[i]))
            total = total + F.mse_loss(learner(qi[i]), qt[i])
        loss = total / si.shape[0]
        loss.backward()
        return loss

    return forward_backward


def build_higher(net: nn.Sequential) -> ForwardBackward:
    """higher: innerloop_ctx with an SGD inner optimiser, copy_initial_weights=False, per task."""
    import higher

    inner_opt = torch.optim.SGD(net.parameters(), lr=INNER_LR)

    def forward_backward(batch: TaskBatch) -> Tensor:
        si, st, qi, qt = batch
        total = 0.0
        for i in range(si.shape[0]):
            with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                diffopt.step(F.mse_loss(fnet(si[i]), st[i]))
                total = total + F.mse_loss(fnet(qi[i]), qt[i])
        loss = total / si.shape[0]
        loss.backward()
        return loss

    return forward_backward


def build_torchopt(net: nn.Sequential) -> ForwardBackward:
    """torchopt: a differentiable MetaSGD step per task, the module's state restored between tasks."""
    import torchopt

    inner_opt = torchopt.MetaSGD(net, lr=INNER_LR)
    net_state = torchopt.extract_state_dict(net)  # by reference: the meta-parameters themselves
    opt_state = torchopt.extract_state_dict(inner_opt)

    def forward_backward(batch: TaskBatch) -> Tensor:
        si, st, qi, qt = batch
        total = 0.0
        for i in range(si.shape[0]):
            inner_opt.step(F.mse_loss(net(si[i]), st[i]))  # net now holds the adapted (non-leaf) tensors
            total = total + F.mse_loss(net(qi[i]), qt[i])
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)
        loss = total / si.shape[0]
        loss.backward()
        return loss

    return forward_backward


IMPLS = [
    Impl("mamlkit-compile", "mamlkit vmap + compile", build_mamlkit("vmap", compile=True), mamlkit_optimizer),
    Impl("mamlkit-vmap", "mamlkit vmap (eager)", build_mamlkit("vmap", compile=False), mamlkit_optimizer),
    Impl("mamlkit-loop", "mamlkit loop (eager)", build_mamlkit("loop", compile=False), mamlkit_optimizer),
    Impl("torch-loop", "plain PyTorch loop", build_torch_loop, default_adam),
    Impl("learn2learn", "learn2learn 0.2.0", build_learn2learn, default_adam),
    Impl("higher", "higher", build_higher, default_adam),
    Impl("torchopt", "torchopt (MetaSGD)", build_torchopt, default_adam),
]
BASELINES = ["learn2learn", "torch-loop"]  # the ratio column divides by the first one that ran


# -- measuring ----------------------------------------------------------------------------------------


@dataclass
class Result:
    impl: Impl
    status: str = "ok"  # or "not installed" / "failed: ..."
    its: list[float] | None = None  # it/s of each timed window
    warmup_s: float = 0.0
    grad_check: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.its) if self.its else float("nan")


def meta_gradient(net: nn.Module, forward_backward: ForwardBackward, batch: TaskBatch) -> list[Tensor]:
    net.zero_grad(set_to_none=True)
    forward_backward(batch)
    return [p.grad.detach().clone() for p in net.parameters()]


def compare(grads: list[Tensor], reference: list[Tensor]) -> str:
    """✓ when every tensor is allclose(rtol=1e-4, atol=1e-5), else the largest absolute difference."""
    if all(torch.allclose(g, r, rtol=RTOL, atol=ATOL) for g, r in zip(grads, reference, strict=True)):
        return "✓"
    return f"✗ max diff {max((g - r).abs().max().item() for g, r in zip(grads, reference, strict=True)):.2e}"


def benchmark(
    impl: Impl,
    init_state: dict[str, Tensor],
    check_batch: TaskBatch,
    reference: list[Tensor],
    warmup: int,
    windows: int,
    window_s: float,
) -> Result:
    """Warm up (compilation included), check the meta-gradient, then time ``windows`` windows."""
    result = Result(impl)
    net = make_net()
    net.load_state_dict(init_state)
    try:
        forward_backward = impl.build(net)
    except ImportError:
        result.status = "not installed"
        return result
    except Exception as e:  # a peer that breaks on this torch is a row, not a crash
        result.status = failure(e)
        return result
    opt = impl.optimizer(list(net.parameters()))
    tasks = SinusoidTasks()
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        batch = tasks.batch(META_BATCH, K_SUPPORT, K_QUERY, g)
        opt.zero_grad(set_to_none=True)
        forward_backward(batch)
        opt.step()

    try:
        t0 = time.perf_counter()  # the first iterations include tracing and, for torch.compile, compilation
        for _ in range(warmup):
            step()
        result.warmup_s = time.perf_counter() - t0

        net.load_state_dict(init_state)  # back to the common initial weights (copied in place)
        result.grad_check = compare(meta_gradient(net, forward_backward, check_batch), reference)

        # Size the windows from a short probe so that each lasts about window_s seconds.
        t0 = time.perf_counter()
        probe = 0
        while probe < 3 or time.perf_counter() - t0 < 0.3:
            step()
            probe += 1
        n = max(3, round(window_s * probe / (time.perf_counter() - t0)))
        result.its = []
        for _ in range(windows):
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            result.its.append(n / (time.perf_counter() - t0))
    except Exception as e:
        result.status = failure(e)
    return result


def failure(e: Exception) -> str:
    first_line = str(e).splitlines()[0][:80] if str(e) else ""
    return f"failed: {type(e).__name__}: {first_line}".replace("|", "/")


# -- reporting ----------------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    baseline = next((r for key in BASELINES for r in results if r.impl.key == key and r.its), None)
    ratio_name = f"vs {baseline.impl.name}" if baseline else "ratio"
    lines = [
        f"| implementation | it/s (median) | min – max | {ratio_name} | warm-up (s) | grad matches mamlkit |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for r in results:
        if not r.its:
            lines.append(f"| {r.impl.name} | {r.status} | | | | {r.grad_check} |")
            continue
        ratio = f"{r.median / baseline.median:.1f}×" if baseline else ""
        lines.append(
            f"| {r.impl.name} | {r.median:.0f} | {min(r.its):.0f} – {max(r.its):.0f} | {ratio} "
            f"| {r.warmup_s:.1f} | {r.grad_check} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else platform.machine()


def machine() -> str:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"(intra-op threads: {torch.get_num_threads()}), Python {platform.python_version()}; "
        f"load average at start {load}"
    )


def section(results: list[Result], args: argparse.Namespace, machine_line: str) -> str:
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    return "\n".join(
        [
            START_MARK,
            "### Sinusoid meta-training speed",
            "",
            f"MLP 1-40-40-1, meta-batch {META_BATCH}, K={K_SUPPORT} support + {K_QUERY} query, one inner SGD step "
            f"(α={INNER_LR}), second-order meta-gradient, Adam {META_LR:g}; float32 on the CPU. One iteration = "
            f"sample a batch + meta-forward + backward + optimiser step. it/s: median of {args.windows} windows "
            f"of about {args.window_seconds:g} s after {args.warmup} warm-up iterations (torch.compile's compilation, "
            f"{'with a warm on-disk cache' if args.warm_cache else 'from an empty cache'}, is part of the warm-up).",
            "",
            f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"- machine: {machine_line}",
            f"- command: `{command}`",
            "",
            table(results),
            END_MARK,
        ]
    )


def write_section(path: Path, text: str) -> None:
    """Replace the marked section of ``path``, or append it (creating the file if needed)."""
    old = path.read_text() if path.exists() else ""
    start, end = old.find(START_MARK), old.find(END_MARK)
    if start != -1 and end > start:
        new = old[:start] + text + old[end + len(END_MARK) :]
    else:
        new = old + ("\n\n" if old and not old.endswith("\n\n") else "") + text + "\n"
    path.write_text(new)


# -- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=5, help="timed windows per implementation (median reported)")
    parser.add_argument("--window-seconds", type=float, default=2.0, help="approximate length of one window")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up iterations (compilation happens here)")
    parser.add_argument("--only", type=str, default="", help=f"comma-separated subset of {[i.key for i in IMPLS]}")
    # torch's default thread count, as users run it. On a loaded machine two threads per process stall each
    # other and the windows scatter by 10x: there, --threads 1 gives stable (and hardly slower) figures.
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default")
    parser.add_argument("--write", type=Path, default=None, help="Markdown file whose marked section to replace")
    parser.add_argument(
        "--warm-cache", action="store_true", help="reuse torch.compile's on-disk cache (default: compile from scratch)"
    )
    args = parser.parse_args()

    impls = IMPLS
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = set(keys) - {i.key for i in IMPLS}
        if unknown:
            parser.error(f"unknown implementation(s) {sorted(unknown)}; choose from {[i.key for i in IMPLS]}")
        impls = [i for i in IMPLS if i.key in keys]

    if args.threads:
        torch.set_num_threads(args.threads)
    cold_cache = None
    if not args.warm_cache:  # an empty inductor cache, so that warm-up includes the full compilation
        cold_cache = tempfile.mkdtemp(prefix="sinusoid_speed_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold_cache

    machine_line = machine()
    print(machine_line, flush=True)
    torch.manual_seed(0)
    init_state = {k: v.clone() for k, v in make_net().state_dict().items()}
    check_batch = SinusoidTasks().batch(META_BATCH, K_SUPPORT, K_QUERY, torch.Generator().manual_seed(1234))

    # The reference meta-gradient: mamlkit, eager, one task at a time.
    ref_net = make_net()
    ref_net.load_state_dict(init_state)
    reference = meta_gradient(ref_net, build_mamlkit("loop", compile=False)(ref_net), check_batch)

    results = []
    for impl in impls:
        print(f"{impl.name} ...", end=" ", flush=True)
        r = benchmark(impl, init_state, check_batch, reference, args.warmup, args.windows, args.window_seconds)
        print(f"{r.median:.0f} it/s, grad {r.grad_check}" if r.its else r.status, flush=True)
        results.append(r)

    if cold_cache:
        shutil.rmtree(cold_cache, ignore_errors=True)

    print()
    print(table(results))
    if args.write:
        write_section(args.write, section(results, args, machine_line))
        print(f"\nwrote {args.write}")


if __name__ == "__main__":
    main()
