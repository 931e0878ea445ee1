"""Shared fixtures of the task tests."""

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image


def _make_folder(root: Path, classes: int, items: int, size: int = 8, mode: str = "RGB") -> Path:
    """``root/class_c/item_i.png``: a uniform RGB image whose red value is ``20 c + i`` (with
    ``mode="mixed"``, odd items one pixel taller)."""
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(items):
            img = Image.new("RGB", (size, size + (i % 2) * (mode == "mixed")), (20 * c + i, 100, 200))
            img.save(root / f"class_{c}" / f"item_{i}.png")
    return root


@pytest.fixture
def make_folder() -> Callable[..., Path]:
    """Writes an image folder with one sub-folder per class (see :func:`_make_folder`)."""
    return _make_folder
