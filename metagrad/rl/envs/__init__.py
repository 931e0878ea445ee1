"""Batched meta-RL environments by name: :func:`make_env`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from metagrad.errors import ConfigError
from metagrad.rl.envs.base import BatchedEnv
from metagrad.rl.envs.locomotion import Locomotion
from metagrad.rl.envs.navigation2d import Navigation2D

ENVS: dict[str, Callable[..., BatchedEnv]] = {
    "navigation2d": Navigation2D,
    "halfcheetahvel": partial(Locomotion, "half_cheetah", "vel"),
    "halfcheetahdir": partial(Locomotion, "half_cheetah", "dir"),
    "antvel": partial(Locomotion, "ant", "vel"),
    "antdir": partial(Locomotion, "ant", "dir"),
}
"""Names are matched ignoring case, '-' and '_' (``HalfCheetahVel``, ``half-cheetah-vel``)."""


def canonical_env_name(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in ENVS:
        raise ConfigError(
            f"unknown RL environment {name!r}; choose one of: navigation2d, HalfCheetahVel, "
            "HalfCheetahDir, AntVel, AntDir"
        )
    return key


def make_env(name: str, **kwargs: Any) -> BatchedEnv:
    """The environment ``name`` (see :data:`ENVS`); ``kwargs`` go to its constructor
    (e.g. ``horizon``)."""
    return ENVS[canonical_env_name(name)](**kwargs)


__all__ = ["ENVS", "BatchedEnv", "Locomotion", "Navigation2D", "canonical_env_name", "make_env"]
