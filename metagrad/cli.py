"""``metagrad train|eval|presets|data``: the command-line interface.

``metagrad train TASK`` meta-trains on a task (a built-in name or ``package.module:factory``)
with ``--algo NAME`` (or ``package.module:Class``); ``metagrad train rl --env NAME`` meta-trains
a policy. The flags offered are the settings of the chosen task, algorithm or environment, each
with its help, type and default. Mistakes in what a user typed or configured end with a one-line
message and exit status 2 (``--debug`` shows the traceback); an interrupted run writes a
checkpoint and can be resumed. ``metagrad data omniglot`` fetches (``--download URL``) and
checks a data set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

import metagrad
from metagrad import config as settings
from metagrad.errors import ConfigError, MetagradError
from metagrad.tasks.base import SPLITS

DESCRIPTION = ("Gradient-based meta-learning (MAML and its family) for any torch.nn.Module: "
               "train, evaluate, list presets.")
GROUP_TITLES = {"task": "task", "inner loop": "inner loop", "outer loop": "outer loop",
                "evaluation": "validation and evaluation", "run": "run"}


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _shown(value: Any) -> str:
    return "none" if value is None or value in ([], ()) else (
        " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value))


def _add_setting(group: argparse._ArgumentGroup, f: dataclasses.Field, hint: Any,
                 preset: tuple[str | None, dict[str, Any]]) -> None:
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    kind = settings.describe_type(hint)
    text = f.metadata.get("help", "")
    name, values = preset
    shown = (f"{_shown(values[f.name])} (preset {name}; else {_shown(default)})"
             if f.name in values and values[f.name] != default else _shown(default))
    extra = {"nargs": "?", "const": "true"} if hint is bool else {}
    group.add_argument(_flag(f.name), dest=f"set_{f.name}", metavar=kind.upper().split()[0]
                       if hint in (int, float, str) else "VALUE", default=None,
                       help=f"{text} [{kind}; default: {shown}]".strip(), **extra)


def _add_settings(parser: argparse.ArgumentParser,
                  fields: Iterable[tuple[type, dataclasses.Field]], skip: set[str],
                  preset: tuple[str | None, dict[str, Any]] = (None, {})) -> None:
    groups: dict[Any, argparse._ArgumentGroup] = {}
    for owner, f in fields:
        if f.name in skip or f.metadata.get("internal"):
            continue
        group = f.metadata.get("group")
        if owner is settings.ExperimentConfig:
            title = GROUP_TITLES.get(group, group)
        elif owner.__name__ == "RLConfig":
            title = f"meta-RL: {group}" if group else "meta-RL"
        else:
            title = f"{owner.__name__} (options of the chosen {_owner_kind(owner)})"
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        _add_setting(groups[title], f, settings.type_hints(owner)[f.name], preset)


def _owner_kind(owner: type) -> str:
    return "algorithm" if owner.__module__.startswith("metagrad.algorithms") else "task"


def _common_train_flags(train: argparse.ArgumentParser) -> None:
    train.add_argument("--preset", default=None, help="named settings of the task (default: "
                       "the paper's for the ways/shots asked for; `metagrad presets` lists them)")
    train.add_argument("--config", help="YAML file of settings (flags win)")
    train.add_argument("--out", help="run directory (default: runs/TASK-ALGO-TIME)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out (only --iterations, --minutes and "
                       "--threads change)")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved settings as YAML and exit")
    train.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    train.add_argument("--no-progress", action="store_true",
                       help="no progress bar: a plain log line every minute")
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks")


def _pre_parse(argv: list[str]) -> argparse.Namespace:
    """The command, the task and the algorithm/environment, before the flags they decide."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("command", nargs="?")
    pre.add_argument("task", nargs="?")
    for flag in ("--algo", "--env", "--config", "--preset", "--ways"):
        pre.add_argument(flag)
    known, _ = pre.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    return known


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; ``train``'s setting flags are those of the task and algorithm (or RL
    environment) named in ``argv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = _pre_parse(argv)
    parser = argparse.ArgumentParser(prog="metagrad", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"metagrad {metagrad.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="meta-train on a task (then evaluate)",
                           description="Meta-train on TASK, then evaluate on its test tasks.")
    train.add_argument("task", help="sinusoid, omniglot, miniimagenet, folder, your own "
                       "package.module:factory, or rl (meta-RL on --env)")
    _common_train_flags(train)
    if pre.command == "train" and pre.task == "rl":
        from metagrad.rl.settings import RLConfig

        fields = [(RLConfig, f) for f in dataclasses.fields(RLConfig)]
        _add_settings(train, fields, set())
    elif pre.command == "train" and pre.task:
        task, algo = _task_and_algo(pre.task, pre.algo, pre.config)
        _add_settings(train, settings.fields_for(task, algo).values(), {"task"},
                      _help_preset(task, pre.preset, pre.ways))

    ev = sub.add_parser("eval", help="evaluate a run directory on held-out test tasks")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--tasks", type=int, help="number of test tasks (default: eval_tasks)")
    ev.add_argument("--steps", type=int, help="largest number of adaptation steps")
    ev.add_argument("--shots", type=int, nargs="+", help="shots to evaluate")
    ev.add_argument("--report-steps", type=int, nargs="+", metavar="STEP",
                    help="measure the query set only after these numbers of steps (strictly "
                    "increasing, up to --steps; default: after every step) — much faster for "
                    "long adaptations, e.g. --steps 50 --report-steps 0 1 5 10 50")
    ev.add_argument("--no-baselines", action="store_true",
                    help="evaluate the meta-learner only (no pretrained and scratch rows, and "
                    "no tuning of their step sizes on validation tasks)")
    ev.add_argument("--eval-seed", type=int, help="seed of the test tasks (default: the run's "
                    "eval_seed; runs evaluated with one seed meet the same tasks)")
    ev.add_argument("--split", choices=SPLITS, default="test",
                    help="classes the tasks are drawn from: test (default), val, or train (the "
                    "meta-training classes, to measure the gap to unseen ones)")
    ev.add_argument("--rollouts", type=int, help="rl: episodes per task and adaptation step")
    ev.add_argument("--checkpoint", choices=("best", "last"), default=None,
                    help="which checkpoint (default: best, the validation-selected one)")
    ev.add_argument("--out", type=Path, help="where to write eval.json and figures (default: a "
                    "new RUN_DIR/eval-CHECKPOINT-TASKS folder)")
    ev.add_argument("--device", help="device to evaluate on (default: the run's)")
    ev.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                    help="show tracebacks")

    pr = sub.add_parser("presets", help="list the built-in presets")
    pr.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    data = sub.add_parser("data", help="fetch and check a data set",
                          description="Check that the data set is complete and decodable "
                          "(fetching it first with --download), and show what was found.")
    data.add_argument("dataset", choices=("omniglot",))
    data.add_argument("--root", type=Path, help="the folder holding (or to receive) the zips "
                      "(default: $METAGRAD_DATA or its omniglot/ folder; downloads without "
                      "either go to the cache folder)")
    data.add_argument("--download", metavar="URL", help="fetch the missing zips from this base "
                      "URL (e.g. https://github.com/brendenlake/omniglot/raw/master/python or "
                      "file:///path/to/folder)")
    data.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help="show tracebacks")
    return parser


def _help_preset(task: str, preset: str | None, ways: str | None
                 ) -> tuple[str | None, dict[str, Any]]:
    """The preset whose values ``--help`` shows as defaults (none when it cannot be told yet:
    a wrong name is reported when the command runs)."""
    try:
        return settings.chosen_preset(task, preset, {"ways": ways} if ways else {})
    except (ConfigError, ValueError):
        return None, {}


def _task_and_algo(task: str, algo: str | None, config: str | None) -> tuple[str, str]:
    """The task and algorithm named on the command line or in ``--config``."""
    from metagrad.algorithms import ALGORITHMS
    from metagrad.tasks import TASKS

    if algo is None and config:
        algo = settings.load_yaml(config).get("algo")
    return TASKS.canonical(task), ALGORITHMS.canonical(str(algo or "maml"))


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Settings from ``--config``, then the flags."""
    values: dict[str, Any] = settings.load_yaml(args.config) if args.config else {}
    stored_task = values.pop("task", None)
    if args.config and "env" in values and args.task != "rl":
        raise ConfigError(f"{args.config} configures a meta-RL run (env: {values['env']}); use "
                          "`metagrad train rl --config ...`")
    if stored_task is not None and args.task != "rl":
        from metagrad.tasks import TASKS

        if TASKS.canonical(str(stored_task)) != TASKS.canonical(args.task):
            raise ConfigError(f"{args.config} configures task {stored_task!r}, not "
                              f"{args.task!r}; use `metagrad train {stored_task} --config ...` "
                              "or remove its task line")
    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("set_") and v is not None}
    values.update(flags)
    return values


def _train(args: argparse.Namespace, command: str) -> None:
    from metagrad.training.loop import train

    values = _settings(args)
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR, the run to continue")
        if args.preset:
            raise ConfigError("a resumed run keeps its settings: remove --preset")
        unused = sorted(set(values) - {"iterations", "minutes", "threads"})
        if unused:
            raise ConfigError("a resumed run keeps its settings; only --iterations, --minutes "
                              f"and --threads may change (remove {', '.join(unused)})")
        changes = {k: settings.coerce_field(settings.RunSettings, k, v)
                   for k, v in values.items()}
        run = train(None, args.out, resume=True, progress=True,
                    log_interval=60.0 if args.no_progress else None, command=command,
                    **changes)
        out = Path(args.out)
    else:
        cfg = _resolve(args, values)
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return
        name = cfg.env if args.task == "rl" else f"{cfg.task}-{cfg.algo}"
        out = Path(args.out or f"runs/{'rl-' if args.task == 'rl' else ''}"
                   f"{name.replace(':', '.')}-{time.strftime('%Y%m%d-%H%M%S')}")
        print(f"run directory: {out}")
        run = train(cfg, out, progress=True, log_interval=60.0 if args.no_progress else None,
                    command=command)
    if run.stopped or not run.main or args.no_eval:
        return  # a signal stopped the run (checkpoint written), or another rank evaluates
    _print_eval(out, out=None, which=_default_checkpoint(out))


def _resolve(args: argparse.Namespace, values: dict[str, Any]) -> Any:
    if args.task == "rl":
        from metagrad.training.rl import resolve_rl

        if args.preset:
            raise ConfigError("train rl has no presets: --env starts from that environment's "
                              "paper settings")
        return resolve_rl(values)
    return settings.resolve(args.task, args.preset, values)


def _eval_dir(run_dir: Path, which: str, tasks: int | None, split: str = "test") -> Path:
    """A new folder for an evaluation, never an existing one, named by the checkpoint, the
    number of tasks (``tasks``, else the run's ``eval_tasks``) and a split other than test."""
    from metagrad.training.loop import read_config

    tasks = tasks or read_config(run_dir).eval_tasks
    base = run_dir / f"eval-{which}-{tasks}tasks{'' if split == 'test' else '-' + split}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _default_checkpoint(run_dir: Path) -> str:
    """The validation-selected checkpoint, or the last one of a run never validated."""
    from metagrad.training.checkpoint import CheckpointDir

    return CheckpointDir(Path(run_dir) / "checkpoints").preferred()


def _print_eval(run_dir: Path, out: Path | None, which: str, **kwargs: Any) -> None:
    from metagrad.training.loop import read_config
    from metagrad.training.report import (
        conditioning_only,
        evaluate_run,
        format_gains,
        format_table,
    )

    cfg = read_config(run_dir)
    if hasattr(cfg, "env"):
        from metagrad.training.rl import print_rl_eval

        for flag, value in (("--report-steps", kwargs.pop("report_steps", None)),
                            ("--no-baselines", not kwargs.pop("baselines", True)),
                            ("--split", kwargs.pop("split", "test") != "test")):
            if value:
                raise ConfigError(f"{flag} applies to supervised runs; {run_dir} is a meta-RL "
                                  "run (it reports every step up to --steps)")
        kwargs.pop("shots", None)
        kwargs.pop("device", None)
        print_rl_eval(run_dir, which=which, out=out, **kwargs)
        return
    kwargs.pop("rollouts", None)
    baselines = kwargs.pop("baselines", True)
    rows, figures = evaluate_run(run_dir, which=which, out=out, scratch=baselines,
                                 pretrained=baselines, **kwargs)
    metric = "accuracy (%)" if rows and rows[0].ways is not None else "mse"
    data = (out or run_dir) / "eval.json"
    iteration = json.loads(data.read_text())["iteration"]
    print(f"\nevaluating the {which} checkpoint (iteration {iteration}): query {metric}, mean "
          f"± 95% CI over {rows[0].tasks} {rows[0].split} tasks, after N steps:")
    steps = sorted({r.steps for r in rows})
    shown = tuple(s for s in steps if s in (0, 1, 3, 5, 10) or s == steps[-1]
                  or kwargs.get("report_steps") is not None)
    print(format_table(rows, metric.split()[0], shown))
    if gains := format_gains(rows, metric.split()[0]):
        print(gains)
    for method in conditioning_only(rows):
        print(f"({method} takes no gradient steps: its 0-steps column is its {metric} after "
              "conditioning on the support set)")
    print(f"\nwrote {data}")
    for f in figures:
        print(f"figure: {f}")


def _refuse_unknown(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    extra: list[str]) -> None:
    """Explains a flag that belongs to another algorithm, task or to meta-RL; argparse's own
    message for anything else."""
    flags = [a for a in extra if a.startswith("--")]
    if args.command == "train" and flags:
        name = flags[0][2:].split("=")[0].replace("-", "_")
        from metagrad.rl.settings import RLConfig

        rl_fields = {f.name for f in dataclasses.fields(RLConfig)}
        if args.task == "rl":
            if name in settings.SHARED_FIELDS or name in settings.LEGACY_FIELDS:
                raise ConfigError(f"setting {name!r} is not a meta-RL setting; meta-RL takes "
                                  f"{', '.join(sorted(rl_fields))}")
        else:
            task, algo = _task_and_algo(args.task, getattr(args, 'set_algo', None),
                                        args.config)
            if name in rl_fields:
                raise ConfigError(f"setting {name!r} belongs to meta-RL (`metagrad train rl "
                                  f"--env ...`), not to task {task!r}")
            raise ConfigError(settings.not_accepted(name, task, algo,
                                                    settings.fields_for(task, algo)))
    parser.error(f"unrecognized arguments: {' '.join(extra)}")


def _data(dataset: str, root: Path | None, url: str | None) -> None:
    """Fetches (with ``url``) and checks ``dataset``: both files, their checksums, one full decode;
    prints what was found and where the decoded cache is."""
    from metagrad.tasks import omniglot

    folder = omniglot.find_omniglot(root, download=url is not None,
                                    base_url=url or omniglot.OFFICIAL_BASE_URL)
    omniglot.check_omniglot(folder)
    data = omniglot.load_omniglot(folder)
    characters, drawings = data.images.shape[:2]
    print(f"{dataset} in {folder}: both zips present, checksums verified; "
          f"{characters} classes (characters), {characters * drawings} images "
          f"({drawings} per class, {tuple(data.images.shape[2:])} pixels)")
    print(f"decoded cache: {omniglot.cache_path(folder)}")


def _presets() -> None:
    from metagrad.tasks import TASKS
    from metagrad.training.rl import ENV_DEFAULTS

    for task in TASKS:
        for name, values in settings.presets_of(task).items():
            print(f"metagrad train {task} --preset {name}: "
                  + ", ".join(f"{k}={v}" for k, v in values.items()))
    for env, values in ENV_DEFAULTS.items():
        print(f"metagrad train rl --env {env} (paper settings): "
              + ", ".join(f"{k}={v}" for k, v in values.items()))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser(argv)
        args, extra = parser.parse_known_args(argv)
        if extra:
            _refuse_unknown(parser, args, extra)
        if args.command == "train":
            _train(args, shlex.join(["metagrad", *argv]))
        elif args.command == "eval":
            which = args.checkpoint or _default_checkpoint(args.run_dir)
            if args.out is not None:
                from metagrad.training.run import check_directory

                check_directory(args.out)
            out = args.out or _eval_dir(args.run_dir, which, args.tasks, args.split)
            _print_eval(args.run_dir, out, which=which, tasks=args.tasks,
                        steps=args.steps, shots=args.shots, rollouts=args.rollouts,
                        device=args.device, report_steps=args.report_steps,
                        baselines=not args.no_baselines, eval_seed=args.eval_seed,
                        split=args.split)
        elif args.command == "presets":
            _presets()
        elif args.command == "data":
            _data(args.dataset, args.root, args.download)
        return 0
    except MetagradError as exc:
        if debug:
            raise
        print(f"metagrad: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # paths, permissions, a full disk: the user's to fix
        if debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"metagrad: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metagrad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
