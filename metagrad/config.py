"""Typed settings and the one parser that reads them, for supervised and meta-RL runs alike.

A run's configuration is a dataclass of shared fields (:class:`ExperimentConfig` for supervised
meta-learning, a :class:`RunSettings`; :class:`~metagrad.rl.settings.RLConfig` for meta-RL, a
frozen dataclass that declares every field of :class:`RunSettings` with its own defaults) plus,
for supervised runs, the chosen task's ``Options`` and the chosen
algorithm's ``Options`` (dataclasses declared in their own files). Values come from, in order:
defaults < task preset < config file < command-line flags. Every field documents itself
(``metadata["help"]``), which is what ``--help`` prints, and states its range (``min``, ``max``),
which :func:`check_ranges` enforces; unknown keys are refused with the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from metagrad.algorithms import ALGORITHMS
from metagrad.algorithms.base import Capabilities, LearnerSettings, NoOptions
from metagrad.errors import ConfigError
from metagrad.parsing import (
    coerce_field,
    describe_type,
    load_yaml,
    setting,
    type_hints,
    unknown,
    validate_fields,
)
from metagrad.tasks import TASKS

__all__ = ["ExperimentConfig", "RunSettings", "coerce_field", "describe_type", "from_dict",
           "load_yaml", "resolve", "setting", "type_hints", "validate_fields"]

# -- shared settings -----------------------------------------------------------------------------

Device = str
"""``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""


@dataclass
class RunSettings:
    """The run settings every training has, supervised or meta-RL."""

    iterations: int = setting(70000, "meta-iterations to train", min=1, group="run")
    minutes: float | None = setting(
        None, "also stop when training has taken this many minutes (validation and checkpoints "
        "included; none: no time limit); a cosine schedule then anneals over whichever ends "
        "first, the iterations or the minutes", above=0, group="run")
    seed: int = setting(0, "seed of initial weights, task sampling and everything random",
                        min=0, group="run")
    device: Device = setting("auto", "auto, cpu, cuda or cuda:N (under torchrun: the local "
                             "rank's GPU)", group="run")
    threads: int | None = setting(None, "CPU threads for torch (none: torch's default)", min=1,
                                  group="run")
    val_every: int = setting(1000, "validate (and keep the best checkpoint) every N iterations",
                             min=1, group="run")
    log_every: int = setting(50, "write a metrics.jsonl record every N iterations", min=1,
                             group="run")
    checkpoint_every: int = setting(1000, "write a checkpoint every N iterations", min=1,
                                    group="run")
    keep_checkpoints: int = setting(3, "how many recent checkpoints to keep", min=1, group="run")
    init_from: str | None = setting(
        None, "start the learners' weights (parameters, learned rates, buffers) from this "
        "checkpoint: a run directory (its best checkpoint, else its last) or a checkpoint file; "
        "optimizer, schedule, iteration count and random streams start afresh", group="run")
    log: list[Literal["csv", "tensorboard"]] = setting(
        help="also log the metrics.jsonl records to metrics.csv (csv) and/or tensorboard/ "
        "(tensorboard; needs `pip install tensorboard`), e.g. --log csv,tensorboard",
        group="run", default_factory=list)


@dataclass
class ExperimentConfig(RunSettings):
    """One supervised meta-learning experiment: the shared fields, then ``task_options`` (the
    task's ``Options``) and ``algo_options`` (the algorithm's ``Options``)."""

    task: str = setting("sinusoid", "task name, or package.module:factory", group="task")
    algo: str = setting("maml", "algorithm name, or package.module:Class", group="inner loop")
    # tasks
    shots: int = setting(10, "examples per class (per task for regression) in the support set",
                         min=1, group="task")
    queries: int | None = setting(None, "query examples per class (per task for regression) in "
                                  "meta-training (none: as many as shots, as in the MAML "
                                  "reference code)", min=1, group="task")
    # inner loop
    inner_lr: float = setting(0.01, "α, the inner-loop step size", above=0, group="inner loop")
    inner_steps: int = setting(1, "K, inner steps in meta-training", min=1, group="inner loop")
    first_order: bool = setting(False, "first-order approximation of the meta-gradient",
                                group="inner loop")
    learn_inner_lr: bool = setting(False, "learn α per parameter element (Meta-SGD)",
                                   group="inner loop")
    transductive: bool = setting(True, "queries normalised with their own batch statistics "
                                 "(the MAML paper's BatchNorm)", group="inner loop")
    batching: Literal["auto", "vmap", "loop"] = setting(
        "auto", "how tasks are batched: vmap, a loop, or auto (vmap where verified exact)",
        group="inner loop")
    compile: bool = setting(False, "torch.compile the meta-gradient", group="inner loop")
    checkpoint_inner_steps: bool = setting(False, "recompute inner steps in the meta-backward "
                                           "(less memory, same gradient)", group="inner loop")
    precision: Literal["fp32", "bf16", "fp16"] = setting(
        "fp32", "fp32; bf16: query forwards in bfloat16, inner loop in float32; fp16: the same "
        "in float16 (CUDA only)", group="inner loop")
    memory_format: Literal["auto", "channels_last", "contiguous"] = setting(
        "auto", "layout of the query images of looped tasks: channels_last (NHWC, what oneDNN's "
        "CPU convolutions run fastest on), contiguous (as given), or auto (channels_last on CPU "
        "for convolutional models of known layers)", group="inner loop")
    # outer loop
    meta_batch: int = setting(25, "tasks per meta-iteration", min=1, group="outer loop")
    meta_lr: float = setting(1e-3, "β, the outer optimizer's learning rate", above=0,
                             group="outer loop")
    meta_optimizer: Literal["adam", "sgd"] = setting("adam", "outer optimizer",
                                                     group="outer loop")
    meta_lr_schedule: Literal["constant", "cosine"] = setting(
        "constant", "constant β, or cosine annealing to min_meta_lr over the run's iterations",
        group="outer loop")
    min_meta_lr: float = setting(1e-5, "final β of the cosine schedule", min=0,
                                 group="outer loop")
    baseline: bool = setting(True, "also train the pretrained-on-all-tasks baseline on the "
                             "same batches", group="outer loop")
    # validation and evaluation
    val_tasks: int = setting(100, "validation tasks (the same set whatever the seed)", min=1,
                             group="evaluation")
    eval_tasks: int = setting(600, "test tasks at evaluation", min=1, group="evaluation")
    eval_steps: int = setting(10, "largest number of adaptation steps at evaluation", min=0,
                              group="evaluation")
    eval_shots: list[int] = setting(help="shots evaluated (regression; classification "
                                    "evaluates shots)", min=1, group="evaluation",
                                    default_factory=lambda: [5, 10])
    eval_queries: int | None = setting(None, "query examples per class at validation and "
                                       "evaluation (none: queries)", min=1, group="evaluation")
    eval_seed: int = setting(0, "seed of the test tasks and of the baselines' step-size "
                             "validation tasks, independent of the training seed: runs evaluated "
                             "with one eval_seed meet the same test tasks", min=0,
                             group="evaluation")
    task_options: Any = field(default=None, repr=False, metadata={"internal": True})
    algo_options: Any = field(default=None, repr=False, metadata={"internal": True})

    # -- structure ----------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        """An option of the task or the algorithm by its flat name (``cfg.ways``)."""
        if name.startswith("__") or name in ("task_options", "algo_options"):
            raise AttributeError(name)
        for options in (self.task_options, self.algo_options):
            if options is not None and hasattr(options, name):
                return getattr(options, name)
        raise AttributeError(f"{type(self).__name__} has no setting {name!r} for task "
                             f"{self.task!r} with algorithm {self.algo!r}")

    def shared_items(self) -> Iterator[tuple[str, Any]]:
        for f in dataclasses.fields(self):
            if not f.metadata.get("internal"):
                yield f.name, getattr(self, f.name)

    def to_dict(self) -> dict[str, Any]:
        """Flat settings (shared, then the task's, then the algorithm's), as in config.yaml."""
        values = dict(self.shared_items())
        for options in (self.task_options, self.algo_options):
            if options is not None:
                values.update(dataclasses.asdict(options))
        return values

    @property
    def capabilities(self) -> Capabilities:
        """What the chosen algorithm can use (its class's ``capabilities``)."""
        return algorithm_class(self.algo).capabilities

    def learner_settings(self, classes: int | None, device: Any) -> LearnerSettings:
        """The shared settings an algorithm is built from."""
        names = {f.name for f in dataclasses.fields(LearnerSettings)} - {"classes", "device"}
        return LearnerSettings(**{n: getattr(self, n) for n in names}, classes=classes,
                               device=device)

    def validate(self) -> ExperimentConfig:
        """Ranges of every field, and the settings the algorithm cannot use refused."""
        validate_fields(self)
        if self.min_meta_lr > self.meta_lr and self.meta_lr_schedule == "cosine":
            raise ConfigError(f"min_meta_lr={self.min_meta_lr} is above meta_lr={self.meta_lr}; "
                              "the cosine schedule anneals from meta_lr down to min_meta_lr")
        self.capabilities.check(self.learner_settings(None, "cpu"), self.algo)
        if self.checkpoint_inner_steps and (self.compile or self.batching == "vmap"):
            raise ConfigError("checkpoint_inner_steps works with looped tasks only: remove "
                              "compile and batching=vmap")
        return self


SHARED_FIELDS = {f.name: f for f in dataclasses.fields(ExperimentConfig)
                 if not f.metadata.get("internal")}


def algorithm_class(name: str) -> Any:
    return ALGORITHMS.get(name)


def task_factory(name: str) -> Any:
    return TASKS.get(name)


def options_class(owner: Any) -> type:
    """The ``Options`` dataclass an algorithm class or a task factory declares."""
    options = getattr(owner, "Options", None)
    return options if options is not None else NoOptions


def fields_for(task: str, algo: str) -> dict[str, tuple[type, dataclasses.Field]]:
    """Every setting a run of ``task`` with ``algo`` accepts: name -> (owning dataclass, field)."""
    found: dict[str, tuple[type, dataclasses.Field]] = {
        n: (ExperimentConfig, f) for n, f in SHARED_FIELDS.items()}
    for owner in (options_class(task_factory(task)), options_class(algorithm_class(algo))):
        for f in dataclasses.fields(owner):
            if f.name in found and found[f.name][0] is not ExperimentConfig:
                raise ConfigError(f"setting {f.name!r} is declared by both the task and the "
                                  "algorithm; rename one of them")
            found[f.name] = (owner, f)
    return found


LEGACY_FIELDS = frozenset({
    "ways", "data", "split", "rotations", "model", "mamlpp_multi_step_loss", "mamlpp_msl_epochs",
    "mamlpp_first_order_epochs", "mamlpp_step_lrs", "mamlpp_per_step_bn", "iterations_per_epoch",
    "imaml_lambda", "imaml_cg_iterations", "cavia_context_dim", "blackbox_width",
    "blackbox_layers", "blackbox_heads", "baseline_iterations", "eval_lr"})
"""Fields that config.yaml files written before per-task and per-algorithm options held for every
run; reading such a file ignores the ones that do not apply."""


def from_dict(values: dict[str, Any], *, stored: bool = False) -> ExperimentConfig:
    """The configuration for flat ``values`` (YAML, command-line strings). Unknown settings are
    refused, with the closest valid name; a setting of another algorithm or task says so.
    ``stored``: ``values`` come from a run's config.yaml, possibly written by an older version
    (its inapplicable legacy fields are ignored; without ``eval_seed`` its test tasks were drawn
    from the training ``seed``, which therefore stands in, so that its evaluation reproduces)."""
    task = str(values.get("task", "sinusoid"))
    algo = str(values.get("algo", "maml"))
    task, algo = TASKS.canonical(task), ALGORITHMS.canonical(algo)
    accepted = fields_for(task, algo)
    parsed: dict[type, dict[str, Any]] = {}
    for name, value in values.items():
        if name not in accepted:
            if stored and name in LEGACY_FIELDS:
                continue
            raise ConfigError(not_accepted(name, task, algo, accepted))
        owner, _ = accepted[name]
        parsed.setdefault(owner, {})[name] = coerce_field(owner, name, value)
    shared = parsed.pop(ExperimentConfig, {})
    shared.update(task=task, algo=algo)
    if stored and "eval_seed" not in values:
        shared["eval_seed"] = shared.get("seed", SHARED_FIELDS["seed"].default)
    if shared.get("queries") is None:
        shared["queries"] = shared.get("shots", SHARED_FIELDS["shots"].default)
    task_cls = options_class(task_factory(task))
    algo_cls = options_class(algorithm_class(algo))
    cfg = ExperimentConfig(**shared, task_options=_build_options(task_cls, parsed.get(task_cls)),
                           algo_options=_build_options(algo_cls, parsed.get(algo_cls)))
    return cfg.validate()


def _build_options(cls: type, values: dict[str, Any] | None) -> Any:
    try:
        options = cls(**(values or {}))
    except TypeError as exc:  # a required option without a value
        raise ConfigError(f"{cls.__name__}: {exc}") from None
    validate_fields(options)
    return options


def not_accepted(name: str, task: str, algo: str,
                 accepted: dict[str, tuple[type, dataclasses.Field]]) -> str:
    """Why setting ``name`` is refused: it belongs to another algorithm, or the closest valid
    name."""
    for other in ALGORITHMS:
        if other != algo and ":" not in other:
            cls = algorithm_class(other)
            if name in {f.name for f in dataclasses.fields(options_class(cls))}:
                return (f"setting {name!r} belongs to algorithm {other!r}, not {algo!r}; add "
                        f"--algo {other} or remove it")
    close = difflib.get_close_matches(name, list(accepted), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (f"unknown setting {name!r} for task {task!r} with algorithm {algo!r}.{hint} "
            f"`metagrad train {task} --algo {algo} --help` lists the settings")


def presets_of(task: str) -> dict[str, dict[str, Any]]:
    return dict(getattr(task_factory(task), "presets", {}) or {})


def resolve(task: str, preset: str | None = None, overrides: dict[str, Any] | None = None
            ) -> ExperimentConfig:
    """The configuration for ``task``: defaults, then the task's preset (``preset``, else the
    one the task chooses for ``overrides``), then ``overrides``."""
    task = TASKS.canonical(task)
    overrides = dict(overrides or {})
    overrides.pop("task", None)
    algo = ALGORITHMS.canonical(str(overrides.get("algo", "maml")))
    accepted = fields_for(task, algo)
    typed = {}
    for k, v in overrides.items():
        if k not in accepted:
            raise ConfigError(not_accepted(k, task, algo, accepted))
        typed[k] = coerce_field(accepted[k][0], k, v)
    _, values = chosen_preset(task, preset, typed)
    return from_dict({**values, **typed, "task": task})


def chosen_preset(task: str, preset: str | None, overrides: dict[str, Any]
                  ) -> tuple[str | None, dict[str, Any]]:
    """The preset :func:`resolve` applies to ``task`` (``preset``, else the one the task
    chooses for ``overrides``; ``None``: none) and its settings."""
    presets = presets_of(task)
    if preset is None:
        choose = getattr(task_factory(task), "default_preset", None)
        preset = choose(overrides) if choose is not None else None
    if preset is not None and preset not in presets:
        raise ConfigError(unknown(f"preset for {task}", preset, list(presets) or ["(none)"]))
    return preset, dict(presets[preset]) if preset else {}
