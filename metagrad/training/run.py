"""The one training loop, for supervised meta-learning and meta-RL alike.

A :class:`Job` knows how to take one meta-iteration (:meth:`Job.step`), how to validate, and what
its state is; :class:`Run` drives any job inside a :class:`RunDirectory`: logging, validation,
the best-validated checkpoint, periodic checkpoints, SIGINT/SIGTERM, exact resume, progress
output. Every process of a ``torchrun`` job runs the loop; rank 0 alone writes files.

A run directory holds ``config.yaml`` (the resolved settings the run started with),
``history.jsonl`` (one line per start, resume or extension, with the command line when
given), ``metrics.jsonl`` (one JSON object per logged iteration, ``seconds`` cumulative over
resumes; also ``metrics.csv`` and ``tensorboard/`` when the ``log`` setting asks, see
:mod:`metagrad.training.loggers`),
``checkpoints/``, ``training_curve.png`` (drawn from ``metrics.jsonl`` whenever the loop ends
without an error) and, after evaluation, ``eval.json`` and figures.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from tqdm import tqdm

from metagrad.config import RunSettings
from metagrad.distributed import Distributed
from metagrad.errors import CheckpointError, ConfigError, TrainingDivergedError
from metagrad.training import checkpoint as ckpt
from metagrad.training.loggers import open_loggers

VAL_SEED_OFFSET = 1_000_003
TEST_SEED_OFFSET = 2_000_029


def check_directory(path: Path, flag: str = "--out") -> None:
    """A :class:`~metagrad.errors.ConfigError` naming ``flag`` when ``path`` cannot be a
    directory: it is a file, or lies below one."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file; choose a directory")
    below = next((p for p in path.parents if p.exists() or p.is_symlink()), None)
    if below is not None and not below.is_dir():
        raise ConfigError(f"{flag} {path} lies below the file {below}; choose a directory")


class RunDirectory:
    """The files of one run (see the module doc). Only the main process writes."""

    def __init__(self, path: str | Path, keep_checkpoints: int = 3) -> None:
        self.path = Path(path)
        self.checkpoints = ckpt.CheckpointDir(self.path / "checkpoints", keep=keep_checkpoints)
        self.created: list[Path] = []  # the directories prepare() made, deepest first

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def holds_run(self) -> bool:
        return self.checkpoints.latest() is not None

    def prepare(self) -> None:
        """Creates the directory, or explains why it cannot be one."""
        check_directory(self.path)
        try:
            self.created = [p for p in (self.path, *self.path.parents) if not p.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write the run directory {self.path} "
                              f"({exc.strerror or exc}); choose another --out") from None

    def discard_if_unused(self, leftovers: tuple[str, ...] = (".lock",)) -> None:
        """Removes the directory (and the parents :meth:`prepare` made for it) when ``prepare``
        created it and a run never started in it (it holds nothing but ``leftovers``), so a
        refused start leaves no empty run behind."""
        if not self.created or not self.path.is_dir():
            return
        entries = list(self.path.iterdir())
        if not all(p.name in leftovers and p.is_file() for p in entries):
            return
        for p in entries:
            p.unlink()
        for directory in self.created:
            try:
                directory.rmdir()  # fails, and stops, at a parent something else now uses
            except OSError:
                return

    def read_config(self) -> dict[str, Any]:
        """The settings in ``config.yaml``, or a clear error when absent or damaged."""
        if not self.config_path.is_file():
            raise ConfigError(f"{self.path} is not a run directory (no config.yaml); pass the "
                              "directory given to `metagrad train --out`")
        from metagrad.config import load_yaml

        try:
            return load_yaml(self.config_path)
        except ConfigError as exc:
            raise ConfigError(f"{exc}; the run's config.yaml is damaged: restore it (it is "
                              "also stored in every checkpoint)") from None

    def write_config(self, values: dict[str, Any]) -> None:
        tmp = self.config_path.with_name(f".config.yaml.tmp-{os.getpid()}")
        tmp.write_text(yaml.safe_dump(values, sort_keys=False))
        os.replace(tmp, self.config_path)

    def record_history(self, event: str, **details: Any) -> None:
        """Appends ``{"event": ..., "time": ..., "host": ..., **details}`` to history.jsonl."""
        record = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "host": socket.gethostname(), "pid": os.getpid(), **details}
        with (self.path / "history.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")


class Job(Protocol):
    """One kind of training, as the loop sees it."""

    settings: RunSettings
    description: str
    validation_key: str
    """The metrics key of the validation value (e.g. ``val/accuracy``)."""
    higher_is_better: bool
    dist: Distributed
    artifacts: dict[str, Any]
    """JSON-able records saved in the run directory when the run starts (e.g. a data split)."""

    def step(self, iteration: int, progress: float) -> dict[str, float]:
        """Meta-iteration ``iteration`` (1-based); its metrics. ``progress`` in [0, 1]: the
        share of the run done before it (:meth:`Run.fraction_done`), what a schedule follows.
        Raises :class:`~metagrad.errors.TrainingDivergedError` (via :func:`diverged`) on
        non-finite values."""
        ...

    def validate(self) -> float:
        """The validation value (main process only)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the loop's counters needed to continue bit-identically."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def initialise_from(self, state: dict[str, Any]) -> None:
        """The learners' weights from another run's checkpoint ``state`` (the ``init_from``
        setting, via :func:`initialise_learners`); everything else stays as constructed."""
        ...

    def synchronised_parameters(self) -> torch.Tensor:
        """The trained parameters, flat: checked identical on every process before a save."""
        ...


def initialise_learners(learners: dict[str, Any], state: dict[str, Any],
                        load: Callable[[Any, Any], None]) -> None:
    """``load(learner, saved)`` for each of ``learners`` with its saved state in a checkpoint's
    ``state``; a :class:`CheckpointError` saying what does not fit when a learner is missing or
    its state does not load."""
    saved = state.get("learners")
    if not isinstance(saved, dict):
        raise CheckpointError("the checkpoint holds no learners")
    for name, learner in learners.items():
        if name not in saved:
            raise CheckpointError(
                f"the checkpoint holds no {name!r} learner (it has {', '.join(sorted(saved))}); "
                "start from a run of the same algorithm, or train without the pretrained "
                "baseline (baseline: false)")
        try:
            load(learner, saved[name])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"the checkpoint's {name!r} learner does not fit this run's "
                                  f"model and algorithm ({first})") from None


def diverged(what: str, iteration: int, directory: Path, advice: str = "") -> TrainingDivergedError:
    """The error a job raises when training stops making sense: what, where, which checkpoint
    survives, what to change."""
    latest = ckpt.CheckpointDir(directory).latest()
    kept = (f"the last good checkpoint is {latest}" if latest is not None
            else "no checkpoint had been written yet")
    return TrainingDivergedError(f"{what} at iteration {iteration}; {kept}."
                                 + (f" {advice}" if advice else ""))


@contextmanager
def stop_on_signals(run: Run) -> Iterator[None]:
    """SIGINT/SIGTERM set ``run.stop_signal``; the loop then finishes the current iteration,
    writes a checkpoint and returns cleanly. (Only in the main thread, where Python allows
    handlers.)"""

    def handler(signum: int, _frame: Any) -> None:
        run.stop_signal = signum

    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Progress:
    """A tqdm bar on a terminal; elsewhere one plain line (iteration, metrics, it/s, ETA) every
    ``interval`` seconds; nothing when disabled. ``time_left`` (a time limit): the seconds it
    leaves, which caps the ETA, and the bar's total becomes the iterations expected in them."""

    def __init__(self, total: int, initial: int, description: str, enabled: bool,
                 interval: float | None = None,
                 time_left: Callable[[], float] | None = None) -> None:
        self.total, self.count = total, initial
        self.time_left = time_left
        self.description = description
        self.started, self.start_count = time.perf_counter(), initial
        self.bar = None
        self.interval = interval
        self.enabled = enabled
        if enabled and interval is None and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc=description)
        elif interval is None:
            self.interval = 10.0
        self.last_line = self.started
        self.postfix: dict[str, float] = {}

    def update(self, metrics: dict[str, float]) -> None:
        self.count += 1
        shown = {k: v for k, v in metrics.items() if not k.endswith("seconds")}
        self.postfix.update(shown)
        if self.bar is not None:
            if self.time_left is not None:
                self.bar.total = min(self.total, self.count + int(
                    self._rate(time.perf_counter()) * max(self.time_left(), 0.0)) + 1)
            self.bar.update(1)
            if shown:
                self.bar.set_postfix({k.split("/")[-1] if k.startswith(("loss/", "val/"))
                                      else k: _readable(k, v) for k, v in self.postfix.items()})
            return
        now = time.perf_counter()
        if self.enabled and (now - self.last_line >= self.interval or self.count == self.total):
            self.last_line = now
            rate = self._rate(now)
            eta = (self.total - self.count) / rate if rate > 0 else math.inf
            if self.time_left is not None:
                eta = min(eta, max(self.time_left(), 0.0))
            values = "  ".join(f"{k} {_readable(k, v)}" for k, v in self.postfix.items())
            print(f"{self.description} {self.count}/{self.total}  {values}  {rate:.2f} it/s  "
                  f"ETA {_duration(eta)}", flush=True)

    def _rate(self, now: float) -> float:
        """Iterations per second since this bar started."""
        return (self.count - self.start_count) / max(now - self.started, 1e-9)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _readable(key: str, value: float) -> str:
    """Accuracy in percent, everything else to 4 significant digits."""
    if "accuracy" in key:
        return f"{100 * value:.2f}%"
    return f"{value:.4g}"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Run:
    """Drives a :class:`Job` in a :class:`RunDirectory`."""

    def __init__(self, job: Job, directory: RunDirectory, config: dict[str, Any]) -> None:
        self.job = job
        self.directory = directory
        self.config = config
        self.iteration = 0
        self.best: float | None = None
        self.seconds = 0.0
        self.stop_signal: int | None = None
        self.stopped = False

    @property
    def main(self) -> bool:
        return self.job.dist.is_main

    def state(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "best": self.best,
                "best_metric": self.job.validation_key, "seconds": self.seconds,
                "config": self.config, **self.job.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        try:
            self.job.load_state_dict(state)
            self.iteration = int(state["iteration"])
            # a best value of another metric (runs saved before validation existed) is void
            same = state.get("best_metric", self.job.validation_key) == self.job.validation_key
            self.best = state["best"] if same else None
            self.seconds = float(state.get("seconds", 0.0))
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"the checkpoint does not match this run's configuration ({exc})") from None

    def resume(self) -> None:
        state = self.directory.checkpoints.latest_state()
        if state is None:
            raise CheckpointError(f"nothing to resume: {self.directory.checkpoints.directory} "
                                  "holds no checkpoint")
        self.load_state(state)

    def _is_better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.job.higher_is_better else value < self.best

    def save(self, best: bool = False) -> None:
        """A checkpoint by the main process, once every process holds the same parameters."""
        if not self.job.dist.in_sync(self.job.synchronised_parameters()):
            raise diverged("the processes' parameters differ", self.iteration,
                           self.directory.checkpoints.directory)
        if self.main:
            self.directory.checkpoints.save(self.state(), self.iteration, best=best)

    @property
    def budget(self) -> float | None:
        """The training time allowed, in seconds (``settings.minutes``); ``None``: no limit."""
        minutes = self.job.settings.minutes
        return None if minutes is None else minutes * 60

    def fraction_done(self) -> float:
        """The share of the run done: iterations done over ``settings.iterations`` or, with a
        time limit, the training time spent over it when that is larger (capped at 1)."""
        done = self.iteration / self.job.settings.iterations
        budget = self.budget
        return done if budget is None else max(done, min(1.0, self.seconds / budget))

    def finished(self) -> bool:
        """All iterations done, or the time limit reached."""
        budget = self.budget
        return self.iteration >= self.job.settings.iterations or (
            budget is not None and self.seconds >= budget)

    def train(self, progress: bool = True, interval: float | None = None) -> None:
        """Iterates until ``settings.iterations``, the time limit ``settings.minutes`` or a
        signal; the last iteration is validated and saved. The main process then draws
        ``training_curve.png``.

        With a time limit the processes agree on the time spent (the largest any of them
        measured), so that they stop after the same iteration and schedule alike; the run's
        course then depends on measured times, and a resumed run continues from the training
        time its checkpoint recorded, not bit-identically to an uninterrupted one."""
        s = self.job.settings
        started = time.perf_counter() - self.seconds
        budget = self.budget
        bar = Progress(s.iterations, self.iteration, self.job.description,
                       progress and self.main, interval,
                       None if budget is None else lambda: budget - (time.perf_counter() - started))
        loggers = open_loggers(self.directory.path, s.log, self.iteration) if self.main else []
        try:
            with stop_on_signals(self):
                while not self.finished():
                    record = self.job.step(self.iteration + 1, self.fraction_done())
                    self.iteration += 1
                    self.seconds = time.perf_counter() - started
                    if budget is not None:
                        self.seconds = self.job.dist.maximum(self.seconds)
                    last = self.finished()
                    validated = self.iteration % s.val_every == 0 or last
                    best = False
                    if validated and self.main:
                        value = self.job.validate()
                        record[self.job.validation_key] = value
                        best = self._is_better(value)
                        if best:
                            self.best = value
                    if self.iteration % s.log_every == 0 or validated:
                        line = {"iteration": self.iteration, "seconds": round(self.seconds, 3),
                                **record}
                        for logger in loggers:
                            logger.write(line)
                    bar.update(record)
                    saved = validated or self.iteration % s.checkpoint_every == 0
                    if saved:
                        self.save(best=best)
                    if self.job.dist.any(self.stop_signal is not None):
                        if not saved:
                            self.save()
                        bar.write(f"stopped by a signal at iteration {self.iteration}; "
                                  "continue with --resume")
                        self.stopped = True
                        break
        finally:
            bar.close()
            for logger in loggers:
                logger.close()
        if self.main:
            from metagrad.training.plots import plot_training_curve

            plot_training_curve(self.directory.metrics_path,
                                self.directory.path / "training_curve.png")
