"""Meta-training over several processes (``torchrun``): each rank computes the meta-gradient of
its share of the meta-batch's tasks and the ranks sum the shares before every outer step.

``DistributedDataParallel`` cannot be used: its hooks do not run under ``autograd.grad`` or
double backward, which second-order MAML needs. The all-reduce is done here by hand instead,
weighted by each rank's task count, so that the parameters stay identical on every rank and
equal (to float summation order) to a single-process run on the same seeds.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor


def setup(device: str) -> None:
    """Join the process group that ``torchrun`` describes in the environment (once): gloo for
    CPU training, NCCL for CUDA with one GPU per local rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = device.startswith("cuda") or device == "auto" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard(n: int) -> slice:
    """This rank's contiguous share of ``n`` tasks: sizes differ by at most one, earlier ranks
    take the larger shares. Refused when a rank would get none."""
    world, r = world_size(), rank()
    if n < world:
        raise ValueError(f"a meta-batch of {n} tasks cannot be split over {world} processes; use at most {n}")
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def _device() -> torch.device:
    """Where the collectives' tensors live: NCCL reduces CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensors: list[Tensor]) -> None:
    """Sum each tensor over the ranks, in place (one flat message, in the first tensor's dtype)."""
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors]).to(_device())
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (a stop that all ranks take together)."""
    if not active():
        return flag
    t = torch.tensor([float(flag)], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (a checkpoint read once, also without a shared disk)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn):
    """``fn()`` run by rank 0 alone, its result handed to every rank; if it raises, every rank
    raises the same error (so no rank waits in a collective for one that failed)."""
    if not active():
        return fn()
    box = [None]
    if is_main():
        try:
            box = [(True, fn())]
        except Exception as e:  # sent to the others, re-raised everywhere below
            box = [(False, e)]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def barrier() -> None:
    if active():
        dist.barrier()
