"""``metagrad eval RUN_DIR``: evaluate a trained run on held-out tasks, write ``eval.json``,
print the table and draw the figures."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from metagrad.training import checkpoint as ckpt
from metagrad.training.evaluation import EvalRow, per_step_metrics, rows_from_curves
from metagrad.training.experiment import build
from metagrad.training.loop import TEST_SEED_OFFSET, read_config
from metagrad.training.plots import plot_metric_vs_steps, plot_sinusoid_predictions


def evaluate_run(run_dir: str | Path, tasks: int | None = None, steps: int | None = None,
                 shots: list[int] | None = None, which: str = "last",
                 scratch: bool = True) -> tuple[list[EvalRow], list[Path]]:
    """Evaluates the ``which`` (``"last"`` or ``"best"``) checkpoint of a run on test tasks."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    exp = build(cfg)
    path, state = ckpt.CheckpointDir(run_dir / "checkpoints").read(which)
    for name, learner in exp.learners.items():
        learner.load_state_dict(state["learners"][name])
    learners = dict(exp.learners)
    if scratch:
        learners["scratch"] = exp.scratch_learner()
    tasks = tasks or cfg.eval_tasks
    steps = cfg.eval_steps if steps is None else steps
    shots = shots or (cfg.eval_shots if cfg.task == "sinusoid" else [cfg.shots])
    rows: list[EvalRow] = []
    for k in shots:
        for name, learner in learners.items():
            # every method sees the same test tasks
            gen = torch.Generator().manual_seed(cfg.seed + TEST_SEED_OFFSET + k)
            curves = per_step_metrics(learner, exp.tasks_for("test", k), tasks, steps,
                                      exp.metric, gen)
            rows += rows_from_curves(curves, name, k, "test", exp.ways)
    (run_dir / "eval.json").write_text(json.dumps(
        {"metric": exp.metric, "checkpoint": path.name, "iteration": state["iteration"],
         "results": [r.to_dict() for r in rows]}, indent=1))
    figures = [plot_metric_vs_steps(rows, exp.metric, run_dir / f"{exp.metric}_vs_steps.png")]
    if cfg.task == "sinusoid":
        shown = {n: exp.learners[n] for n in (cfg.algo, "pretrained") if n in exp.learners}
        for k in shots:
            gen = torch.Generator().manual_seed(cfg.seed + TEST_SEED_OFFSET)
            figures.append(plot_sinusoid_predictions(
                shown, k, run_dir / f"sinusoid_predictions_K{k}.png", gen,
                steps=tuple(sorted({0, 1, steps}))))
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


def conditioning_only(rows: list[EvalRow]) -> list[str]:
    """Methods evaluated at 0 steps only (the black box: no gradient steps to take)."""
    steps: dict[str, set[int]] = {}
    for r in rows:
        steps.setdefault(r.method, set()).add(r.steps)
    return [m for m, s in steps.items() if s == {0} and any(v != {0} for v in steps.values())]
