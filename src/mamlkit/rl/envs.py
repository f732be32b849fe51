"""Gymnasium registration of mamlkit's task environments (each has ``sample_tasks`` and ``set_task``)."""

from __future__ import annotations

import gymnasium as gym

NAVIGATION = "mamlkit/Navigation2D-v0"


def register() -> None:
    """Register the environments once (``gym.make("mamlkit/Navigation2D-v0")``)."""
    if NAVIGATION not in gym.registry:
        gym.register(NAVIGATION, entry_point="mamlkit.rl.navigation:Navigation2DEnv", max_episode_steps=100)


register()
