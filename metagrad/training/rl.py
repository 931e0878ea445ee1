"""Meta-RL runs: MAML-RL (and the "pretrained" baseline) as a job of the one training loop
(:mod:`metagrad.training.run`), validation on held-out tasks, and evaluation of a run directory
(``eval.json`` and figures).

In ``eval.json`` a row's ``shots`` is the number of rollouts per task and adaptation step (the
RL counterpart of K examples per class) and ``metric`` is ``"return"`` (undiscounted, per episode,
averaged over the rollouts of a task).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from metagrad.distributed import Distributed
from metagrad.errors import CheckpointError
from metagrad.rl.envs import canonical_env_name
from metagrad.rl.maml_rl import MAMLRL
from metagrad.rl.rl2 import RL2
from metagrad.rl.settings import RLConfig
from metagrad.training import checkpoint as ckpt
from metagrad.training.evaluation import (
    FINE_TUNE_SCALES,
    EvalRow,
    resolve_eval_seed,
    rows_from_curves,
)
from metagrad.training.plots import plot_metric_vs_steps
from metagrad.training.report import format_gains, format_table
from metagrad.training.rl_plots import plot_navigation_trajectories
from metagrad.training.run import (
    TEST_SEED_OFFSET,
    VAL_SEED_OFFSET,
    RunDirectory,
    diverged,
    initialise_learners,
)

_LOCOMOTION = dict(meta_batch=40, rollouts=20, horizon=200, inner_lr=0.1, iterations=500)
ENV_DEFAULTS: dict[str, dict[str, Any]] = {
    "navigation2d": dict(meta_batch=20, rollouts=20, horizon=100, inner_lr=0.1, iterations=500,
                         val_tasks=40),
    **{name: _LOCOMOTION for name in ("halfcheetahvel", "halfcheetahdir")},
    "antvel": {**_LOCOMOTION, "physics": "rllab"},
    "antdir": {**_LOCOMOTION, "physics": "rllab", "rollouts": 40},
}
"""The paper's settings (Finn et al. 2017, §5.3 and App. A.2): 20 rollouts per task (40 for the
ant's direction task); meta-batch 20 (navigation, H = 100) or 40 (locomotion, H = 200); α = 0.1
in every RL experiment (0.05 after the first step at evaluation); up to 500 meta-iterations.
Navigation validates on 40 tasks (a fraction of a second), locomotion on the default 20. The
authors' code agrees for the locomotion tasks (``fast_lr`` 0.1, 20 rollouts, H 200, meta-batch
40; its ant scripts use 20 rollouts for every ant task) but its navigation script
uses α = 0.5 and meta-batch 40; the paper's values are used here. The ants step as the authors'
rllab ant does (``physics="rllab"``: one 0.02 s physics step per action, rllab's initial pose);
the half cheetahs keep gymnasium's v5 control (``physics="gymnasium"``). A config stored without
``physics`` was trained with gymnasium's, the field's default, which it keeps on resume."""

METHOD_NAMES = {"maml": "maml", "pretrain": "pretrained", "rl2": "rl2"}
"""Names of the trained policies in checkpoints, metrics and ``eval.json``."""


def resolve_rl(settings: dict[str, Any]) -> RLConfig:
    """The config for ``settings["env"]`` (default navigation2d): the environment's paper settings
    (:data:`ENV_DEFAULTS`), then ``settings`` (strings are read as the fields' types)."""
    values = {k: RLConfig.coerce(k, v) for k, v in settings.items()}
    env = canonical_env_name(values.setdefault("env", "navigation2d"))
    return RLConfig(**{**ENV_DEFAULTS.get(env, {}), **values})


def rl_config_from_dict(values: dict[str, Any]) -> RLConfig:
    """The meta-RL config stored in a run directory or a checkpoint."""
    return RLConfig.from_dict(values)


def make_learners(cfg: RLConfig, distributed: Distributed | None = None,
                  device: torch.device | str = "cpu") -> dict[str, MAMLRL | RL2]:
    """The configured method (:class:`MAMLRL`, or :class:`~metagrad.rl.rl2.RL2` for ``rl2``)
    and, with ``baseline`` (and method maml), the pretrained policy."""
    learner = RL2 if cfg.method == "rl2" else MAMLRL
    learners = {METHOD_NAMES[cfg.method]: learner(cfg, distributed=distributed, device=device)}
    if cfg.baseline and cfg.method == "maml":
        learners["pretrained"] = MAMLRL(dataclasses.replace(cfg, method="pretrain"),
                                        distributed=distributed, device=device)
    return learners


def load_learners(learners: dict[str, MAMLRL], state: dict[str, Any]) -> None:
    """Each learner's weights and sampling state from a checkpoint's ``state``."""
    try:
        for name, learner in learners.items():
            learner.load_state_dict(state["learners"][name])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(
            f"the checkpoint does not match this run's configuration ({exc})") from None


class RLJob:
    """Meta-RL training as a :class:`~metagrad.training.run.Job`: every learner meta-trains on
    the same task batches (drawn by the first learner's generator, so MAML's run does not
    depend on whether the baseline is trained); validation scores the first learner.

    Under ``torchrun`` every process trains its share of each task batch
    (:meth:`MAMLRL.meta_step`)."""

    higher_is_better = True

    def __init__(self, cfg: RLConfig, directory: RunDirectory, dist: Distributed,
                 device: torch.device | str = "cpu") -> None:
        self.settings = cfg
        self.directory = directory
        self.dist = dist
        self.learners = make_learners(cfg, dist, device)
        self.description = f"{cfg.env}/{cfg.method}"
        self.validation_key = f"{next(iter(self.learners))}/val_return"
        self.artifacts: dict[str, Any] = {}

    def step(self, iteration: int, progress: float) -> dict[str, float]:
        """One meta-step of every learner (TRPO and RL² follow no schedule: ``progress`` is
        not read)."""
        first, *_ = self.learners.values()
        tasks = first.sample_tasks()
        record = {}
        for name, learner in self.learners.items():
            metrics = learner.meta_step(tasks)
            metrics.pop("iteration")
            for key, value in metrics.items():
                if not math.isfinite(value):
                    raise diverged(f"{name}'s {key} became {value}", iteration,
                                   self.directory.checkpoints.directory,
                                   "Lower max_kl or inner_lr.")
                record[f"{name}/{key}"] = value
        return record

    def validate(self) -> float:
        """:func:`validation_return` of the first learner."""
        return validation_return(next(iter(self.learners.values())))

    def state_dict(self) -> dict[str, Any]:
        return {"learners": {n: learner.state_dict() for n, learner in self.learners.items()},
                "rng": ckpt.rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_learners(self.learners, state)
        ckpt.restore_rng_state(state["rng"])

    def initialise_from(self, state: dict[str, Any]) -> None:
        """Each learner's policy from ``state``; TRPO's state, the iteration count and the task
        stream stay fresh."""
        initialise_learners(self.learners, state,
                            lambda learner, saved: learner.load_policy(saved))

    def synchronised_parameters(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for learner in self.learners.values()
                          for p in learner.policy.parameters()])


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


def tune_fine_tuning(learner: MAMLRL) -> MAMLRL:
    """``learner``'s policy fine-tuned with the step sizes (:data:`FINE_TUNE_SCALES` × its
    ``inner_lr`` and ``eval_inner_lr``) of best :func:`validation_return`: a baseline's fairest
    comparison, since the α that MAML was trained for can throw a policy trained without
    adaptation far off (its std has shrunk)."""
    cfg = learner.config
    candidates = []
    for scale in FINE_TUNE_SCALES:
        tuned = MAMLRL(dataclasses.replace(cfg, inner_lr=cfg.inner_lr * scale,
                                           eval_inner_lr=cfg.eval_inner_lr * scale),
                       env=learner.env)
        tuned.policy.load_state_dict(learner.policy.state_dict())
        candidates.append((validation_return(tuned), -scale, tuned))
    return max(candidates, key=lambda c: c[:2])[2]


def evaluate_rl_run(run_dir: str | Path, tasks: int | None = None, steps: int | None = None,
                    rollouts: int | None = None, which: str = "best",
                    out: str | Path | None = None, eval_seed: int | None = None
                    ) -> tuple[list[EvalRow], list[Path]]:
    """The return after 0..``steps`` adaptation steps on held-out tasks (drawn from ``eval_seed``,
    default the run's, whatever the training seed: runs with different training seeds meet the
    same tasks; mean ± 95% CI over tasks) of
    the ``which`` (``"last"`` or ``"best"``) checkpoint's policies and of a fresh initialisation
    (``random``). The trained method adapts with its own α; the baselines (``pretrained``,
    ``random``) with the step sizes of :func:`tune_fine_tuning`, recorded in ``eval.json``'s
    ``step_sizes``. RL² takes no gradient steps (its "k steps" are the (k+1)-th episode of a
    trial) and has no step sizes; an RL² run's ``random`` row is still MAML's (a fresh MLP policy
    fine-tuned by policy gradient). Writes into ``out`` (default: the run directory)
    ``eval.json``, ``return_vs_steps.png`` and, for navigation2d, ``trajectories.png``."""
    run_dir = Path(run_dir)
    cfg = rl_config_from_dict(RunDirectory(run_dir).read_config())
    path, state = ckpt.CheckpointDir(run_dir / "checkpoints").read(which)
    methods = make_learners(cfg)
    load_learners(methods, state)
    methods["random"] = MAMLRL(cfg)
    for name in methods.keys() - {METHOD_NAMES[cfg.method]}:
        methods[name] = tune_fine_tuning(methods[name])
    tasks = tasks or cfg.eval_tasks
    steps = cfg.eval_steps if steps is None else steps
    rollouts = rollouts or cfg.eval_rollouts
    eval_seed = resolve_eval_seed(cfg.eval_seed, eval_seed)
    seed = TEST_SEED_OFFSET + eval_seed
    test_tasks = methods["random"].env.sample_tasks(tasks, torch.Generator().manual_seed(seed))
    rows: list[EvalRow] = []
    for name, learner in methods.items():  # every method sees the same tasks and noise seed
        curves = learner.task_returns(test_tasks, steps, rollouts, seed + 1)
        rows += rows_from_curves(curves, name, rollouts, "test")
    out = run_dir if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(
        {"metric": "return", "checkpoint": path.name, "iteration": state["iteration"],
         "eval_seed": eval_seed,
         "step_sizes": {n: [float(f"{lr:.6g}") for lr in (m.config.inner_lr,
                                                            m.config.eval_inner_lr)]
                        for n, m in methods.items() if isinstance(m, MAMLRL)},
         "results": [r.to_dict() for r in rows]}, indent=1))
    figures = [plot_metric_vs_steps(rows, "return", out / "return_vs_steps.png")]
    if canonical_env_name(cfg.env) == "navigation2d":
        figures.append(plot_navigation_trajectories(
            methods, test_tasks[:3], steps, rollouts, seed + 1, out / "trajectories.png"))
    return rows, figures


def print_rl_eval(run_dir: str | Path, out: str | Path | None = None, **kwargs: Any) -> None:
    """:func:`evaluate_rl_run` (``kwargs`` go to it), then the table and the files written."""
    run_dir = Path(run_dir)
    out = run_dir if out is None else Path(out)
    rows, figures = evaluate_rl_run(run_dir, out=out, **kwargs)
    data = json.loads((out / "eval.json").read_text())
    print(f"\nevaluating the {kwargs.get('which', 'best')} checkpoint (iteration "
          f"{data['iteration']}): return (mean ± 95% CI over {rows[0].tasks} test tasks; shots = "
          "rollouts per task and step) after N adaptation steps:")
    print(format_table(rows, "return"))
    if gains := format_gains(rows, "return"):
        print(gains)
    print("step sizes (the first inner_steps steps, later steps; the baselines' chosen on "
          "validation tasks): " + ", ".join(f"{name} {a:g}, {b:g}"
                                              for name, (a, b) in data["step_sizes"].items()))
    print(f"\nwrote {out / 'eval.json'}")
    for f in figures:
        print(f"figure: {f}")
