"""Time to accuracy: train a recipe for a wall-clock budget, then evaluate the
validation-selected checkpoint on held-out test tasks with the paper's protocol.

A recipe is a preset name (``omniglot:paper``, ``omniglot:paper-20way``) or a JSON object of
CLI-equivalent settings, e.g. ``'{"task": "omniglot", "preset": "paper", "first_order": true}'``
(``task`` and ``preset`` choose :func:`metagrad.config.resolve`'s base, every other key
overrides a setting). The key ``"implementation": "plain-loop"`` swaps MAML's meta-gradient for
the plain per-task ``torch.autograd.grad`` loop of ``benchmarks/peers.py`` (everything else, the
sampling, validation and checkpoints, stays metagrad's): the reference a recipe is compared with.

The training runs in a subprocess (:func:`metagrad.training.loop.train`; with ``--nproc N`` > 1,
N processes under torchrun) that receives SIGINT when the budget is over (each torchrun worker
does); the run loop then finishes its current iteration (and its validation, if due), writes a
checkpoint and stops. Everything from the subprocess's start to its exit counts (data loading,
validation, checkpoints), and so does any overrun of the last iteration: ``minutes`` is the
measured time, not the budget. A recipe with its own time limit (the ``minutes`` setting, e.g.
``omniglot:fast``) stops itself after a validated last iteration; give it a budget a little
longer than its limit (start-up is not part of the limit).

Evaluation (:func:`metagrad.training.report.evaluate_run`, not timed): the ``best`` checkpoint
(highest validation value) on ``--tasks`` test tasks (default 600) after the recipe's
``eval_steps`` adaptation steps with its ``eval_queries`` queries per class (the paper's
presets: 15 queries per class, 3 steps for 5-way, 5 for 20-way). Writes::

    {"minutes", "iterations", "accuracy", "ci95", "recipe", "processes", "best_iteration", "load",
     "validation": [[minutes, iteration, value], ...]}

to ``--out`` (JSON) and prints it. ``iterations``: meta-iterations done within the budget;
``best_iteration``: the evaluated checkpoint's. Without any validation inside the budget there
is no ``best`` checkpoint and the script fails (lower ``val_every``). ``--table A.json B.json``
prints the Markdown table of such files.

    METAGRAD_DATA=/work/shared/data/omniglot OMP_WAIT_POLICY=PASSIVE \
        .venv/bin/python benchmarks/time_to_accuracy.py omniglot:paper --minutes 60 \
        --run-dir runs/tta-fp32 --out tta-fp32.json [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from metagrad.config import ExperimentConfig, resolve
from metagrad.errors import ConfigError

IMPLEMENTATIONS = ("metagrad", "plain-loop")
NOT_SETTINGS = ("task", "preset", "implementation")


def recipe_config(recipe: str) -> tuple[ExperimentConfig, dict[str, Any]]:
    """The configuration of ``recipe`` (``task:preset`` or a JSON object) and the recipe as a
    dict (what the result records)."""
    if recipe.lstrip().startswith("{"):
        settings = dict(json.loads(recipe))
    else:
        task, _, preset = recipe.partition(":")
        settings = {"task": task, "preset": preset or None}
    if "task" not in settings:
        raise ConfigError(f"the recipe names no task: {recipe}")
    implementation = settings.get("implementation", "metagrad")
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got "
                          f"{implementation!r}")
    overrides = {k: v for k, v in settings.items() if k not in NOT_SETTINGS}
    config = resolve(settings["task"], settings.get("preset"), overrides)
    if implementation == "plain-loop" and config.algo != "maml":
        raise ConfigError(f"the plain-loop reference is MAML's; the recipe's algo is "
                          f"{config.algo!r}")
    return config, settings


def use_plain_loop() -> None:
    """Every MAML learner computes its meta-gradient with the plain per-task autograd loop."""
    sys.path.insert(0, str(Path(__file__).parent))
    import peers

    from metagrad import MAML

    def meta_gradient(self: MAML, batch: Any) -> Any:
        import torch
        step = peers.plain_loop(self.model, self.loss_fn, self.inner_lr, self.inner_steps,
                                self.first_order)
        return torch.tensor(step(batch.tensors()))

    MAML.meta_gradient = meta_gradient  # type: ignore[method-assign]


def child(recipe: str, run_dir: str) -> None:
    """The timed subprocess: trains the recipe until its iterations or SIGINT."""
    from metagrad.training.loop import train

    config, settings = recipe_config(recipe)
    if settings.get("implementation") == "plain-loop":
        use_plain_loop()
    train(config, run_dir, progress=False, log_interval=30)


def run_for(recipe: str, run_dir: Path, minutes: float, processes: int) -> float:
    """Trains in a subprocess (``processes`` > 1: under torchrun, whose workers are
    interrupted) for ``minutes``; the measured minutes."""
    command = [sys.executable, __file__, "--child", recipe, "--run-dir", str(run_dir)]
    if processes > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone",
                        f"--nproc_per_node={processes}"]
    started = time.perf_counter()
    process = subprocess.Popen(command)
    try:
        process.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        # the workers stop at the end of their iteration and torchrun exits with them
        for pid in workers(process.pid) if processes > 1 else [process.pid]:
            os.kill(pid, signal.SIGINT)
        process.wait()
    elapsed = (time.perf_counter() - started) / 60
    if process.returncode != 0:
        raise RuntimeError(f"the training subprocess failed (exit code {process.returncode})")
    return elapsed


def workers(pid: int) -> list[int]:
    """The child processes of ``pid`` (torchrun's workers; Linux ``/proc``)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


def validation_curve(run_dir: Path) -> list[list[float]]:
    """``[minutes, iteration, validation value]`` of each validation in ``run_dir``'s
    ``metrics.jsonl`` (minutes of training, cumulative)."""
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        value = next((v for k, v in record.items() if k.startswith("val/")), None)
        if value is not None:
            curve.append([round(record["seconds"] / 60, 2), record["iteration"], value])
    return curve


def table(files: list[str]) -> str:
    """The Markdown table of result JSON ``files`` (one row each, named by the file)."""
    lines = ["| row | processes | minutes | iterations | best checkpoint: iteration, reached "
             "after (min) | test accuracy (%) |", "|---|---|---|---|---|---|"]
    for name in files:
        r = json.loads(Path(name).read_text())
        reached = next((f"{m:.1f}" for m, i, _ in r.get("validation", [])
                        if i == r["best_iteration"]), "?")
        lines.append(f"| {Path(name).stem} | {r['processes']} | {r['minutes']:.1f} | "
                     f"{r['iterations']:,} | {r['best_iteration']:,}, {reached} | "
                     f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", help="task:preset, or a JSON object of settings")
    parser.add_argument("--table", nargs="+", metavar="JSON",
                        help="print the Markdown table of these result files and exit")
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget")
    parser.add_argument("--run-dir", help="a new run directory")
    parser.add_argument("--tasks", type=int, default=600, help="test tasks")
    parser.add_argument("--nproc", type=int, default=1, help="training processes (torchrun)")
    parser.add_argument("--out", help="result JSON file (default: RUN_DIR/time_to_accuracy.json)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.recipe is None or args.run_dir is None:
        parser.error("a recipe and --run-dir are needed (or --table)")
    if args.child:
        child(args.recipe, args.run_dir)
        return
    from metagrad.training import checkpoint as ckpt
    from metagrad.training.report import evaluate_run

    config, recipe = recipe_config(args.recipe)  # refuses a bad recipe before training
    run_dir = Path(args.run_dir)
    minutes = run_for(args.recipe, run_dir, args.minutes, args.nproc)
    load = os.getloadavg()
    checkpoints = ckpt.CheckpointDir(run_dir / "checkpoints")
    _, last = checkpoints.read("last")
    rows, _ = evaluate_run(run_dir, tasks=args.tasks, steps=config.eval_steps, which="best",
                           scratch=False, out=run_dir / "time_to_accuracy_eval")
    best = json.loads((run_dir / "time_to_accuracy_eval" / "eval.json").read_text())
    row = next(r for r in rows if r.method == config.algo and r.steps == config.eval_steps)
    result = {"minutes": round(minutes, 3), "iterations": int(last["iteration"]),
              "accuracy": row.mean, "ci95": row.ci95, "recipe": recipe, "processes": args.nproc,
              "best_iteration": int(best["iteration"]), "load": load,
              "validation": validation_curve(run_dir)}
    out = Path(args.out) if args.out else run_dir / "time_to_accuracy.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
