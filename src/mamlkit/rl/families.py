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

    @property
    def ant(self) -> bool:
        return self.robot == "ant"

    @property
    def velocity(self) -> bool:
        return self.key == "velocity"


MUJOCO: dict[str, MujocoFamily] = {
    "halfcheetah_vel": MujocoFamily("mamlkit/HalfCheetahVel-v0", "HalfCheetahVelEnv", "halfcheetah", "velocity", 2.0),
    "halfcheetah_dir": MujocoFamily("mamlkit/HalfCheetahDir-v0", "HalfCheetahDirEnv", "halfcheetah", "direction"),
    "ant_vel": MujocoFamily("mamlkit/AntVel-v0", "AntVelEnv", "ant", "velocity", 3.0, offset=1.0),
    "ant_dir": MujocoFamily("mamlkit/AntDir-v0", "AntDirEnv", "ant", "direction"),
}

FAMILIES = (NAVIGATION, *MUJOCO)

# The robots as the official code (rllab) simulates them, on gymnasium's model files. rllab's
# models have no frame skip: one environment step is one MuJoCo step of 0.01 s (half-cheetah) or
# 0.02 s (ant), where gymnasium's Ant-v5/HalfCheetah-v5 step 0.05 s; on gymnasium's models
# (timestep 0.01) that is a frame skip of 1 and 2 (docs/protocol.md#rl-mujoco).
XML = {"halfcheetah": "half_cheetah.xml", "ant": "ant.xml"}
FRAME_SKIP = {"halfcheetah": 1, "ant": 2}
RESET_NOISE = 0.1  # gymnasium's reset noise scale: qpos + U(-0.1, 0.1), qvel + 0.1 N(0, 1)
CHEETAH_CTRL = 0.05  # the paper's 0.05 ||a||² (rllab: 0.5 * 0.1)
# The ant's reward weights are rllab's (survival 0.05, control 0.5 * 1e-2), not gymnasium's
# defaults (1.0 and 0.5); its contact weight is gymnasium's too. The episode ends when the torso
# height leaves Ant-v5's default healthy range.
ANT_CTRL = 0.005
ANT_SURVIVE = 0.05
ANT_CONTACT = 5e-4
ANT_CONTACT_RANGE = (-1.0, 1.0)
ANT_HEALTHY_Z = (0.2, 1.0)
ANT_MAIN_BODY = 1  # the torso: its x position gives the ant's velocity
