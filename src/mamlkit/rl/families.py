"""The RL task families: the one table that the config, the task samplers and the gymnasium
registration read. Light on purpose (no gymnasium or MuJoCo import)."""

from __future__ import annotations

from dataclasses import dataclass

NAVIGATION = "navigation2d"


@dataclass(frozen=True)
class MujocoFamily:
    """A MuJoCo task family: a robot rewarded for a goal velocity or a direction."""

    env_id: str  # gymnasium id, registered by mamlkit.rl.envs
    env_class: str  # its class in mamlkit.rl.mujoco_tasks
    robot: str  # "halfcheetah" or "ant"
    key: str  # the task parameter: "velocity" (goal ~ U[0, high]) or "direction" (+1 or -1)
    high: float | None = None  # velocity goals' upper bound; None for directions
    offset: float = 0.0  # added to the velocity term every step (the official AntVel's +1)


MUJOCO: dict[str, MujocoFamily] = {
    "halfcheetah_vel": MujocoFamily("mamlkit/HalfCheetahVel-v0", "HalfCheetahVelEnv", "halfcheetah", "velocity", 2.0),
    "halfcheetah_dir": MujocoFamily("mamlkit/HalfCheetahDir-v0", "HalfCheetahDirEnv", "halfcheetah", "direction"),
    "ant_vel": MujocoFamily("mamlkit/AntVel-v0", "AntVelEnv", "ant", "velocity", 3.0, offset=1.0),
    "ant_dir": MujocoFamily("mamlkit/AntDir-v0", "AntDirEnv", "ant", "direction"),
}

FAMILIES = (NAVIGATION, *MUJOCO)
