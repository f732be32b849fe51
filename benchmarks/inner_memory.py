"""Peak memory of one second-order meta-iteration against the number of inner steps, with and
without ``checkpoint_inner`` (inner-step activations recomputed in the backward pass).

Workload: the Omniglot conv4 of the paper (64 filters, stride 2, batch-statistics BatchNorm),
N-way K-shot with K queries per class (5-way 1-shot by default), synthetic 28x28 images. Each
measurement runs in a fresh process: on CUDA the figure is ``torch.cuda.max_memory_allocated``;
on the CPU it is the rise of the process's peak resident memory over its resident memory just
before the meta-iteration, with glibc told to serve large blocks by mmap (so that freed memory
leaves the process and the peak follows the live tensors).

    python benchmarks/inner_memory.py [--device cpu] [--steps 1,5,10,20,40] [--meta-batch 8]
        [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from report import write_section

START, END = "<!-- inner-memory:start -->", "<!-- inner-memory:end -->"


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(device: str, steps: int, checkpoint: bool, meta_batch: int, n_way: int, k_shot: int) -> dict:
    """One meta-iteration in this process; returns peak memory (MiB) and seconds."""
    import torch
    import torch.nn.functional as F

    from mamlkit import MAML, TaskBatch
    from mamlkit.models import ADAPT_ALL_BUT_NORM, omniglot_conv4

    torch.manual_seed(0)
    model = omniglot_conv4(n_way).to(device)
    maml = MAML(
        model,
        F.cross_entropy,
        inner_lr=0.4,
        inner_steps=steps,
        adapt=ADAPT_ALL_BUT_NORM,
        strategy="loop",  # the same strategy both ways, so that the difference is the checkpointing
        checkpoint_inner=checkpoint,
    )
    x = torch.rand(meta_batch, n_way * k_shot, 1, 28, 28, device=device)
    y = torch.arange(n_way, device=device).repeat_interleave(k_shot).expand(meta_batch, n_way * k_shot)
    batch = TaskBatch(x, y, x.clone(), y.clone())
    if device.startswith("cuda"):  # cuDNN's and the allocator's warm-up; the CPU's peak RSS cannot be reset
        maml.meta_backward(batch)
        maml.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mib()
    t0 = time.perf_counter()
    maml.meta_backward(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {
        "steps": steps,
        "checkpoint": checkpoint,
        "peak_mib": peak,
        "seconds": time.perf_counter() - t0,
        "strategy": maml.strategy,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", default="1,5,10,20,40")
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-shot", type=int, default=1, help="support (and query) images per class")
    p.add_argument("--write", type=Path, default=None, help="Markdown file whose marked section to replace")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: "steps,checkpoint" measured in this process
    args = p.parse_args()
    if args.one:
        steps, ck = args.one.split(",")
        print(json.dumps(measure(args.device, int(steps), ck == "1", args.meta_batch, args.n_way, args.k_shot)))
        return
    rows = []
    for steps in map(int, args.steps.split(",")):
        for ck in (0, 1):
            cmd = [sys.executable, __file__, "--device", args.device, "--meta-batch", str(args.meta_batch)]
            cmd += ["--n-way", str(args.n_way), "--k-shot", str(args.k_shot)]
            # glibc keeps freed heap memory in the process, so the peak RSS would also count memory that the
            # autograd graph freed long ago; served by mmap, large blocks go back to the OS when freed.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run([*cmd, "--one", f"{steps},{ck}"], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                rows.append({"steps": steps, "checkpoint": bool(ck), "error": out.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    import torch

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'CPU'}"
    what = (
        "max_memory_allocated above the pre-step allocation"
        if args.device.startswith("cuda")
        else ("peak resident memory above the pre-step resident memory")
    )
    lines = [
        START,
        "### Second-order memory against inner steps, with and without checkpoint_inner",
        "",
        f"Omniglot conv4, {args.n_way}-way {args.k_shot}-shot, {args.k_shot} queries per class, "
        f"meta-batch {args.meta_batch}, one meta-iteration "
        f"(forward + meta-backward, tasks in a loop both ways) per fresh process; memory = {what}.",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {device}, torch {torch.__version__}, Python {platform.python_version()}",
        f"- command: `python benchmarks/inner_memory.py {' '.join(sys.argv[1:])}`",
        "",
        "| inner steps | stored: peak MiB | stored: s | checkpointed: peak MiB | checkpointed: s | memory ratio |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["steps"], r["checkpoint"]): r for r in rows}
    for steps in map(int, args.steps.split(",")):
        a, b = by[(steps, False)], by[(steps, True)]

        def cell(r, k, fmt):
            return fmt.format(r[k]) if k in r else r.get("error", "–")[:40]

        ratio = f"{a['peak_mib'] / b['peak_mib']:.1f}×" if "peak_mib" in a and "peak_mib" in b else "–"
        lines.append(
            f"| {steps} | {cell(a, 'peak_mib', '{:.0f}')} | {cell(a, 'seconds', '{:.2f}')} | "
            f"{cell(b, 'peak_mib', '{:.0f}')} | {cell(b, 'seconds', '{:.2f}')} | {ratio} |"
        )
    lines.append(END)
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(args.write, text, START, END)


if __name__ == "__main__":
    main()
