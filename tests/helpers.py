"""Pieces the engine's tests share: a float64 fixture, random regression batches, finite differences."""

import pytest
import torch

from mamlkit import TaskBatch


@pytest.fixture(autouse=True)
def float64():
    """Every test of a module that imports this runs in float64 (finite differences need it)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def make_batch(tasks=3, k=6, q=5, d_in=2, d_out=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        torch.randn(tasks, k, d_in, generator=g),
        torch.randn(tasks, k, d_out, generator=g),
        torch.randn(tasks, q, d_in, generator=g),
        torch.randn(tasks, q, d_out, generator=g),
    )


def finite_difference_grad(fn, tensors, eps=1e-6):
    """Central differences of scalar ``fn()`` w.r.t. every element of ``tensors``."""
    grads = []
    with torch.no_grad():
        for t in tensors:
            g = torch.zeros_like(t)
            flat, gflat = t.view(-1), g.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + eps
                up = fn().item()
                flat[i] = old - eps
                down = fn().item()
                flat[i] = old
                gflat[i] = (up - down) / (2 * eps)
            grads.append(g)
    return grads
