"""``metagrad eval RUN_DIR``: evaluate a trained run on held-out tasks, write ``eval.json``,
print the table and draw the figures."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from metagrad.algorithms.base import measured_steps
from metagrad.distributed import resolve_device
from metagrad.errors import CheckpointError, ConfigError
from metagrad.tasks.base import SPLITS, Split
from metagrad.training import checkpoint as ckpt
from metagrad.training.evaluation import (
    EvalRow,
    curve_steps,
    evaluation_curves,
    resolve_eval_seed,
    rows_from_curves,
    tune_fine_tuning,
)
from metagrad.training.experiment import PRETRAINED, build
from metagrad.training.loop import read_config
from metagrad.training.plots import plot_metric_vs_steps
from metagrad.training.run import TEST_SEED_OFFSET, VAL_SEED_OFFSET


def evaluate_run(run_dir: str | Path, tasks: int | None = None, steps: int | None = None,
                 shots: list[int] | None = None, which: str = "best", scratch: bool = True,
                 out: str | Path | None = None, device: str | None = None,
                 pretrained: bool = True, report_steps: Sequence[int] | None = None,
                 eval_seed: int | None = None, split: Split = "test"
                 ) -> tuple[list[EvalRow], list[Path]]:
    """Evaluates the ``which`` (``"best"``: validation-selected, or ``"last"``) checkpoint of a
    supervised run on ``tasks`` tasks (default ``eval_tasks``) of ``split`` (``"test"``;
    ``"val"``, or ``"train"`` for the meta-training classes: the gap to ``"test"`` is how much
    of the accuracy is memorised; tasks without splits draw every split from one distribution)
    after each number of steps
    in ``report_steps`` (strictly increasing, within 0..``steps``; default every one of
    0..``steps``), beside the baselines — ``pretrained`` (if the run trained it) and
    ``scratch`` unless switched off — and writes ``eval.json`` and the figures into ``out``
    (default: the run directory). Every method sees the same test tasks, drawn from
    ``eval_seed`` (default: the run's), whatever the training seed; ``scratch``'s initialisation
    is drawn from it too, so an evaluation does not depend on what ran before it. The query set
    is met only at the reported steps, so a sparse ``report_steps`` makes long evaluations
    cheaper.

    The meta-learner adapts with its own α; each baseline (``pretrained``, ``scratch``)
    fine-tunes with the step size of :func:`~metagrad.training.evaluation.tune_fine_tuning`,
    chosen after ``steps`` steps on ``val_tasks`` validation tasks with ``shots`` examples (the
    training shots) of a fixed seed, recorded in ``eval.json``'s ``step_sizes`` and printed."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    if not hasattr(cfg, "algo"):
        raise ConfigError(f"{run_dir} is a meta-RL run; evaluate it with `metagrad eval` "
                          "(which detects it) or metagrad.training.rl.evaluate_rl_run")
    for name, value in (("tasks", tasks), ("steps", steps)):
        if value is not None and (not isinstance(value, int) or value < (name == "tasks")):
            raise ConfigError(f"--{name} must be an integer >= {int(name == 'tasks')}, "
                              f"got {value!r}")
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    if shots is not None and (not shots or any(k < 1 for k in shots)):
        raise ConfigError(f"--shots must list positive integers, got {shots}")
    exp = build(cfg, resolve_device(device or cfg.device))
    path, state = ckpt.CheckpointDir(run_dir / "checkpoints").read(which)
    try:
        for name, learner in exp.learners.items():
            learner.load_state_dict(state["learners"][name])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path} does not hold this run's learners ({exc}); it belongs "
                              "to another task, algorithm or model") from None
    learners = {name: learner for name, learner in exp.learners.items()
                if pretrained or name != PRETRAINED}
    seed = resolve_eval_seed(cfg.eval_seed, eval_seed)
    if scratch:  # its initialisation drawn from the evaluation's seed, not the process's state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + TEST_SEED_OFFSET)
            learners["scratch"] = exp.scratch_learner()
    tasks = tasks or cfg.eval_tasks
    steps = cfg.eval_steps if steps is None else steps
    measured_steps(report_steps, steps)  # refuses bad steps before any work
    setup = exp.setup
    for name in [n for n in learners if n != cfg.algo]:
        learners[name] = tune_fine_tuning(
            learners[name], setup.held_out("val", cfg.shots), cfg.val_tasks, steps,
            setup.metric, seed + VAL_SEED_OFFSET + cfg.shots, exp.device)
    step_sizes = {name: learners[name].inner_lr for name in learners if name != cfg.algo}
    if step_sizes:
        print("fine-tuning step sizes chosen on the validation tasks: "
              + ", ".join(f"{name} {lr:g}" for name, lr in step_sizes.items()))
    shots = shots or (cfg.eval_shots if setup.classes is None else [cfg.shots])
    rows: list[EvalRow] = []
    for k in shots:
        for name, learner in learners.items():
            gen = torch.Generator().manual_seed(seed + TEST_SEED_OFFSET + k)
            curves = evaluation_curves(learner, setup.held_out(split, k), tasks, steps,
                                       setup.metric, gen, exp.device, at=report_steps)
            rows += rows_from_curves(curves, name, k, split, setup.classes,
                                     curve_steps(learner, steps, report_steps))
    out = run_dir if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(
        {"metric": setup.metric, "checkpoint": path.name, "iteration": state["iteration"],
         "eval_seed": seed, "split": split, "step_sizes": step_sizes,
         "results": [r.to_dict() for r in rows]}, indent=1))
    figures = [plot_metric_vs_steps(rows, setup.metric, out / f"{setup.metric}_vs_steps.png")]
    if setup.plots is not None:
        shown = {n: learners[n] for n in (cfg.algo, PRETRAINED) if n in learners}
        gen = torch.Generator().manual_seed(seed + TEST_SEED_OFFSET)
        figures += setup.plots(shown, out, shots, steps, gen)
    return rows, figures


def format_table(rows: list[EvalRow], metric: str, steps_shown: tuple[int, ...] | None = None
                 ) -> str:
    """A text table: one line per method and shots, one column per number of steps."""
    all_steps = sorted({r.steps for r in rows})
    cols = [s for s in all_steps if steps_shown is None or s in steps_shown]
    lines = [f"{'method':<12}{'shots':>6}  " + "  ".join(f"{f'{s} steps':>15}" for s in cols)]
    for method, shots in dict.fromkeys((r.method, r.shots) for r in rows):
        cells = {r.steps: r for r in rows if r.method == method and r.shots == shots}
        scale = 100 if metric == "accuracy" else 1
        lines.append(f"{method:<12}{shots:>6}  " + "  ".join(
            f"{cells[s].mean * scale:>8.3f}±{cells[s].ci95 * scale:<6.3f}" if s in cells
            else f"{'-':>8} {'':<6}" for s in cols))
    return "\n".join(lines)


def format_gains(rows: list[EvalRow], metric: str) -> str:
    """One line per method: its change since 0 steps after its first and last numbers of steps,
    ± the paired 95% interval over tasks (:attr:`EvalRow.gain_ci95`); empty without such rows."""
    zero = {(r.method, r.shots): r.mean for r in rows if r.steps == 0}
    scale = 100 if metric == "accuracy" else 1
    lines = []
    for method, shots in dict.fromkeys((r.method, r.shots) for r in rows):
        later = sorted((r for r in rows if r.method == method and r.shots == shots
                        and r.gain_ci95 is not None), key=lambda r: r.steps)
        if later:
            lines.append(f"{method:<12}{shots:>6}  " + "  ".join(
                f"{r.steps} step{'s' * (r.steps != 1)}: "
                f"{(r.mean - zero[method, shots]) * scale:+.3f}±{r.gain_ci95 * scale:.3f}"
                for r in (later[:1] + later[-1:] if len(later) > 1 else later)))
    if not lines:
        return ""
    return "change since 0 steps (paired 95% CI over the same tasks):\n" + "\n".join(lines)


def conditioning_only(rows: list[EvalRow]) -> list[str]:
    """Methods evaluated at 0 steps only (the black box: no gradient steps to take)."""
    steps: dict[str, set[int]] = {}
    for r in rows:
        steps.setdefault(r.method, set()).add(r.steps)
    return [m for m, s in steps.items() if s == {0} and any(v != {0} for v in steps.values())]
