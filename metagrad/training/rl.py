"""Meta-RL runs: train MAML-RL (and the "pretrained" baseline) into a run directory, resume it,
evaluate it on held-out tasks — the same conventions as the supervised loop
(:mod:`metagrad.training.loop`): ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``,
``eval.json`` and figures.

In ``eval.json`` a row's ``shots`` is the number of rollouts per task and adaptation step (the
RL counterpart of K examples per class) and ``metric`` is ``"return"`` (undiscounted, per episode,
averaged over the rollouts of a task).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO, get_type_hints

import torch
import yaml
from tqdm import tqdm

from metagrad.distributed import Distributed
from metagrad.errors import CheckpointError, ConfigError
from metagrad.rl.envs import canonical_env_name
from metagrad.rl.maml_rl import MAMLRL, RLConfig
from metagrad.training import checkpoint as ckpt
from metagrad.training.evaluation import EvalRow, rows_from_curves
from metagrad.training.loop import (
    TEST_SEED_OFFSET,
    VAL_SEED_OFFSET,
    diverged,
    stop_on_signals,
)
from metagrad.training.plots import plot_metric_vs_steps
from metagrad.training.report import format_table
from metagrad.training.rl_plots import plot_navigation_trajectories

RL_FIELDS: dict[str, Any] = get_type_hints(RLConfig)
"""Every RL setting and its type (for command-line flags; values are read by
:meth:`RLConfig.coerce`)."""

_LOCOMOTION = dict(meta_batch=40, rollouts=20, horizon=200, inner_lr=0.1, iterations=500)
ENV_DEFAULTS: dict[str, dict[str, Any]] = {
    "navigation2d": dict(meta_batch=20, rollouts=20, horizon=100, inner_lr=0.1, iterations=500,
                         val_tasks=40),
    **{name: _LOCOMOTION for name in ("halfcheetahvel", "halfcheetahdir", "antvel", "antdir")},
}
"""The paper's settings (Finn et al. 2017, §5.3 and App. A.2): 20 rollouts per task; meta-batch
20 (navigation, H = 100) or 40 (locomotion, H = 200); α = 0.1 in every RL experiment (0.05 after
the first step at evaluation); up to 500 meta-iterations. Navigation validates on 40 tasks
(a fraction of a second), locomotion on the default 20. The authors' code agrees for the
locomotion tasks (``fast_lr`` 0.1, 20 rollouts, H 200, meta-batch 40) but its navigation script
uses α = 0.5 and meta-batch 40; the paper's values are used here."""

METHOD_NAMES = {"maml": "maml", "pretrain": "pretrained"}
"""Names of the trained policies in checkpoints, metrics and ``eval.json``."""


def resolve_rl(settings: dict[str, Any]) -> RLConfig:
    """The config for ``settings["env"]`` (default navigation2d): the environment's paper settings
    (:data:`ENV_DEFAULTS`), then ``settings`` (strings are read as the fields' types)."""
    values = {k: RLConfig.coerce(k, v) for k, v in settings.items()}
    env = canonical_env_name(values.setdefault("env", "navigation2d"))
    return RLConfig(**{**ENV_DEFAULTS[env], **values})


def write_rl_config(cfg: RLConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def is_rl_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a meta-RL run (its ``config.yaml`` names an ``env``)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return False
    data = yaml.safe_load(path.read_text())
    return isinstance(data, dict) and "env" in data


def read_rl_config(run_dir: Path) -> RLConfig:
    if not is_rl_run(run_dir):
        raise ConfigError(f"{run_dir} is not a meta-RL run directory (no config.yaml with an "
                          "env); pass the directory given to `metagrad train rl --out`")
    return RLConfig.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))


def make_learners(cfg: RLConfig, distributed: Distributed | None = None) -> dict[str, MAMLRL]:
    """The configured method and, with ``baseline`` (and method maml), the pretrained policy."""
    learners = {METHOD_NAMES[cfg.method]: MAMLRL(cfg, distributed=distributed)}
    if cfg.baseline and cfg.method == "maml":
        learners["pretrained"] = MAMLRL(dataclasses.replace(cfg, method="pretrain"),
                                        distributed=distributed)
    return learners


@contextmanager
def _mismatch_is_checkpoint_error() -> Iterator[None]:
    try:
        yield
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"the checkpoint does not match this run's configuration ({exc})"
        ) from None


def load_learners(learners: dict[str, MAMLRL], state: dict[str, Any]) -> None:
    """Each learner's weights and sampling state from a checkpoint's ``state``."""
    with _mismatch_is_checkpoint_error():
        for name, learner in learners.items():
            learner.load_state_dict(state["learners"][name])


class RLTrainer:
    """Meta-trains every learner on the same task batches (drawn by the first learner's
    generator, so MAML's run does not depend on whether the baseline is trained).

    Under ``torchrun`` every process trains its share of each task batch
    (:meth:`MAMLRL.meta_step`); rank 0 alone logs and writes checkpoints, after checking that
    every process holds the same parameters."""

    def __init__(self, cfg: RLConfig, run_dir: Path) -> None:
        self.config = cfg
        self.run_dir = run_dir
        self.dist = Distributed.from_environment()
        self.learners = make_learners(cfg, self.dist)
        self.iteration = 0
        self.best: float | None = None
        """Best validation return (:meth:`validate`) of the first learner."""
        self.checkpoints = ckpt.CheckpointDir(run_dir / "checkpoints", keep=cfg.keep_checkpoints)
        self._stop_signal: int | None = None
        self.stopped = False

    def state(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "best": self.best,
            "best_metric": "validation_return",
            "config": self.config.to_dict(),
            "learners": {n: learner.state_dict() for n, learner in self.learners.items()},
            "rng": ckpt.rng_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        load_learners(self.learners, state)
        with _mismatch_is_checkpoint_error():
            ckpt.restore_rng_state(state["rng"])
            self.iteration = int(state["iteration"])
            # runs saved before validation existed kept the best training return: start afresh
            validated = state.get("best_metric") == "validation_return"
            self.best = state["best"] if validated else None

    def resume(self) -> bool:
        state = self.checkpoints.latest_state()
        if state is not None:
            self.load_state(state)
        return state is not None

    def step(self) -> dict[str, float]:
        """One meta-iteration of every learner: ``{"<learner>/<metric>": value}``."""
        first, *_ = self.learners.values()
        tasks = first.sample_tasks()
        record = {}
        for name, learner in self.learners.items():
            metrics = learner.meta_step(tasks)
            metrics.pop("iteration")
            for key, value in metrics.items():
                if not math.isfinite(value):
                    raise diverged(f"{name}'s {key} became {value}", self.iteration + 1,
                                   self.checkpoints.directory, "Lower max_kl or inner_lr.")
                record[f"{name}/{key}"] = value
        self.iteration += 1
        return record

    def validate(self) -> float:
        """:func:`validation_return` of the first learner."""
        return validation_return(next(iter(self.learners.values())))

    def train(self, progress: bool = True) -> None:
        cfg = self.config
        main = self.dist.is_main
        bar = tqdm(total=cfg.iterations, initial=self.iteration, disable=not (progress and main),
                   dynamic_ncols=True, desc=f"{cfg.env}/{cfg.method}")
        started = time.perf_counter()
        log = (self.run_dir / "metrics.jsonl").open("a") if main else None
        with stop_on_signals(self), bar:
            while self.iteration < cfg.iterations:
                record = self.step()
                bar.update(1)
                self._log_validate_checkpoint(record, log, bar, started)
                if self.dist.any(self._stop_signal is not None):
                    self._save()
                    bar.write(f"stopped by a signal at iteration {self.iteration}; "
                              "continue with --resume")
                    self.stopped = True
                    break
        if log is not None:
            log.close()

    def _save(self, best: bool = False) -> None:
        """A checkpoint by rank 0, once every rank is known to hold the same parameters."""
        weights = torch.cat([p.detach().reshape(-1) for learner in self.learners.values()
                             for p in learner.policy.parameters()])
        if not self.dist.in_sync(weights):
            raise diverged("the processes' parameters differ", self.iteration,
                           self.checkpoints.directory)
        if self.dist.is_main:
            self.checkpoints.save(self.state(), self.iteration, best=best)

    def _log_validate_checkpoint(self, record: dict[str, float], log: TextIO | None, bar: tqdm,
                                 started: float) -> None:
        """Validation (rank 0 only) every ``val_every`` iterations, a checkpoint then and every
        ``checkpoint_every`` iterations, a ``metrics.jsonl`` line every ``log_every``."""
        cfg = self.config
        validated = self.iteration % cfg.val_every == 0 or self.iteration == cfg.iterations
        best = False
        if self.dist.is_main and validated:
            value = self.validate()
            record[f"{next(iter(self.learners))}/val_return"] = value
            best = self.best is None or value > self.best
            if best:
                self.best = value
        if log is not None and (self.iteration % cfg.log_every == 0 or validated):
            log.write(json.dumps({"iteration": self.iteration,
                                  "seconds": round(time.perf_counter() - started, 3),
                                  **record}) + "\n")
            log.flush()
            bar.set_postfix({k: round(v, 2) for k, v in record.items() if k.endswith("return")})
        if validated or self.iteration % cfg.checkpoint_every == 0:
            self._save(best=best)


def validation_return(learner: MAMLRL) -> float:
    """``learner``'s return averaged over 1..``eval_steps`` adaptation steps (the area under the
    evaluation's adaptation curve; step 0 alone if ``eval_steps`` is 0) and over ``val_tasks``
    tasks of a fixed validation seed (the same tasks for every run, distinct from the test ones),
    ``rollouts`` episodes per task and step."""
    cfg = learner.config
    seed = VAL_SEED_OFFSET
    tasks = learner.env.sample_tasks(cfg.val_tasks, torch.Generator().manual_seed(seed))
    returns = learner.task_returns(tasks, cfg.eval_steps, cfg.rollouts, seed + 1)
    return returns[:, min(1, cfg.eval_steps):].mean().item()


FINE_TUNE_SCALES = (3.0, 1.0, 0.3, 0.1, 0.03, 0.01)
"""Multiples of (``inner_lr``, ``eval_inner_lr``) among which each baseline's fine-tuning step
size is chosen on the validation tasks."""


def tune_fine_tuning(learner: MAMLRL) -> MAMLRL:
    """``learner``'s policy fine-tuned with the step sizes (:data:`FINE_TUNE_SCALES`) of best
    :func:`validation_return`: a baseline's fairest comparison, since the α that MAML was
    trained for can throw a policy trained without adaptation far off (its std has shrunk)."""
    cfg = learner.config
    candidates = []
    for scale in FINE_TUNE_SCALES:
        tuned = MAMLRL(dataclasses.replace(cfg, inner_lr=cfg.inner_lr * scale,
                                           eval_inner_lr=cfg.eval_inner_lr * scale),
                       env=learner.env)
        tuned.policy.load_state_dict(learner.policy.state_dict())
        candidates.append((validation_return(tuned), -scale, tuned))
    return max(candidates, key=lambda c: c[:2])[2]


def train_rl(cfg: RLConfig | None, run_dir: str | Path, resume: bool = False,
             iterations: int | None = None, progress: bool = True,
             threads: int | None = None) -> RLTrainer:
    """Trains ``cfg`` in ``run_dir``; or, with ``resume``, continues the run saved there with the
    settings it started with (``iterations`` may extend it, ``threads`` change). A resumed run
    continues bit-identically to one never interrupted."""
    run_dir = Path(run_dir)
    checkpoints = run_dir / "checkpoints"
    if resume:
        cfg = read_rl_config(run_dir)
        changes = {k: v for k, v in (("iterations", iterations), ("threads", threads)) if v}
        cfg = dataclasses.replace(cfg, **changes)
    elif checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or "
                          "choose another --out")
    elif cfg is None:
        raise ConfigError("train_rl needs a config unless it resumes a run")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    trainer = RLTrainer(cfg, run_dir)
    if trainer.dist.is_main:
        write_rl_config(cfg, run_dir)
    if resume and not trainer.resume():
        raise CheckpointError(f"nothing to resume: {checkpoints} holds no checkpoint")
    trainer.train(progress=progress)
    trainer.dist.barrier()
    return trainer


def evaluate_rl_run(run_dir: str | Path, tasks: int | None = None, steps: int | None = None,
                    rollouts: int | None = None, which: str = "last"
                    ) -> tuple[list[EvalRow], list[Path]]:
    """The return after 0..``steps`` adaptation steps on held-out tasks (drawn from a fixed test
    seed: runs with different training seeds meet the same tasks; mean ± 95% CI over tasks) of
    the ``which`` (``"last"`` or ``"best"``) checkpoint's policies and of a fresh initialisation
    (``random``). The trained method adapts with its own α; the baselines (``pretrained``,
    ``random``) with the step sizes of :func:`tune_fine_tuning`, recorded in ``eval.json``'s
    ``step_sizes``. Writes ``eval.json``, ``return_vs_steps.png`` and, for navigation2d,
    ``trajectories.png``."""
    run_dir = Path(run_dir)
    cfg = read_rl_config(run_dir)
    path, state = ckpt.CheckpointDir(run_dir / "checkpoints").read(which)
    methods = make_learners(cfg)
    load_learners(methods, state)
    methods["random"] = MAMLRL(cfg)
    for name in methods.keys() - {METHOD_NAMES[cfg.method]}:
        methods[name] = tune_fine_tuning(methods[name])
    tasks = tasks or cfg.eval_tasks
    steps = cfg.eval_steps if steps is None else steps
    rollouts = rollouts or cfg.eval_rollouts
    seed = TEST_SEED_OFFSET  # the same held-out tasks whatever the training seed
    test_tasks = methods["random"].env.sample_tasks(tasks, torch.Generator().manual_seed(seed))
    rows: list[EvalRow] = []
    for name, learner in methods.items():  # every method sees the same tasks and noise seed
        curves = learner.task_returns(test_tasks, steps, rollouts, seed + 1)
        rows += rows_from_curves(curves, name, rollouts, "test")
    (run_dir / "eval.json").write_text(json.dumps(
        {"metric": "return", "checkpoint": path.name, "iteration": state["iteration"],
         "step_sizes": {n: [float(f"{lr:.6g}") for lr in (m.config.inner_lr,
                                                            m.config.eval_inner_lr)]
                        for n, m in methods.items()},
         "results": [r.to_dict() for r in rows]}, indent=1))
    figures = [plot_metric_vs_steps(rows, "return", run_dir / "return_vs_steps.png")]
    if canonical_env_name(cfg.env) == "navigation2d":
        figures.append(plot_navigation_trajectories(
            methods, test_tasks[:3], steps, rollouts, seed + 1, run_dir / "trajectories.png"))
    return rows, figures


def print_rl_eval(run_dir: str | Path, **kwargs: Any) -> None:
    """:func:`evaluate_rl_run` (``kwargs`` go to it), then the table and the files written."""
    run_dir = Path(run_dir)
    rows, figures = evaluate_rl_run(run_dir, **kwargs)
    print(f"\nreturn (mean ± 95% CI over {rows[0].tasks} test tasks; shots = rollouts per task "
          "and step) after N adaptation steps:")
    print(format_table(rows, "return"))
    sizes = json.loads((run_dir / "eval.json").read_text())["step_sizes"]
    print("step sizes (first step, later steps; the baselines' chosen on validation tasks): "
          + ", ".join(f"{name} {a:g}, {b:g}" for name, (a, b) in sizes.items()))
    print(f"\nwrote {run_dir / 'eval.json'}")
    for f in figures:
        print(f"figure: {f}")
