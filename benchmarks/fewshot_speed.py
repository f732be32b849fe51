"""Meta-iterations per second of the few-shot classification presets, per execution strategy.

For each preset (Omniglot 5-way 1-shot and 20-way 1-shot by default) and each strategy (a
per-task loop, vmap, optionally under torch.compile), time full meta-iterations of the paper's
configuration on real Omniglot tasks: sample a batch on the device, meta-forward, backward,
Adam step. Reports the median of a few timed windows and the time a full 60,000-iteration run
would take at that rate, and what ``strategy: auto`` picks.

    python benchmarks/fewshot_speed.py [--presets omniglot-5way-1shot,omniglot-20way-1shot]
        [--strategies loop,vmap] [--compile] [--device cpu] [--write BENCHMARKS.md]

The Omniglot archives come from --data or $MAMLKIT_OMNIGLOT_DIR.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from report import write_section

from mamlkit.engine.maml import PROBE_TASKS
from mamlkit.experiments import fewshot, load_config
from mamlkit.training import make_optimizer

START, END = "<!-- fewshot-speed:start -->", "<!-- fewshot-speed:end -->"


def time_preset(
    preset: str, strategy: str, compile: bool, device: str, windows: int, per_window: int, extra: list[str]
) -> dict:
    sets = [f"maml.strategy={strategy}", f"maml.compile={str(compile).lower()}", f"train.device={device}", *extra]
    cfg = load_config(preset, sets)
    torch.manual_seed(0)
    learner = fewshot.make_learner(cfg)
    tasks = fewshot.make_tasks(cfg, fewshot.load_split(cfg, "train"), cfg.task.q_query)
    opt = make_optimizer(learner.parameters(), cfg.train.meta_lr)
    g = torch.Generator(device).manual_seed(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step() -> None:
        batch = tasks.batch(cfg.train.meta_batch_size, g)
        opt.zero_grad(set_to_none=True)
        learner.meta_backward(batch)
        opt.step()

    t0 = time.perf_counter()
    for _ in range(2):  # tracing, compilation, allocator warm-up
        step()
    sync()
    warmup = time.perf_counter() - t0
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(per_window):
            step()
        sync()
        rates.append(per_window / (time.perf_counter() - t0))
    its = statistics.median(rates)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {
        "preset": preset,
        "strategy": strategy + (" + compile" if compile else ""),
        "its": its,
        "spread": (min(rates), max(rates)),
        "warmup": warmup,
        "full_run_h": cfg.train.iterations / its / 3600,
        "peak_gb": peak,
        "batch": cfg.train.meta_batch_size,
        "steps": cfg.maml.inner_steps,
    }


def auto_choice(preset: str, device: str, extra: list[str]) -> str:
    cfg = load_config(preset, ["maml.strategy=auto", f"train.device={device}", *extra])
    learner = fewshot.make_learner(cfg)
    tasks = fewshot.make_tasks(cfg, fewshot.load_split(cfg, "train"), cfg.task.q_query)
    learner.meta_backward(tasks.batch(cfg.train.meta_batch_size, torch.Generator(device).manual_seed(0)))
    ms = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in learner.strategy_timings.items())
    return f"{preset}: auto picks **{learner.strategy}** ({ms} for the meta-gradient of its {PROBE_TASKS}-task probe)"


def table(rows: list[dict]) -> str:
    lines = [
        "| preset | meta-batch, inner steps | strategy | it/s (median) | min – max | warm-up (s) | "
        "60,000 iterations | peak GPU memory |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = f"{r['peak_gb']:.1f} GiB" if r["peak_gb"] is not None else "–"
        lines.append(
            f"| {r['preset']} | {r['batch']}, {r['steps']} | {r['strategy']} | {r['its']:.2f} | "
            f"{r['spread'][0]:.2f} – {r['spread'][1]:.2f} | {r['warmup']:.1f} | "
            f"{r['full_run_h']:.1f} h | {peak} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="omniglot-5way-1shot,omniglot-20way-1shot")
    p.add_argument("--strategies", default="loop,vmap")
    p.add_argument("--compile", action="store_true", help="also time each strategy under torch.compile")
    p.add_argument("--device", default="cpu")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--per-window", type=int, default=3, help="meta-iterations per timed window")
    p.add_argument("--data", default=None, help="Omniglot directory (default: $MAMLKIT_OMNIGLOT_DIR)")
    p.add_argument("--write", type=Path, default=None, help="Markdown file whose marked section to replace")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = p.parse_args()
    if args.data:
        os.environ["MAMLKIT_OMNIGLOT_DIR"] = args.data
    rows, choices = [], []
    for preset in args.presets.split(","):
        for strategy in args.strategies.split(","):
            for compile in (False, True) if args.compile else (False,):
                rows.append(
                    time_preset(preset, strategy, compile, args.device, args.windows, args.per_window, args.set)
                )
                print(table(rows[-1:]).splitlines()[-1], flush=True)
        choices.append(auto_choice(preset, args.device, args.set))
        print(choices[-1], flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else _cpu()
    text = "\n".join(
        [
            START,
            "### Few-shot classification meta-training speed",
            "",
            "The paper's presets (second order, real Omniglot tasks sampled on the device, Adam step), one "
            "meta-iteration = sample + meta-forward + backward + optimiser step; median of "
            f"{args.windows} windows of {args.per_window} iterations after 2 warm-up iterations.",
            "",
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
            f"- machine: {device}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}",
            f"- command: `python benchmarks/fewshot_speed.py {' '.join(_argv())}`",
            "",
            table(rows),
            "",
            *[f"- {c}" for c in choices],
            END,
        ]
    )
    print(text)
    if args.write:
        write_section(args.write, text, START, END)


def _cpu() -> str:
    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{model}, {os.cpu_count()} cores"


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
