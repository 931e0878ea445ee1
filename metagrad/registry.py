"""Name → object registries for algorithms, tasks and RL environments.

An entry is registered under a short name, either as the object itself or as an import path
``"package.module:Name"`` resolved on first use (so that registering costs no import). Any name
that contains ``":"`` is read as such an import path, which is how a user's own algorithm, task or
environment is reached from the command line (``--algo mypackage.learners:MyLearner``).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from metagrad.errors import ConfigError

T = TypeVar("T")


def import_object(path: str, kind: str = "object") -> Any:
    """The object named by ``"package.module:attribute"`` (attribute may be dotted)."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{kind} {path!r}: expected 'package.module:Name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{kind} {path!r}: cannot import module {module_name!r} ({exc}); is it "
                          "installed or on PYTHONPATH?") from None
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{kind} {path!r}: module {module_name!r} has no attribute "
                              f"{attribute!r}") from None
    return obj


class Registry(Generic[T]):
    """Short names (matched ignoring case, '-' and '_') for objects of one kind."""

    def __init__(self, kind: str, entries: dict[str, T | str] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}
        self._names: dict[str, str] = {}
        for name, target in (entries or {}).items():
            self.register(name, target)

    @staticmethod
    def _key(name: str) -> str:
        return name.lower().replace("-", "").replace("_", "")

    def register(self, name: str, target: T | str) -> None:
        """Adds ``target`` (an object or ``"package.module:Name"``) under ``name``."""
        if ":" in name:
            raise ConfigError(f"{self.kind} names cannot contain ':' ({name!r})")
        self._entries[name] = target
        self._names[self._key(name)] = name

    def canonical(self, name: str) -> str:
        """The registered spelling of ``name``, or ``name`` itself for an import path."""
        if ":" in name:
            return name
        key = self._key(str(name))
        if key not in self._names:
            close = difflib.get_close_matches(str(name), list(self._entries), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}.{hint} Valid: "
                              f"{', '.join(self._entries)}, or your own as "
                              "'package.module:Name'")
        return self._names[key]

    def get(self, name: str) -> T:
        """The object registered as ``name``, or the one that ``name`` imports."""
        name = self.canonical(name)
        if ":" in name:
            return import_object(name, self.kind)
        target = self._entries[name]
        if isinstance(target, str):
            target = import_object(target, self.kind)
            self._entries[name] = target
        return target  # type: ignore[return-value]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
