"""Gymnasium registration of mamlkit's task environments (each has ``sample_tasks`` and ``set_task``).

The MuJoCo ones import mujoco only when made (``pip install "gymnasium[mujoco]"``).
"""

from __future__ import annotations

import gymnasium as gym

from .families import MUJOCO, VARIANTS

NAVIGATION = "mamlkit/Navigation2D-v0"


def register() -> None:
    """Register the environments once (``gym.make("mamlkit/Navigation2D-v0")``)."""
    if NAVIGATION not in gym.registry:
        gym.register(NAVIGATION, entry_point="mamlkit.rl.navigation:Navigation2DEnv", max_episode_steps=100)
    for family in MUJOCO.values():
        for variant in VARIANTS:  # mamlkit/AntDir-v0 and its paper variant mamlkit/AntDirPaper-v0
            env_id = family.env_id_of(variant)
            if env_id not in gym.registry:
                entry = f"mamlkit.rl.mujoco_tasks:{family.env_class_of(variant)}"
                gym.register(env_id, entry_point=entry, max_episode_steps=200)


register()
