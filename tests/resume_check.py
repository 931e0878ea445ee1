"""Shared check for learners whose state resumes training exactly (used by the RL tests)."""

from collections.abc import Callable
from typing import Any

import torch


def assert_resumes_exactly(make: Callable[[], Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A learner from ``make()`` takes a meta-step, saves its ``state_dict`` and takes another;
    a fresh ``make()`` loaded with that state takes the same second step: the statistics
    ``keys`` and every parameter of ``policy`` are equal bit for bit. Returns the state."""
    one = make()
    one.meta_step()
    state = one.state_dict()
    expected = one.meta_step()
    two = make()
    two.load_state_dict(state)
    got = two.meta_step()
    for key in keys:
        assert got[key] == expected[key], key
    for a, b in zip(one.policy.parameters(), two.policy.parameters(), strict=True):
        assert torch.equal(a, b)
    return state
