"""``train``: start or resume any run (supervised or meta-RL) in a run directory.

The loop itself is :class:`metagrad.training.run.Run`; this module picks the job for the
configuration, guards the directory (one training at a time, no overwriting), and records starts
and extensions in the run's history.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from metagrad.config import ExperimentConfig, from_dict
from metagrad.distributed import Distributed, resolve_device
from metagrad.errors import CheckpointError, ConfigError, MetagradError
from metagrad.rl.settings import RLConfig
from metagrad.training import checkpoint as ckpt
from metagrad.training.lock import RunLock
from metagrad.training.loggers import require_backends
from metagrad.training.run import Run, RunDirectory

Config = ExperimentConfig | RLConfig


def config_from_values(values: dict[str, Any], *, stored: bool = False) -> Config:
    """A supervised or meta-RL configuration from flat settings (an ``env`` means meta-RL)."""
    if "env" in values:
        from metagrad.training.rl import rl_config_from_dict

        return rl_config_from_dict(values)
    return from_dict(values, stored=stored)


def read_config(run_dir: str | Path) -> Config:
    """The configuration a run directory was started with."""
    return config_from_values(RunDirectory(run_dir).read_config(), stored=True)


def make_job(config: Config, directory: RunDirectory, dist: Distributed,
             device: torch.device) -> Any:
    if isinstance(config, RLConfig):
        from metagrad.training.rl import RLJob

        return RLJob(config, directory, dist, device)
    from metagrad.training.experiment import build
    from metagrad.training.supervised import SupervisedJob

    return SupervisedJob(build(config, device), directory, dist)


def train(config: Config | None, run_dir: str | Path, resume: bool = False,
          progress: bool = True, iterations: int | None = None, minutes: float | None = None,
          threads: int | None = None, log_interval: float | None = None,
          command: str | None = None) -> Run:
    """Trains ``config`` in ``run_dir``; or, with ``resume``, continues the run saved there with
    the settings it started with (``iterations`` and ``minutes`` may extend it, ``threads``
    change). A resumed run continues bit-identically to one never interrupted (unless it has a
    time limit: see :meth:`Run.train`). A new run whose ``init_from`` names
    a checkpoint (or a run directory) starts its learners' weights from it. ``progress``: a bar
    on a terminal, else a plain line every ``log_interval`` seconds (default 10). ``command``
    (e.g. the command line) is recorded with the start or resume in ``history.jsonl``."""
    directory = RunDirectory(run_dir)
    if resume:
        stored = config_from_values(directory.read_config(), stored=True)
        latest = directory.checkpoints.latest_state()
        if latest is not None and isinstance(latest.get("config"), dict):
            # the length the run had when it stopped (it may have been extended before)
            stored = dataclasses.replace(stored, iterations=int(latest["config"]["iterations"]),
                                         minutes=latest["config"].get("minutes"))
        changes = {k: v for k, v in (("iterations", iterations), ("minutes", minutes),
                                     ("threads", threads)) if v is not None}
        previous = stored.iterations
        previous_minutes = stored.minutes
        config = dataclasses.replace(stored, **changes)
        config = config.validate() if isinstance(config, ExperimentConfig) else config
    elif config is None:
        raise ConfigError("train needs a config unless it resumes a run")
    assert config is not None
    start = ckpt.read_start(config.init_from) if config.init_from and not resume else None
    require_backends(config.log)
    directory = RunDirectory(run_dir, keep_checkpoints=config.keep_checkpoints)
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    dist = Distributed.from_environment(device)
    lock = RunLock(directory.path, enabled=dist.is_main)
    refusal: MetagradError | None = None
    if dist.is_main:  # checks under the lock; every process learns whether they passed
        try:
            directory.prepare()
            lock.acquire()
            ckpt.clean_temporary_files(directory.checkpoints.directory)
            if not resume and directory.holds_run():
                raise ConfigError(f"{directory.path} already holds a run; pass --resume to "
                                  "continue it or choose another --out")
        except MetagradError as exc:
            refusal = exc
    if dist.any(refusal is not None):
        lock.release()
        if dist.is_main:
            directory.discard_if_unused()
        raise refusal or ConfigError("the main process refused to start the run (its message "
                                     "says why)")
    try:
        torch.manual_seed(config.seed)
        job = make_job(config, directory, dist, device)
        run = Run(job, directory, config.to_dict())
        if resume:
            run.resume()
        elif start is not None:
            try:
                job.initialise_from(start[1])
            except CheckpointError as exc:
                raise CheckpointError(f"init_from {start[0]}: {exc}") from None
        if dist.is_main:
            said = {"command": command} if command else {}
            if resume:
                directory.record_history("resume", iteration=run.iteration,
                                         iterations=config.iterations,
                                         **({"extended_from": previous}
                                            if config.iterations != previous else {}),
                                         **({"minutes": config.minutes,
                                             "minutes_before": previous_minutes}
                                            if config.minutes != previous_minutes else {}),
                                         **said)
            else:
                directory.write_config(config.to_dict())
                for name, record in job.artifacts.items():
                    (directory.path / name).write_text(json.dumps(record))
                directory.record_history("start", iterations=config.iterations, **(
                    {"minutes": config.minutes} if config.minutes is not None else {}), **(
                    {"init_from": str(start[0]), "init_iteration": start[1].get("iteration")}
                    if start is not None else {}), **said)
        run.train(progress=progress, interval=log_interval)
        dist.barrier()
        # leave the process group while every rank is alive: gloo's worker threads, left to the
        # interpreter's teardown, may abort the process ("terminate called without an active
        # exception") after a successful run; not on failure, where it could wait for a dead peer
        dist.close()
    finally:
        lock.release()
        if dist.is_main and not resume and not directory.config_path.exists():
            directory.discard_if_unused()  # the run failed to start: leave no empty directory
    return run
