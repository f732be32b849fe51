"""Gymnasium registration of mamlkit's task environments (each has ``sample_tasks`` and ``set_task``).

The MuJoCo ones import mujoco only when made (``pip install "gymnasium[mujoco]"``).
"""

from __future__ import annotations

import gymnasium as gym

NAVIGATION = "mamlkit/Navigation2D-v0"
MUJOCO = {
    "mamlkit/HalfCheetahVel-v0": "HalfCheetahVelEnv",
    "mamlkit/HalfCheetahDir-v0": "HalfCheetahDirEnv",
    "mamlkit/AntVel-v0": "AntVelEnv",
    "mamlkit/AntDir-v0": "AntDirEnv",
}


def register() -> None:
    """Register the environments once (``gym.make("mamlkit/Navigation2D-v0")``)."""
    if NAVIGATION not in gym.registry:
        gym.register(NAVIGATION, entry_point="mamlkit.rl.navigation:Navigation2DEnv", max_episode_steps=100)
    for name, cls in MUJOCO.items():
        if name not in gym.registry:
            gym.register(name, entry_point=f"mamlkit.rl.mujoco_tasks:{cls}", max_episode_steps=200)


register()
