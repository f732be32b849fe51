"""Pieces the tests share: a float64 fixture, random regression batches, finite differences, and
stepping a batched MuJoCo sampler beside reference environments."""

import numpy as np
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


def step_beside_references(env, refs, seeds, scale, steps=200, dtype=np.float64):
    """Reset ``env`` (a ``BatchedMujoco`` with its tasks set) and the reference environments ``refs``
    from ``seeds``, step both with the same normal actions of standard deviation ``scale`` (spread
    past the bounds, so clipping matters), and require equal observations, rewards and ends; return
    each copy's terminal step (None where it never ended). Closes ``env``."""
    obs = env.reset(seeds=seeds)
    for ref, seed, o in zip(refs, seeds, obs):
        np.testing.assert_allclose(ref.reset(seed=seed)[0], o, rtol=0, atol=1e-9)
    rng = np.random.default_rng(0)
    n = len(refs)
    alive, ends = np.ones(n, dtype=bool), [None] * n
    for t in range(steps):
        actions = rng.normal(0.0, scale, (n, env.act_dim)).astype(dtype)
        obs, reward, terminated = env.step(actions, alive)
        for i in np.flatnonzero(alive):
            o, r, term, _, _ = refs[i].step(actions[i])
            np.testing.assert_allclose(obs[i], o, rtol=0, atol=1e-9, err_msg=f"copy {i} step {t}")
            assert abs(reward[i] - r) <= 1e-9, (i, t, reward[i], r)
            assert terminated[i] == term, (i, t)
            if term:
                ends[i] = t
        alive &= ~terminated
        if not alive.any():
            break
    env.close()
    return ends
