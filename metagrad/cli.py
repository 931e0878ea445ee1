"""``metagrad train|eval|presets``: the command-line interface (``train rl --env NAME`` for
meta-RL).

Mistakes in what a user typed or configured end with a one-paragraph message and exit status 2
(``--debug`` shows the traceback); an interrupted run writes a checkpoint and can be resumed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metagrad.config import FIELDS, PRESETS, TASKS, coerce, load_yaml, resolve
from metagrad.errors import ConfigError, MetagradError
from metagrad.rl.maml_rl import RLConfig
from metagrad.training.rl import RL_FIELDS, is_rl_run, print_rl_eval, resolve_rl, train_rl


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (override the preset and --config)")
    for name in dict.fromkeys([*FIELDS, *RL_FIELDS]):
        if name == "task":
            continue
        # a yes/no setting also works as a bare flag: --first-order means --first-order true
        switch = (isinstance(FIELDS[name].default, bool) if name in FIELDS
                  else RL_FIELDS.get(name) is bool)
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"set_{name}", metavar="VALUE",
                           default=None, **({"nargs": "?", "const": "true"} if switch else {}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metagrad", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="meta-train on a task (then evaluate)")
    train.add_argument("task", choices=(*TASKS, "rl"),
                       help="the task family, or rl (meta-RL on the environment --env)")
    train.add_argument("--preset", default=None, help="named settings of the task (default: paper)")
    train.add_argument("--config", help="YAML file of settings")
    train.add_argument("--out", help="run directory (default: runs/TASK-ALGO-TIME)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_setting_flags(train)

    ev = sub.add_parser("eval", help="evaluate a run directory on held-out test tasks")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--tasks", type=int, help="number of test tasks (default: eval_tasks)")
    ev.add_argument("--steps", type=int, help="largest number of adaptation steps")
    ev.add_argument("--shots", type=int, nargs="+", help="shots to evaluate")
    ev.add_argument("--rollouts", type=int, help="rl: episodes per task and adaptation step")
    ev.add_argument("--checkpoint", choices=("last", "best"), default="last")

    sub.add_parser("presets", help="list the built-in presets")
    return parser


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    values.pop("task", None)
    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("set_") and v is not None}
    values.update(flags)
    return values


def _resume_settings(args: argparse.Namespace, settings: dict[str, Any],
                     read: Callable[[str, Any], Any]) -> tuple[Path, dict[str, Any]]:
    """The run to resume and the settings it may change (``read`` converts their values)."""
    if not args.out:
        raise ConfigError("--resume needs --out RUN_DIR, the run to continue")
    unused = sorted(set(settings) - {"iterations", "threads"})
    if unused:
        raise ConfigError("a resumed run keeps its settings; only --iterations and "
                          f"--threads may change (remove {', '.join(unused)})")
    return Path(args.out), {k: read(k, v) for k, v in settings.items()}


def _train(args: argparse.Namespace) -> None:
    from metagrad.training.loop import train

    settings = _settings(args)
    if args.task == "rl":
        _train_rl(args, settings)
        return
    if args.resume:
        out, changes = _resume_settings(args, settings, coerce)
        trainer = train(None, out, resume=True, progress=not args.no_progress, **changes)
    else:
        cfg = resolve(args.task, args.preset, settings)
        out = Path(args.out or f"runs/{cfg.task}-{cfg.algo}-{time.strftime('%Y%m%d-%H%M%S')}")
        print(f"run directory: {out}")
        trainer = train(cfg, out, progress=not args.no_progress)
    if trainer.stopped or not trainer.dist.is_main:
        return  # a signal stopped the run (checkpoint written), or another rank evaluates
    if not args.no_eval:
        _print_eval(out)


def _train_rl(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    if args.preset:
        raise ConfigError("train rl has no presets: --env starts from that environment's "
                          "paper settings")
    if args.resume:
        out, changes = _resume_settings(args, settings, RLConfig.coerce)
        trainer = train_rl(None, out, resume=True, progress=not args.no_progress, **changes)
    else:
        cfg = resolve_rl(settings)
        out = Path(args.out or f"runs/rl-{cfg.env}-{time.strftime('%Y%m%d-%H%M%S')}")
        print(f"run directory: {out}")
        trainer = train_rl(cfg, out, progress=not args.no_progress)
    if not (trainer.stopped or args.no_eval or not trainer.dist.is_main):
        print_rl_eval(out)


def _print_eval(run_dir: Path, **kwargs: Any) -> None:
    from metagrad.training.report import conditioning_only, evaluate_run, format_table

    rows, figures = evaluate_run(run_dir, **kwargs)
    metric = "accuracy" if rows and rows[0].ways is not None else "mse"
    print(f"\nquery {metric} (mean ± 95% CI over {rows[0].tasks} test tasks) after N steps:")
    steps = sorted({r.steps for r in rows})
    shown = tuple(s for s in steps if s in (0, 1, 3, 5, 10) or s == steps[-1])
    print(format_table(rows, metric, shown))
    for method in conditioning_only(rows):
        print(f"({method} takes no gradient steps: its 0-steps column is its {metric} after "
              "conditioning on the support set)")
    print(f"\nwrote {run_dir / 'eval.json'}")
    for f in figures:
        print(f"figure: {f}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            _train(args)
        elif args.command == "eval":
            if is_rl_run(args.run_dir):
                print_rl_eval(args.run_dir, tasks=args.tasks, steps=args.steps,
                              rollouts=args.rollouts, which=args.checkpoint)
            else:
                _print_eval(args.run_dir, tasks=args.tasks, steps=args.steps, shots=args.shots,
                            which=args.checkpoint)
        elif args.command == "presets":
            for task, presets in PRESETS.items():
                for name, values in presets.items():
                    settings = ", ".join(f"{k}={v}" for k, v in values.items())
                    print(f"{task} --preset {name}: {settings}")
        return 0
    except MetagradError as exc:
        if args.debug:
            raise
        print(f"metagrad: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metagrad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
