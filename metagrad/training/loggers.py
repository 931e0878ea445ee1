"""Where a run's metrics records go: ``metrics.jsonl`` always, plus the backends the ``log``
setting names (``csv``: ``metrics.csv``; ``tensorboard``: event files in ``tensorboard/``).

Every logger receives the same records (``{"iteration": ..., "seconds": ..., **metrics}``), one
per logged iteration, from the main process. Opened at iteration ``i`` (the checkpoint a run
resumes from, 0 for a new run), each first forgets what it recorded after ``i``, so that after
any kill and resume each logged iteration is recorded exactly once.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from metagrad.errors import ConfigError

BACKENDS = ("csv", "tensorboard")
"""The values the ``log`` setting accepts (``metrics.jsonl`` is always written)."""


class MetricsLogger(Protocol):
    """A destination of metrics records."""

    def write(self, record: dict[str, Any]) -> None:
        """Records ``record`` (it has an ``"iteration"``) durably enough to survive a kill of the
        process right after the call."""
        ...

    def close(self) -> None: ...


def require_backends(names: Iterable[str]) -> None:
    """Raises a :class:`~metagrad.errors.ConfigError` for a name not in :data:`BACKENDS`, or for
    ``tensorboard`` when the ``tensorboard`` package is not installed: checked before a run
    starts."""
    for name in names:
        if name not in BACKENDS:
            raise ConfigError(f"log: unknown backend {name!r}; valid: {', '.join(BACKENDS)} "
                              "(metrics.jsonl is always written)")
        if name == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise ConfigError("log=tensorboard needs the tensorboard package: "
                                  "pip install tensorboard (or pip install "
                                  "'metagrad[tensorboard]'), or remove tensorboard from --log"
                                  ) from None


class JsonlLogger:
    """``metrics.jsonl``: one JSON object per line (records of a resumed-from iteration and
    earlier kept, later ones and a line cut by a kill dropped)."""

    def __init__(self, path: Path, iteration: int) -> None:
        if path.is_file():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if isinstance(record, dict) and record.get("iteration", math.inf) <= iteration:
                    kept.append(line)
            _replace(path, "".join(k + "\n" for k in kept))
        self.file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class CsvLogger:
    """``metrics.csv``: a header row, then one row per record, for ``pandas.read_csv`` and
    spreadsheets. The columns are every key seen so far, in the order first seen; a record
    with a new key (e.g. the first validation) rewrites the file with the grown header, so the
    file is always rectangular, an empty cell meaning "not logged at this iteration"."""

    def __init__(self, path: Path, iteration: int) -> None:
        self.path = path
        columns, rows = self._read() if path.is_file() else ([], [])
        self.columns = columns
        self._rewrite([r for r in rows if _iteration(r) <= iteration])

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        text = self.path.read_text()
        if not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]  # a row cut by a kill
        reader = csv.DictReader(io.StringIO(text))
        rows = [r for r in reader if _iteration(r) < math.inf]
        return list(reader.fieldnames or []), rows

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, lineterminator="\n")
        if self.columns:
            writer.writeheader()
            writer.writerows(rows)
        _replace(self.path, text.getvalue())
        self.file = self.path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, self.columns, lineterminator="\n")

    def write(self, record: dict[str, Any]) -> None:
        new = [k for k in record if k not in self.columns]
        if new:
            self.file.close()
            _, rows = self._read()
            self.columns = self.columns + new
            self._rewrite(rows)
        self.writer.writerow(record)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardLogger:
    """Event files in ``tensorboard/``: every numeric value of a record but the iteration as a
    scalar at step ``iteration``. Steps after the resumed-from iteration are purged
    (``purge_step``) so that TensorBoard shows each step once."""

    def __init__(self, directory: Path, iteration: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory), purge_step=iteration + 1)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record["iteration"])
        for key, value in record.items():
            if key != "iteration" and isinstance(value, int | float):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_loggers(directory: Path, backends: Iterable[str], iteration: int
                 ) -> list[MetricsLogger]:
    """The JSONL logger and one per backend (duplicates ignored) for the run in ``directory``,
    each cut back to ``iteration`` (see the module doc)."""
    require_backends(backends)
    loggers: list[MetricsLogger] = [JsonlLogger(directory / "metrics.jsonl", iteration)]
    for name in dict.fromkeys(backends):
        if name == "csv":
            loggers.append(CsvLogger(directory / "metrics.csv", iteration))
        else:
            loggers.append(TensorBoardLogger(directory / "tensorboard", iteration))
    return loggers


def _iteration(row: dict[str, Any]) -> float:
    """The iteration of a CSV row; infinity for a row without a readable one (dropped)."""
    try:
        return int(row["iteration"])
    except (KeyError, TypeError, ValueError):
        return math.inf


def _replace(path: Path, text: str) -> None:
    """Writes ``path`` atomically (a kill leaves the old or the new file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
