"""Any ``gymnasium.Env`` with a task-setting hook as a :class:`~metagrad.rl.envs.BatchedEnv`.

:class:`GymnasiumTasks` holds one copy of the environment per task × rollout and steps them in a
Python loop. Its semantics are those of the built-in environments: an episode is ``done`` once
its copy reports ``terminated`` or ``truncated`` or has taken ``horizon`` steps; from then on the
copy is no longer stepped, its observation stays the last one, its reward is 0 and its ``done``
stays true (the sampler masks those steps out).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from metagrad.errors import ConfigError

if TYPE_CHECKING:
    import gymnasium

TaskHook = str | Callable[["gymnasium.Env", np.ndarray], None]
"""The name of a method ``set_task(task)`` of the environment (found through its wrappers), or a
function ``(env, task) -> None``."""


def import_gymnasium() -> ModuleType:
    """``gymnasium``, or a ConfigError saying how to install it."""
    try:
        return importlib.import_module("gymnasium")
    except ImportError as error:
        raise ConfigError("GymnasiumTasks needs the optional RL dependencies: "
                          "pip install 'metagrad[rl]'  (gymnasium>=1.0)") from error


def _flat_size(space: Any, what: str) -> int:
    gymnasium = import_gymnasium()
    if not isinstance(space, gymnasium.spaces.Box):
        raise ConfigError(
            f"the {what} space must be a gymnasium.spaces.Box (the Gaussian policy acts and "
            f"observes in continuous vectors), got {space!r}"
        )
    return int(np.prod(space.shape))


class GymnasiumTasks:
    """A batch of tasks × rollouts copies of ``make_env()`` (see the module doc).

    Args:
        make_env: builds one environment (e.g. ``lambda: gymnasium.make("MyEnv-v0")``); its
            observation and action spaces must be ``Box`` (flattened into vectors).
        sample_tasks: ``(n, generator) -> Tensor`` of ``n`` tasks, one row each (p(T)).
        set_task: applies a task (the row as a numpy array) to an environment; called on every
            copy before each reset (:data:`TaskHook`).
        horizon: episode length H; None = the environment's ``spec.max_episode_steps``.
        device: where observations, rewards and ``done`` are returned (the environments run on
            the CPU).

    Actions are clipped to the action space's bounds. ``reset`` seeds copy j (row-major over
    tasks × rollouts) with the j-th entry of ``torch.randint(2**31, (tasks·rollouts,),
    generator=generator)``, so episodes are a function of the generator's state.
    """

    def __init__(self, make_env: Callable[[], gymnasium.Env],
                 sample_tasks: Callable[[int, torch.Generator], Tensor],
                 set_task: TaskHook = "set_task", horizon: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        self._make_env = make_env
        self._sample_tasks = sample_tasks
        self._set_task = set_task
        self.device = torch.device(device)
        self._envs = [make_env()]
        first = self._envs[0]
        self.obs_dim = _flat_size(first.observation_space, "observation")
        self.act_dim = _flat_size(first.action_space, "action")
        self._action_space = first.action_space
        if horizon is None:
            horizon = getattr(first.spec, "max_episode_steps", None)
            if horizon is None:
                raise ConfigError("GymnasiumTasks needs a horizon: the environment has no "
                                  "spec.max_episode_steps")
        if horizon < 1:
            raise ConfigError(f"horizon must be >= 1, got {horizon}")
        self.horizon = horizon
        if isinstance(set_task, str) and not callable(self._hook_method(first)):
            raise ConfigError(f"the environment has no method {set_task!r} to set its task; "
                              "pass set_task=<method name or function (env, task) -> None>")
        self.tasks = torch.zeros(0, device="cpu")
        self._shape = (0, 0)
        self._obs = np.zeros((0, self.obs_dim))
        self._done = np.zeros(0, dtype=bool)
        self._t = 0

    def _hook_method(self, env: gymnasium.Env) -> Any:
        try:
            return env.get_wrapper_attr(str(self._set_task))
        except AttributeError:
            return None

    def sample_tasks(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` tasks from the ``sample_tasks`` given at construction."""
        return self._sample_tasks(n, generator).to(self.device)

    def reset_task(self, tasks: Tensor) -> None:
        if tasks.dim() < 1:
            raise ConfigError(f"tasks must have one row per task, got shape {tuple(tasks.shape)}")
        self.tasks = tasks.detach().cpu()

    def reset(self, rollouts: int, generator: torch.Generator) -> Tensor:
        """Sets every copy's task, then resets it with its seed (class doc)."""
        n = len(self.tasks) * rollouts
        self._envs += [self._make_env() for _ in range(n - len(self._envs))]
        seeds = torch.randint(2**31, (n,), generator=generator, device=generator.device).tolist()
        observations = []
        for j, (env, seed) in enumerate(zip(self._envs[:n], seeds, strict=True)):
            task = self.tasks[j // rollouts].numpy()
            if isinstance(self._set_task, str):
                self._hook_method(env)(task)
            else:
                self._set_task(env, task)
            obs, _ = env.reset(seed=seed)
            observations.append(np.asarray(obs, dtype=np.float64).reshape(-1))
        self._shape = (len(self.tasks), rollouts)
        self._obs = np.stack(observations) if observations else np.zeros((0, self.obs_dim))
        self._done = np.zeros(n, dtype=bool)
        self._t = 0
        return self._as_tensor(self._obs)

    def _as_tensor(self, array: np.ndarray) -> Tensor:
        """``[tasks · rollouts, ...]`` → float32 ``[tasks, rollouts, ...]`` on the device."""
        tensor = torch.as_tensor(array, dtype=torch.float32, device="cpu")
        return tensor.view(*self._shape, *array.shape[1:]).to(self.device)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if actions.shape != (*self._shape, self.act_dim):
            raise ConfigError(
                f"actions must have shape {(*self._shape, self.act_dim)} [tasks, rollouts, act], "
                f"got {tuple(actions.shape)}"
            )
        space = self._action_space
        clipped = np.clip(actions.detach().cpu().double().numpy().reshape(-1, self.act_dim),
                          space.low.reshape(-1), space.high.reshape(-1))
        rewards = np.zeros(len(self._done))
        for j in np.flatnonzero(~self._done):
            action = clipped[j].reshape(space.shape).astype(space.dtype)
            obs, reward, terminated, truncated, _ = self._envs[j].step(action)
            self._obs[j] = np.asarray(obs, dtype=np.float64).reshape(-1)
            rewards[j] = float(reward)
            self._done[j] = terminated or truncated
        self._t += 1
        if self._t >= self.horizon:
            self._done[:] = True
        done = torch.as_tensor(self._done.copy(), device="cpu").view(self._shape).to(self.device)
        return self._as_tensor(self._obs), self._as_tensor(rewards), done

    def close(self) -> None:
        """Closes every copy."""
        for env in self._envs:
            env.close()
