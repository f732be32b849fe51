"""Meta-iterations per second of mamlkit against its peers on the paper's workloads, in one run.

Workloads (``--workload``), identical for every implementation:
- ``sinusoid``: the paper's regression (Section 5.1): MLP 1-40-40-1, MSE, 25 tasks per meta-batch,
  K=10 support + 10 query points, one inner step (alpha 0.01).
- ``omniglot-5way-1shot`` / ``omniglot-20way-1shot``: the paper's Omniglot conv4 (64 filters,
  stride 2, batch-statistics BatchNorm), K=1 support and 1 query image per class, meta-batch 32
  with 1 inner step / meta-batch 16 with 5 inner steps, alpha*N = 2.0 on the mean cross-entropy.
- ``miniimagenet-5way-1shot``: the MiniImagenet conv4 (32 filters, max-pool) on 84x84x3 images,
  1 support + 15 query images per class, meta-batch 4, 5 inner steps, alpha*N = 0.05.
Image workloads use synthetic images of the real shapes (speed does not depend on the pixels).
Every implementation adapts every parameter, takes the second-order meta-gradient of the mean
query loss and an Adam (lr 1e-3) step; one meta-iteration = sample + meta-forward + backward +
optimiser step, in float32 on ``--device``.

Before timing, each implementation's meta-gradient on one fixed batch, from the same initial
weights, is checked against mamlkit's (eager loop). Peers that are not installed show up as "not
installed" rows (``benchmarks/install_peers.sh`` installs learn2learn, higher and torchopt).

Usage:
    python benchmarks/peers_speed.py [--workload sinusoid] [--device cpu] [--windows 5]
        [--write BENCHMARKS.md] [--only mamlkit-vmap,torch-loop] [--threads 1] [--warm-cache]
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
from report import write_section
from torch import Tensor, nn
from torch.func import functional_call

from mamlkit import MAML, TaskBatch
from mamlkit.models import miniimagenet_conv4, mlp, omniglot_conv4
from mamlkit.tasks import SinusoidTasks
from mamlkit.training import make_optimizer

# -- the workloads --------------------------------------------------------------------------------
META_LR = 1e-3


@dataclass
class Workload:
    key: str
    description: str
    make_net: Callable[[], nn.Module]
    loss: Callable[[Tensor, Tensor], Tensor]
    inner_lr: float
    inner_steps: int
    meta_batch: int
    sample: Callable[[int, torch.Generator, str], TaskBatch]  # (tasks, generator, device) -> batch
    tolerance: float  # relative error of the whole meta-gradient (in norm) counted as agreement
    warmup: int


def sinusoid_batch(tasks: int, g: torch.Generator, device: str) -> TaskBatch:
    return SinusoidTasks().batch(tasks, 10, 10, g).to(device)


def image_batch(n_way: int, shape: tuple[int, ...], support: int, query: int, binary: bool):
    """Synthetic episodes of the real shapes: ``support``/``query`` images per class, labels 0..N-1."""

    def sample(tasks: int, g: torch.Generator, device: str) -> TaskBatch:
        def images(per_class: int) -> tuple[Tensor, Tensor]:
            x = torch.rand(tasks, n_way * per_class, *shape, generator=g)
            x = (x > 0.8).float() if binary else x  # Omniglot's ink is sparse and binary
            y = torch.arange(n_way).repeat_interleave(per_class).expand(tasks, -1).contiguous()
            return x.to(device), y.to(device)

        return TaskBatch(*images(support), *images(query))

    return sample


WORKLOADS = {
    w.key: w
    for w in [
        Workload(
            "sinusoid",
            "MLP 1-40-40-1, meta-batch 25, K=10 support + 10 query points, 1 inner step (α=0.01), MSE",
            lambda: mlp(1, [40, 40], 1),
            F.mse_loss,
            0.01,
            1,
            25,
            sinusoid_batch,
            1e-4,
            20,
        ),
        Workload(
            "omniglot-5way-1shot",
            "Omniglot conv4 (64 filters, stride 2, batch-stat BN), 5-way 1-shot, 1 query/class, meta-batch 32, "
            "1 inner step (α·N=2.0), synthetic 28×28 binary images",
            lambda: omniglot_conv4(5),
            F.cross_entropy,
            2.0,
            1,
            32,
            image_batch(5, (1, 28, 28), 1, 1, binary=True),
            1e-3,
            4,
        ),
        Workload(
            "omniglot-20way-1shot",
            "Omniglot conv4, 20-way 1-shot, 1 query/class, meta-batch 16, 5 inner steps (α·N=2.0), synthetic images",
            lambda: omniglot_conv4(20),
            F.cross_entropy,
            2.0,
            5,
            16,
            image_batch(20, (1, 28, 28), 1, 1, binary=True),
            1e-3,
            3,
        ),
        Workload(
            "miniimagenet-5way-1shot",
            "MiniImagenet conv4 (32 filters, max-pool), 5-way 1-shot, 15 queries/class, meta-batch 4, "
            "5 inner steps (α·N=0.05), synthetic 84×84×3 images",
            lambda: miniimagenet_conv4(5),
            F.cross_entropy,
            0.05,
            5,
            4,
            image_batch(5, (3, 84, 84), 1, 15, binary=False),
            1e-3,
            3,
        ),
    ]
}
W: Workload = WORKLOADS["sinusoid"]  # the workload being measured (set in main)


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
        maml = MAML(net, W.loss, inner_lr=W.inner_lr, inner_steps=W.inner_steps, strategy=strategy, compile=compile)

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
            fast = params
            for _ in range(W.inner_steps):
                support_loss = W.loss(functional_call(net, fast, (si[i],)), st[i])
                grads = torch.autograd.grad(support_loss, list(fast.values()), create_graph=True)
                fast = {name: p - W.inner_lr * g for (name, p), g in zip(fast.items(), grads, strict=True)}
            total = total + W.loss(functional_call(net, fast, (qi[i],)), qt[i])
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
    maml = import_l2l_maml()(net, lr=W.inner_lr, first_order=False)

    def forward_backward(batch: TaskBatch) -> Tensor:
        si, st, qi, qt = batch
        total = 0.0
        for i in range(si.shape[0]):
            learner = maml.clone()
            for _ in range(W.inner_steps):
                learner.adapt(W.loss(learner(si[i]), st[i]))
            total = total + W.loss(learner(qi[i]), qt[i])
        loss = total / si.shape[0]
        loss.backward()
        return loss

    return forward_backward


def build_higher(net: nn.Sequential) -> ForwardBackward:
    """higher: innerloop_ctx with an SGD inner optimiser, copy_initial_weights=False, per task."""
    import higher

    inner_opt = torch.optim.SGD(net.parameters(), lr=W.inner_lr)

    def forward_backward(batch: TaskBatch) -> Tensor:
        si, st, qi, qt = batch
        total = 0.0
        for i in range(si.shape[0]):
            with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(W.inner_steps):
                    diffopt.step(W.loss(fnet(si[i]), st[i]))
                total = total + W.loss(fnet(qi[i]), qt[i])
        loss = total / si.shape[0]
        loss.backward()
        return loss

    return forward_backward


def build_torchopt(net: nn.Sequential) -> ForwardBackward:
    """torchopt: a differentiable MetaSGD step per task, the module's state restored between tasks."""
    import torchopt

    inner_opt = torchopt.MetaSGD(net, lr=W.inner_lr)
    net_state = torchopt.extract_state_dict(net)  # by reference: the meta-parameters themselves
    opt_state = torchopt.extract_state_dict(inner_opt)

    def forward_backward(batch: TaskBatch) -> Tensor:
        si, st, qi, qt = batch
        total = 0.0
        for i in range(si.shape[0]):
            for _ in range(W.inner_steps):
                inner_opt.step(W.loss(net(si[i]), st[i]))  # net now holds the adapted (non-leaf) tensors
            total = total + W.loss(net(qi[i]), qt[i])
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
    peak_gib: float | None = None  # CUDA only: peak allocated memory while timed

    @property
    def median(self) -> float:
        return statistics.median(self.its) if self.its else float("nan")


def meta_gradient(net: nn.Module, forward_backward: ForwardBackward, batch: TaskBatch) -> list[Tensor]:
    net.zero_grad(set_to_none=True)
    forward_backward(batch)
    return [p.grad.detach().clone() for p in net.parameters()]


def compare(grads: list[Tensor], reference: list[Tensor]) -> str:
    """✓ when the relative error of the whole meta-gradient (in norm) is within the workload's tolerance."""
    # Over all tensors at once: a conv bias followed by BatchNorm has a zero gradient (the
    # normalisation cancels it), where a per-tensor relative error would compare round-off noise.
    diff = sum(((g - r) ** 2).sum() for g, r in zip(grads, reference, strict=True)) ** 0.5
    error = (diff / sum((r**2).sum() for r in reference) ** 0.5).item()
    return "✓" if error <= W.tolerance else f"✗ relative error {error:.1e}"


def benchmark(
    impl: Impl,
    init_state: dict[str, Tensor],
    check_batch: TaskBatch,
    reference: list[Tensor],
    warmup: int,
    windows: int,
    window_s: float,
    device: str,
) -> Result:
    """Warm up (compilation included), check the meta-gradient, then time ``windows`` windows."""
    result = Result(impl)
    net = W.make_net().to(device)
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
    g = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step() -> None:
        batch = W.sample(W.meta_batch, g, device)
        opt.zero_grad(set_to_none=True)
        forward_backward(batch)
        opt.step()

    try:
        t0 = time.perf_counter()  # the first iterations include tracing and, for torch.compile, compilation
        for _ in range(warmup):
            step()
        sync()
        result.warmup_s = time.perf_counter() - t0

        net.load_state_dict(init_state)  # back to the common initial weights (copied in place)
        result.grad_check = compare(meta_gradient(net, forward_backward, check_batch), reference)

        # Size the windows from a short probe so that each lasts about window_s seconds.
        t0 = time.perf_counter()
        probe = 0
        while probe < 3 or time.perf_counter() - t0 < 0.3:
            step()
            probe += 1
        sync()
        n = max(3, round(window_s * probe / (time.perf_counter() - t0)))
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        result.its = []
        for _ in range(windows):
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            sync()
            result.its.append(n / (time.perf_counter() - t0))
        if device.startswith("cuda"):
            result.peak_gib = torch.cuda.max_memory_allocated() / 2**30
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
        f"| implementation | it/s (median) | min – max | {ratio_name} | warm-up (s) | peak GPU memory "
        "| grad matches mamlkit |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]

    def num(x: float) -> str:
        return f"{x:.0f}" if x >= 100 else f"{x:.3g}"

    for r in results:
        if not r.its:
            lines.append(f"| {r.impl.name} | {r.status} | | | | | {r.grad_check} |")
            continue
        ratio = f"{r.median / baseline.median:.1f}×" if baseline else ""
        peak = f"{r.peak_gib:.2f} GiB" if r.peak_gib is not None else "–"
        lines.append(
            f"| {r.impl.name} | {num(r.median)} | {num(min(r.its))} – {num(max(r.its))} | {ratio} "
            f"| {r.warmup_s:.1f} | {peak} | {r.grad_check} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else platform.machine()


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Python {platform.python_version()}"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"(intra-op threads: {torch.get_num_threads()}), Python {platform.python_version()}; "
        f"load average at start {load}"
    )


def marks(args: argparse.Namespace) -> tuple[str, str]:
    """The BENCHMARKS.md section of this workload and device kind (the sinusoid CPU one keeps its old name)."""
    kind = "gpu" if args.device.startswith("cuda") else "cpu"
    name = "sinusoid-speed" if (args.workload, kind) == ("sinusoid", "cpu") else f"speed-{args.workload}-{kind}"
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def section(results: list[Result], args: argparse.Namespace, machine_line: str) -> str:
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    start, end = marks(args)
    return "\n".join(
        [
            start,
            f"### {args.workload} meta-training speed against peers ({'GPU' if 'cuda' in args.device else 'CPU'})",
            "",
            f"{W.description}; second-order meta-gradient, Adam {META_LR:g}; float32 on {args.device}. One iteration "
            f"= sample a batch + meta-forward + backward + optimiser step. it/s: median of {args.windows} windows "
            f"of about {args.window_seconds:g} s after {args.warmup} warm-up iterations (torch.compile's compilation, "
            f"{'with a warm on-disk cache' if args.warm_cache else 'from an empty cache'}, is part of the warm-up).",
            "",
            f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
            f"- machine: {machine_line}",
            f"- command: `{command}`",
            "",
            table(results),
            end,
        ]
    )


# -- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=list(WORKLOADS), default="sinusoid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per implementation (median reported)")
    parser.add_argument("--window-seconds", type=float, default=2.0, help="approximate length of one window")
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up iterations (compilation happens here); default per workload"
    )
    parser.add_argument("--only", type=str, default="", help=f"comma-separated subset of {[i.key for i in IMPLS]}")
    # torch's default thread count, as users run it. On a loaded machine two threads per process stall each
    # other and the windows scatter by 10x: there, --threads 1 gives stable (and hardly slower) figures.
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default")
    parser.add_argument("--write", type=Path, default=None, help="Markdown file whose marked section to replace")
    parser.add_argument(
        "--warm-cache", action="store_true", help="reuse torch.compile's on-disk cache (default: compile from scratch)"
    )
    args = parser.parse_args()
    global W
    W = WORKLOADS[args.workload]
    args.warmup = W.warmup if args.warmup is None else args.warmup

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
        cold_cache = tempfile.mkdtemp(prefix="peers_speed_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold_cache

    machine_line = machine(args.device)
    print(machine_line, flush=True)
    torch.manual_seed(0)
    init_state = {k: v.clone() for k, v in W.make_net().to(args.device).state_dict().items()}
    check_batch = W.sample(W.meta_batch, torch.Generator().manual_seed(1234), args.device)

    # The reference meta-gradient: mamlkit, eager, one task at a time.
    ref_net = W.make_net().to(args.device)
    ref_net.load_state_dict(init_state)
    reference = meta_gradient(ref_net, build_mamlkit("loop", compile=False)(ref_net), check_batch)

    # The compiled implementation is timed last: once torch.compile has run in the process, the eager
    # implementations timed after it ran up to ~18% slower (Omniglot 5-way 1-shot, 2026-12-04), so
    # the order, not the implementation, would set their rates. The table keeps the listed order.
    by_key = {}
    for impl in sorted(impls, key=lambda i: i.key == "mamlkit-compile"):
        print(f"{impl.name} ...", end=" ", flush=True)
        r = benchmark(
            impl, init_state, check_batch, reference, args.warmup, args.windows, args.window_seconds, args.device
        )
        print(f"{r.median:.3g} it/s, grad {r.grad_check}" if r.its else r.status, flush=True)
        by_key[impl.key] = r
    results = [by_key[i.key] for i in impls]

    if cold_cache:
        shutil.rmtree(cold_cache, ignore_errors=True)

    print()
    print(table(results))
    if args.write:
        write_section(args.write, section(results, args, machine_line), *marks(args))
        print(f"\nwrote {args.write}")


if __name__ == "__main__":
    main()
