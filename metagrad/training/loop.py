"""The meta-training loop: sample a batch of tasks, accumulate each learner's meta-gradient, step
its optimizer; log, validate, checkpoint; resume exactly where a run stopped.

A run directory holds ``config.yaml`` (resolved settings), ``metrics.jsonl`` (one JSON object
per logged iteration), ``checkpoints/`` and, after evaluation, ``eval.json`` and figures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from tqdm import tqdm

from metagrad.config import ExperimentConfig, from_dict
from metagrad.distributed import Distributed
from metagrad.errors import CheckpointError, ConfigError, TrainingDivergedError
from metagrad.training import checkpoint as ckpt
from metagrad.training.evaluation import mean_ci95, per_step_metrics
from metagrad.training.experiment import Experiment, build

VAL_SEED_OFFSET = 1_000_003
TEST_SEED_OFFSET = 2_000_029


def write_config(cfg: ExperimentConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def read_config(run_dir: Path) -> ExperimentConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml); pass the directory "
                          "given to `metagrad train --out`")
    return from_dict(yaml.safe_load(path.read_text()))


class Trainer:
    """Trains every learner of an :class:`Experiment` on the same task batches."""

    def __init__(self, exp: Experiment, run_dir: Path) -> None:
        cfg = exp.config
        self.exp = exp
        self.run_dir = run_dir
        optimizer = torch.optim.Adam if cfg.meta_optimizer == "adam" else torch.optim.SGD
        self.optimizers = {name: optimizer(learner.parameters(), lr=cfg.meta_lr)
                           for name, learner in exp.learners.items()}
        # MAML++'s cosine annealing of the meta learning rate (Antoniou et al. 2019, §4)
        self.schedulers = {
            name: torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iterations, cfg.min_meta_lr)
            for name, opt in self.optimizers.items() if cfg.meta_lr_schedule == "cosine"
        }
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.iteration = 0
        self.best: float | None = None
        self.checkpoints = ckpt.CheckpointDir(run_dir / "checkpoints", keep=cfg.keep_checkpoints)
        self._stop_signal: int | None = None
        self.stopped = False
        self.dist = Distributed.from_environment()

    # -- state --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "best": self.best,
            "config": self.exp.config.to_dict(),
            "learners": {n: learner.state_dict() for n, learner in self.exp.learners.items()},
            "optimizers": {n: opt.state_dict() for n, opt in self.optimizers.items()},
            "schedulers": {n: sched.state_dict() for n, sched in self.schedulers.items()},
            "rng": ckpt.rng_state(self.generator),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        try:
            for name, learner in self.exp.learners.items():
                learner.load_state_dict(state["learners"][name])
                self.optimizers[name].load_state_dict(state["optimizers"][name])
                if name in self.schedulers:
                    self.schedulers[name].load_state_dict(state["schedulers"][name])
            ckpt.restore_rng_state(state["rng"], self.generator)
            self.iteration = int(state["iteration"])
            self.best = state["best"]
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(
                f"the checkpoint does not match this run's configuration ({exc})"
            ) from None

    def resume(self) -> bool:
        state = self.checkpoints.latest_state()
        if state is not None:
            self.load_state(state)
        return state is not None

    # -- loop ---------------------------------------------------------------------------------
    def validate(self) -> float:
        cfg = self.exp.config
        gen = torch.Generator().manual_seed(cfg.seed + VAL_SEED_OFFSET)
        curves = per_step_metrics(self.exp.learner, self.exp.tasks_for("val", cfg.shots),
                                  cfg.val_tasks, cfg.inner_steps, self.exp.metric, gen)
        return mean_ci95(curves[:, -1])[0]

    def _is_better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best if self.exp.metric == "mse" else value > self.best

    def train(self, progress: bool = True) -> None:
        cfg = self.exp.config
        main = self.dist.is_main
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not (progress and main),
                   dynamic_ncols=True, desc=f"{cfg.task}/{cfg.algo}")
        started = time.perf_counter()
        log = (self.run_dir / "metrics.jsonl").open("a") if main else None
        with stop_on_signals(self), bar:
            while self.iteration < cfg.iterations:
                batch = self.exp.train_tasks.sample(cfg.meta_batch, self.generator)
                mine = self.dist.shard(batch)
                for opt in self.optimizers.values():
                    opt.zero_grad(set_to_none=True)
                local = [learner.meta_gradient(mine) for learner in self.exp.learners.values()]
                # one all-reduce: gradients, losses, and whether any rank was asked to stop
                reduced = self.dist.all_reduce(
                    self.exp.learners.values(), self.dist.share(batch),
                    torch.stack([*local, torch.tensor(float(self._stop_signal is not None))]))
                losses = dict(zip(self.exp.learners, reduced[:-1].tolist(), strict=True))
                for name, value in losses.items():
                    if not math.isfinite(value):
                        raise diverged(f"the {name} loss became {value}", self.iteration + 1,
                                       self.checkpoints.directory, "Lower meta_lr or inner_lr.")
                for name, opt in self.optimizers.items():
                    opt.step()
                    if name in self.schedulers:
                        self.schedulers[name].step()
                self.iteration += 1
                bar.update(1)
                if main:
                    self._log_validate_checkpoint(losses, log, bar, started)
                if reduced[-1] > 0:
                    if main:
                        self.checkpoints.save(self.state(), self.iteration)
                        bar.write(f"stopped by a signal at iteration {self.iteration}; "
                                  "continue with --resume")
                    self.stopped = True
                    break
        if log is not None:
            log.close()

    def _log_validate_checkpoint(self, losses: dict[str, float], log: Any, bar: tqdm,
                                 started: float) -> None:
        cfg = self.exp.config
        record: dict[str, Any] = {}
        last = self.iteration == cfg.iterations
        if self.iteration % cfg.log_every == 0 or last:
            record.update({f"loss/{n}": v for n, v in losses.items()})
        if self.iteration % cfg.val_every == 0 or last:
            value = self.validate()
            record[f"val/{self.exp.metric}"] = value
            best = self._is_better(value)
            if best:
                self.best = value
            self.checkpoints.save(self.state(), self.iteration, best=best)
        elif self.iteration % cfg.checkpoint_every == 0:
            self.checkpoints.save(self.state(), self.iteration)
        if record:
            record = {"iteration": self.iteration,
                      "seconds": round(time.perf_counter() - started, 3), **record}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix({k.split("/")[-1]: round(v, 4) for k, v in record.items() if "/" in k})


def diverged(what: str, iteration: int, directory: Path, advice: str = "") -> TrainingDivergedError:
    """The error both trainers raise when training stops making sense: what happened, where,
    where the last good checkpoint is, and what to change."""
    return TrainingDivergedError(
        f"{what} at iteration {iteration}; the last good checkpoint is kept in {directory}."
        + (f" {advice}" if advice else ""))


class Stoppable(Protocol):
    """A training loop that checks ``_stop_signal`` after every iteration."""

    _stop_signal: int | None


@contextmanager
def stop_on_signals(trainer: Stoppable) -> Iterator[None]:
    """SIGINT/SIGTERM set ``trainer._stop_signal``; the loop then finishes the current iteration,
    writes a checkpoint and returns cleanly."""

    def handler(signum: int, _frame: Any) -> None:
        trainer._stop_signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train(cfg: ExperimentConfig | None, run_dir: str | Path, resume: bool = False,
          progress: bool = True, iterations: int | None = None,
          threads: int | None = None) -> Trainer:
    """Trains the experiment ``cfg`` in ``run_dir``; or, with ``resume``, continues the run saved
    there with the settings it started with (``iterations`` may extend it, ``threads`` change)."""
    run_dir = Path(run_dir)
    checkpoints = run_dir / "checkpoints"
    if resume:
        cfg = read_config(run_dir)
        changes = {k: v for k, v in (("iterations", iterations), ("threads", threads)) if v}
        cfg = dataclasses.replace(cfg, **changes).validate()
    elif checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or "
                          "choose another --out")
    assert cfg is not None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(build(cfg), run_dir)
    if trainer.dist.is_main:
        write_config(cfg, run_dir)
        for name, record in trainer.exp.artifacts.items():
            (run_dir / name).write_text(json.dumps(record))
    if resume and not trainer.resume():
        raise CheckpointError(f"nothing to resume: {checkpoints} holds no checkpoint")
    trainer.train(progress=progress)
    trainer.dist.barrier()
    return trainer
