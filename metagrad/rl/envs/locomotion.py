"""MuJoCo locomotion tasks of the MAML paper (Finn et al. 2017, §5.3), batched.

The robots are gymnasium's ``HalfCheetah-v5`` / ``Ant-v5`` models (same XML, the same observations
without x (and y for the ant); the ant's contact forces are left out), stepped with one of two
``physics``:

* ``"gymnasium"`` (v5): 5 physics steps of 0.01 s per action (dt = 0.05); reset to the model's
  initial pose with qpos + U(−0.1, 0.1), qvel + 0.1·N(0, 1).
* ``"rllab"``, the MAML authors' environments (rllab's ``ant.xml`` and ``half_cheetah.xml``, which
  set no frame skip): one physics step per action, of 0.02 s for the ant (its RK4 timestep) and
  0.01 s for the half cheetah; reset to rllab's initial pose (the ant stands on bent legs, torso
  at 0.55) with qpos + 0.01·N(0, 1), qvel + 0.1·N(0, 1). An episode of H = 200 steps then lasts
  4 s (ant) or 2 s (half cheetah) of simulated time, against 10 s in gymnasium's.

Every step advances all tasks × rollouts at once with :func:`mujoco.rollout` (``frame_skip``
physics steps from the batch of states, the action held fixed), not through a Python loop over
environments. Each environment evolves exactly as one ``MjData`` stepped by ``mj_step`` whose
constraint solver starts every action from a zero warm start (gymnasium carries the warm start
over; the observations agree to float32 precision, ``tests/rl/test_locomotion.py``).

Rewards (v = forward velocity Δx/dt of the root, as gymnasium's; rllab's ant takes the
instantaneous velocity of its centre of mass instead; a = action clipped to [−1, 1]); the costs
follow the MAML authors' rllab environments:

* ``HalfCheetahVel``: goal velocity g ~ U[0, 2]; r = −|v − g| − 0.05‖a‖².
* ``HalfCheetahDir``: direction d = ±1; r = d·v − 0.05‖a‖².
* ``AntVel``: g ~ U[0, 3]; r = −|v − g| + 1 (the paper's bonus, App. A.2) + 0.05 − 0.005‖a‖².
* ``AntDir``: d = ±1; r = d·v + 0.05 − 0.005‖a‖².

The rllab ant's contact cost (0.0005·‖clip(cfrc_ext, ±1)‖²) is omitted: the batched rollout does
not compute external contact forces. Episodes last H = 200 steps. An ant episode ends early
(``done``) once its state is not finite or its torso height qpos[2] leaves [0.2, 1.0], the rule of
the authors' rllab ant and of gymnasium's ``Ant-v5`` (``terminate_when_unhealthy``); without it a
flipped ant lies on its back for the rest of the episode at no cost, and the constant bonus, which
rewards staying alive, rewards nothing. The half cheetah never ends early (as in both references).
An ended episode's environment is no longer simulated: its state stays as it ended, it reports
``done`` and reward 0 until the next ``reset``.
"""

from __future__ import annotations

import importlib
import importlib.resources
import os
import re
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from metagrad.errors import ConfigError

if TYPE_CHECKING:
    from metagrad.rl.settings import RLConfig


def import_mujoco() -> ModuleType:
    """``mujoco`` (with ``mujoco.rollout``), or a ConfigError saying how to install it."""
    try:
        mujoco = importlib.import_module("mujoco")
        importlib.import_module("mujoco.rollout")
    except ImportError as error:
        raise ConfigError(
            "the MuJoCo environments need the optional RL dependencies: "
            "pip install 'metagrad[rl]'  (gymnasium>=1.0 and mujoco>=3.1)"
        ) from error
    return mujoco


@dataclass(frozen=True)
class Robot:
    xml: str
    """File name among gymnasium's MuJoCo assets."""
    obs_skip: int
    """Leading qpos entries left out of the observation (the root's x, or x and y)."""
    ctrl_cost: float
    """c in −c‖a‖²."""
    bonus: float
    """Constant reward added at every step."""
    velocity_bonus: float
    """Further constant reward at every step of the goal-velocity task."""
    max_goal_velocity: float
    rllab_timestep: float
    """The physics step of the authors' rllab model (one step per action)."""
    rllab_init_qpos: tuple[float, ...] | None = None
    """The initial pose of the authors' rllab model (None: the model's own)."""
    healthy_z: tuple[float, float] | None = None
    """The range of the root's height qpos[2] outside which an episode ends (None: never)."""


ROBOTS = {
    "half_cheetah": Robot("half_cheetah.xml", 1, 0.05, 0.0, 0.0, 2.0, rllab_timestep=0.01),
    "ant": Robot("ant.xml", 2, 0.005, 0.05, 1.0, 3.0, rllab_timestep=0.02,
                 rllab_init_qpos=(0, 0, 0.55, 1, 0, 0, 0, 0, 1, 0, -1, 0, -1, 0, 1),
                 healthy_z=(0.2, 1.0)),
}


class Locomotion:
    """``robot`` ∈ {"half_cheetah", "ant"}, ``task`` ∈ {"vel", "dir"}; see the module doc.

    Args:
        horizon: episode length H (None: 200).
        nthread: MuJoCo rollout threads (0 = the calling thread; None: this process's share of
            the CPUs, :func:`default_threads`). Every environment is simulated from its own
            state by one thread, so the results do not depend on it.
        physics: ``"gymnasium"`` (v5) or ``"rllab"`` (the MAML authors'): the control period,
            the initial pose and the reset noise (module doc).
        device: where observations, rewards and tasks are returned (MuJoCo simulates on the CPU).
    """

    default_horizon = 200

    def __init__(self, robot: Literal["half_cheetah", "ant"], task: Literal["vel", "dir"], *,
                 horizon: int | None = None, nthread: int | None = None,
                 physics: Literal["gymnasium", "rllab"] = "gymnasium",
                 device: torch.device | str = "cpu") -> None:
        horizon = self.default_horizon if horizon is None else horizon
        nthread = default_threads() if nthread is None else nthread
        if robot not in ROBOTS:
            raise ConfigError(f"robot must be one of {sorted(ROBOTS)}, got {robot!r}")
        if task not in ("vel", "dir"):
            raise ConfigError(
                f"task must be 'vel' (goal velocity) or 'dir' (direction), got {task!r}"
            )
        if physics not in ("gymnasium", "rllab"):
            raise ConfigError(f"physics must be 'gymnasium' or 'rllab', got {physics!r}")
        if horizon < 1 or nthread < 0:
            raise ConfigError(f"need horizon >= 1, nthread >= 0; got {horizon}, {nthread}")
        mujoco = import_mujoco()
        self._mujoco = mujoco
        self.robot = ROBOTS[robot]
        self.task = task
        self.horizon = horizon
        self.physics = physics
        self.device = torch.device(device)
        self.bonus = self.robot.bonus + (self.robot.velocity_bonus if task == "vel" else 0.0)
        assets = importlib.resources.files("gymnasium") / "envs" / "mujoco" / "assets"
        self.model = _load_model(mujoco, (assets / self.robot.xml).read_text())
        if physics == "rllab":
            self.model.opt.timestep = self.robot.rllab_timestep
        self.frame_skip = 5 if physics == "gymnasium" else 1
        self.dt = self.model.opt.timestep * self.frame_skip
        self._data = [mujoco.MjData(self.model) for _ in range(max(nthread, 1))]
        self._rollout = mujoco.rollout.Rollout(nthread=nthread)
        full = mujoco.mjtState.mjSTATE_FULLPHYSICS
        self._nstate = mujoco.mj_stateSize(self.model, full)
        # Layout of a full-physics state: [time, qpos, qvel, act, ...] (mjtState bit order).
        self._qpos = slice(1, 1 + self.model.nq)
        self._qvel = slice(self._qpos.stop, self._qpos.stop + self.model.nv)
        self._initial = np.empty(self._nstate)
        mujoco.mj_getState(self.model, self._data[0], self._initial, full)
        if physics == "rllab" and self.robot.rllab_init_qpos is not None:
            self._initial[self._qpos] = self.robot.rllab_init_qpos
        self.obs_dim = self.model.nq - self.robot.obs_skip + self.model.nv
        self.act_dim = self.model.nu
        low, high = self.model.actuator_ctrlrange.T
        self._ctrl_low = torch.as_tensor(low, dtype=torch.float32, device="cpu")
        self._ctrl_high = torch.as_tensor(high, dtype=torch.float32, device="cpu")
        self.tasks = torch.zeros(0, device="cpu")
        self._shape: tuple[int, int] = (0, 0)
        self._allocate(0)

    def _allocate(self, n: int) -> None:
        """The buffers of ``n`` environments: their states, every physics step's state written by
        the rollout, the held controls, and one model reference per environment (the rollout's
        argument, given without its per-call checks and copies)."""
        self._state = np.empty((n, self._nstate))
        self._states = np.empty((n, self.frame_skip, self._nstate))
        self._control = np.empty((n, self.frame_skip, self.act_dim))
        self._models = [self.model] * n
        self._ended = np.zeros(n, dtype=bool)

    def sample_tasks(self, n: int, generator: torch.Generator) -> Tensor:
        """Goal velocities U[0, max] (``vel``) or directions ±1 (``dir``), shape ``[n]``."""
        if self.task == "vel":
            goals = (torch.rand(n, generator=generator, device=generator.device)
                     * self.robot.max_goal_velocity)
        else:
            goals = torch.randint(0, 2, (n,), generator=generator,
                                  device=generator.device).float() * 2 - 1
        return goals.to(self.device)

    def reset_task(self, tasks: Tensor) -> None:
        if tasks.dim() != 1:
            raise ConfigError(f"locomotion tasks have shape [n], got {tuple(tasks.shape)}")
        self.tasks = tasks.detach().float().cpu()

    def reset(self, rollouts: int, generator: torch.Generator) -> Tensor:
        n = len(self.tasks) * rollouts
        nq, nv = self.model.nq, self.model.nv
        if self.physics == "gymnasium":  # U(-0.1, 0.1)
            noise_q = (torch.rand(n, nq, generator=generator, dtype=torch.float64,
                                  device=generator.device) * 2 - 1) * 0.1
        else:  # 0.01·N(0, 1)
            noise_q = torch.randn(n, nq, generator=generator, dtype=torch.float64,
                                  device=generator.device) * 0.01
        noise_v = torch.randn(n, nv, generator=generator, dtype=torch.float64,
                              device=generator.device)
        if len(self._state) != n:
            self._allocate(n)
        self._state[:] = self._initial
        self._state[:, self._qpos] += noise_q.cpu().numpy()
        self._state[:, self._qvel] += 0.1 * noise_v.cpu().numpy()
        self._ended[:] = False
        self._shape = (len(self.tasks), rollouts)
        return self._observe()

    def _observe(self) -> Tensor:
        qpos = self._state[:, self._qpos][:, self.robot.obs_skip:]
        obs = np.concatenate([qpos, self._state[:, self._qvel]], axis=1)
        return torch.from_numpy(obs).float().view(*self._shape, self.obs_dim).to(self.device)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if actions.shape != (*self._shape, self.act_dim):
            raise ConfigError(
                f"actions must have shape {(*self._shape, self.act_dim)} [tasks, rollouts, act], "
                f"got {tuple(actions.shape)}"
            )
        action = torch.maximum(torch.minimum(actions.detach().float().cpu(), self._ctrl_high),
                               self._ctrl_low)
        x_before = self._state[:, self._qpos.start].copy()
        running = np.flatnonzero(~self._ended)  # only the running episodes are simulated
        n = len(running)
        if n:
            self._control[:n] = action.view(-1, 1, self.act_dim).numpy()[running]
            self._rollout.rollout(self._models[:n], self._data, self._state[running],
                                  self._control[:n], nstep=self.frame_skip,
                                  state=self._states[:n], skip_checks=True)
            self._state[running] = self._states[:n, -1]
        velocity = torch.from_numpy((self._state[:, self._qpos.start] - x_before) / self.dt)
        velocity = velocity.float().view(self._shape)
        goal = self.tasks[:, None]
        forward = -(velocity - goal).abs() if self.task == "vel" else goal * velocity
        reward = forward + self.bonus - self.robot.ctrl_cost * action.square().sum(-1)
        ended_before = torch.from_numpy(self._ended.copy()).view(self._shape)
        self._ended |= self._unhealthy().view(-1).numpy()
        reward = reward.masked_fill(ended_before, 0.0)
        done = torch.from_numpy(self._ended.copy()).view(self._shape)
        return self._observe(), reward.to(self.device), done.to(self.device)

    def _unhealthy(self) -> Tensor:
        """``[tasks, rollouts]``: whether each environment's state ends its episode (the robot's
        ``healthy_z`` rule, and a state that is not finite)."""
        if self.robot.healthy_z is None:
            return torch.zeros(self._shape, dtype=torch.bool)
        low, high = self.robot.healthy_z
        height = self._state[:, self._qpos.start + 2]
        qpos_qvel = self._state[:, self._qpos.start:self._qvel.stop]
        healthy = np.isfinite(qpos_qvel).all(1) & (height >= low) & (height <= high)
        return torch.from_numpy(~healthy).view(self._shape)

    def close(self) -> None:
        """Frees the rollout thread pool."""
        self._rollout.close()


def default_threads() -> int:
    """Rollout threads when none are given: this process's share of the CPUs it may run on
    (shared among ``torchrun``'s ``LOCAL_WORLD_SIZE`` processes of this machine); 0, the calling
    thread, when that share is a single CPU."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = (cpus or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return share if share > 1 else 0


def from_config(robot: Literal["half_cheetah", "ant"], task: Literal["vel", "dir"],
                config: RLConfig, device: torch.device) -> Locomotion:
    """The registry's factory (``robot`` and ``task`` bound per entry): ``horizon``,
    ``env_threads`` and ``physics``."""
    return Locomotion(robot, task, horizon=config.horizon, nthread=config.env_threads,
                      physics=config.physics, device=device)


_TOTAL_MASS = re.compile(r'\s+settotalmass="([^"]+)"')


def _load_model(mujoco: ModuleType, xml: str) -> Any:
    """The MuJoCo model of ``xml``, with gymnasium's ``settotalmass`` compiler attribute (which
    MuJoCo ≥ 3.16 reports as deprecated on every load) applied by ``mj_setTotalmass`` instead:
    the same masses, inertias and derived constants."""
    total = _TOTAL_MASS.search(xml)
    if total:
        xml = xml[:total.start()] + xml[total.end():]
    model = mujoco.MjModel.from_xml_string(xml)
    if total:
        mujoco.mj_setTotalmass(model, float(total.group(1)))
        mujoco.mj_setConst(model, mujoco.MjData(model))
    return model
