"""Batched meta-RL environments by name: :data:`ENVS`, :func:`make_env`, :func:`env_from_config`.

An environment is registered as a factory ``(config, device) -> BatchedEnv`` that reads the
settings it needs from the run's :class:`~metagrad.rl.settings.RLConfig` (e.g. ``horizon``); a
new environment is one module with its class and factory, plus one line in :data:`ENVS` (or
none: ``env="package.module:factory"`` names a factory anywhere).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Protocol

import torch

from metagrad.registry import Registry
from metagrad.rl.envs import locomotion, navigation2d
from metagrad.rl.envs.base import BatchedEnv
from metagrad.rl.envs.gymnasium import GymnasiumTasks
from metagrad.rl.envs.locomotion import Locomotion
from metagrad.rl.envs.navigation2d import Navigation2D
from metagrad.rl.settings import RLConfig


class EnvFactory(Protocol):
    def __call__(self, config: RLConfig, device: torch.device) -> BatchedEnv:
        """The environment configured by ``config``, its tensors on ``device``."""
        ...


ENVS: Registry[EnvFactory] = Registry("RL environment", {
    "navigation2d": navigation2d.from_config,
    "halfcheetahvel": partial(locomotion.from_config, "half_cheetah", "vel"),
    "halfcheetahdir": partial(locomotion.from_config, "half_cheetah", "dir"),
    "antvel": partial(locomotion.from_config, "ant", "vel"),
    "antdir": partial(locomotion.from_config, "ant", "dir"),
})
"""Names are matched ignoring case, '-' and '_' (``HalfCheetahVel``, ``half-cheetah-vel``)."""


def canonical_env_name(name: str) -> str:
    """The registered spelling of ``name`` (an import path unchanged); ConfigError if unknown."""
    return ENVS.canonical(name)


def same_env(a: str, b: str) -> bool:
    """Whether two ``env`` settings name the same environment: registered names compared as
    :data:`ENVS` matches them, any other label (an import path, the name given to an env object)
    literally."""
    def key(name: str) -> str:
        return ENVS.canonical(name) if name in ENVS else name

    return key(a) == key(b)


def env_from_config(config: RLConfig, device: torch.device | str | None = None) -> BatchedEnv:
    """The environment ``config.env`` (a name in :data:`ENVS` or ``"package.module:factory"``)
    built by its factory from ``config``, its tensors on ``device`` (default CPU)."""
    return ENVS.get(config.env)(config, torch.device("cpu" if device is None else device))


def make_env(name: str, device: torch.device | str | None = None, **settings: Any) -> BatchedEnv:
    """The environment ``name`` with ``settings`` (:class:`~metagrad.rl.settings.RLConfig`
    fields, e.g. ``horizon``) and defaults for the rest."""
    return env_from_config(RLConfig(env=name, **settings), device)


__all__ = ["ENVS", "BatchedEnv", "EnvFactory", "GymnasiumTasks", "Locomotion", "Navigation2D",
           "canonical_env_name", "env_from_config", "make_env", "same_env"]
