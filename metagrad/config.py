"""Typed experiment configuration: defaults < task preset < config file < command-line flags.

Every field can be set from a YAML file or as ``--field-name VALUE`` on the command line;
unknown keys are refused with the closest valid name suggested.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metagrad.errors import ConfigError

TASKS = ("sinusoid", "omniglot", "miniimagenet")
ALGORITHMS = ("maml", "metasgd", "mamlpp", "anil", "reptile", "imaml", "cavia", "blackbox")
MODELS = ("auto", "conv", "mlp")


@dataclass
class ExperimentConfig:
    """One supervised meta-learning experiment (see README for each field's meaning)."""

    task: str = "sinusoid"
    algo: str = "maml"
    # tasks
    ways: int = 5
    shots: int = 10
    queries: int = 10
    data: str | None = None
    split: str = "paper"
    rotations: bool = True
    model: str = "auto"
    # inner loop
    inner_lr: float = 0.01
    inner_steps: int = 1
    first_order: bool = False
    learn_inner_lr: bool = False
    transductive: bool = True
    batching: str = "auto"
    compile: bool = False
    checkpoint_inner_steps: bool = False
    # algorithm-specific (used by the algorithm named in the key)
    mamlpp_multi_step_loss: bool = True
    mamlpp_msl_epochs: int = 10
    mamlpp_first_order_epochs: int = 0
    mamlpp_step_lrs: bool = True
    mamlpp_per_step_bn: bool = False
    iterations_per_epoch: int = 500
    imaml_lambda: float = 1.0
    imaml_cg_iterations: int = 5
    cavia_context_dim: int = 5
    blackbox_width: int = 128
    blackbox_layers: int = 2
    blackbox_heads: int = 4
    # outer loop
    meta_batch: int = 25
    meta_lr: float = 1e-3
    meta_optimizer: str = "adam"
    meta_lr_schedule: str = "constant"
    min_meta_lr: float = 1e-5
    iterations: int = 70000
    # the "pretrained on all tasks, then fine-tuned" baseline (trained beside MAML)
    baseline: bool = True
    baseline_iterations: int | None = None
    # validation and evaluation
    val_every: int = 1000
    val_tasks: int = 100
    eval_tasks: int = 600
    eval_steps: int = 10
    eval_shots: list[int] = field(default_factory=lambda: [5, 10])
    eval_queries: int | None = None
    eval_lr: float | None = None
    # run
    seed: int = 0
    threads: int | None = None
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3

    def validate(self) -> ExperimentConfig:
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.algo not in ALGORITHMS:
            raise ConfigError(_unknown("algorithm", self.algo, ALGORITHMS))
        for name in ("ways", "shots", "queries", "inner_steps", "meta_batch", "iterations",
                     "val_every", "val_tasks", "eval_tasks", "log_every", "checkpoint_every",
                     "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.eval_steps < 0:
            raise ConfigError(f"eval_steps must be >= 0, got {self.eval_steps}")
        for name in ("inner_lr", "meta_lr", "eval_lr"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if not self.eval_shots or any(s < 1 for s in self.eval_shots):
            raise ConfigError(f"eval_shots must list positive integers, got {self.eval_shots}")
        if self.batching not in ("auto", "vmap", "loop"):
            raise ConfigError(_unknown("batching", self.batching, ("auto", "vmap", "loop")))
        if self.meta_optimizer not in ("adam", "sgd"):
            raise ConfigError(_unknown("meta_optimizer", self.meta_optimizer, ("adam", "sgd")))
        if self.meta_lr_schedule not in ("constant", "cosine"):
            raise ConfigError(_unknown("meta_lr_schedule", self.meta_lr_schedule,
                                       ("constant", "cosine")))
        if self.model not in MODELS:
            raise ConfigError(_unknown("model", self.model, MODELS))
        if self.algo == "cavia" and self.task != "sinusoid":
            raise ConfigError("cavia concatenates its context to flat inputs and is available "
                              "for sinusoid regression; image tasks would need FiLM layers")
        if self.compile and self.algo in ("reptile", "imaml", "mamlpp"):
            raise ConfigError(f"compile is available for maml, metasgd, anil and cavia, not "
                              f"{self.algo} (its outer step is not one differentiable loss)")
        if self.algo == "blackbox":
            self._validate_blackbox()
        if self.checkpoint_inner_steps:
            if self.algo in ("anil", "reptile", "imaml"):
                raise ConfigError(
                    f"checkpoint_inner_steps saves the memory of second-order inner steps (maml, "
                    f"metasgd, mamlpp, cavia); {self.algo} keeps no large inner graph")
            if self.compile or self.batching == "vmap":
                raise ConfigError("checkpoint_inner_steps works with looped tasks only: remove "
                                  "compile and batching=vmap")
        if self.algo == "imaml" and self.learn_inner_lr:
            raise ConfigError("imaml uses a fixed inner rate: remove learn_inner_lr")
        if self.task == "omniglot" and self.split not in ("paper", "background"):
            raise ConfigError(_unknown("split", self.split, ("paper", "background")))
        if self.ways < 2 and self.task != "sinusoid":
            raise ConfigError(f"classification needs ways >= 2, got {self.ways}")
        return self

    def _validate_blackbox(self) -> None:
        """The black box has no inner loop: refuse the inner-loop switches a user may set on
        purpose (inner_lr, inner_steps and transductive, which presets set, are ignored)."""
        for name in ("blackbox_width", "blackbox_layers", "blackbox_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.blackbox_width % self.blackbox_heads:
            raise ConfigError(f"blackbox_width={self.blackbox_width} must be divisible by "
                              f"blackbox_heads={self.blackbox_heads}")
        no_inner_loop = "blackbox conditions on the support set and takes no inner gradient steps"
        if self.first_order:
            raise ConfigError(f"{no_inner_loop}: first_order does not apply; remove it")
        if self.learn_inner_lr:
            raise ConfigError(f"{no_inner_loop}: there is no inner rate to learn; remove "
                              "learn_inner_lr")
        if self.compile:
            raise ConfigError("compile is available for maml, metasgd, anil and cavia, not "
                              "blackbox (a plain network forward; nothing to fuse)")
        if self.batching != "auto":
            raise ConfigError(f"{no_inner_loop}: batching={self.batching!r} does not apply (all "
                              "tasks go through one batched forward pass); remove it")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(ExperimentConfig)}

# Run settings shared by the classification presets (60,000 iterations as in the paper).
_CLASSIFICATION_RUN: dict[str, Any] = dict(
    meta_lr=1e-3, iterations=60000, eval_queries=15, baseline=False, val_every=500,
    val_tasks=200, checkpoint_every=250)

# Settings of the MAML paper (Finn et al. 2017, §5.1 and appendix A.1), per task.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "omniglot": {
        # 5-way; 20-way presets are selected by --ways 20 (see resolve())
        "paper": dict(_CLASSIFICATION_RUN, ways=5, shots=1, queries=1, inner_lr=0.4,
                      inner_steps=1, meta_batch=32, eval_steps=3),
        "paper-20way": dict(_CLASSIFICATION_RUN, ways=20, shots=1, queries=1, inner_lr=0.1,
                            inner_steps=5, meta_batch=16, eval_steps=5),
    },
    "miniimagenet": {
        "paper": dict(_CLASSIFICATION_RUN, ways=5, shots=1, queries=15, inner_lr=0.01,
                      inner_steps=5, meta_batch=4, eval_steps=10),
        "paper-5shot": dict(_CLASSIFICATION_RUN, ways=5, shots=5, queries=15, inner_lr=0.01,
                            inner_steps=5, meta_batch=2, eval_steps=10),
    },
    "sinusoid": {
        "paper": dict(shots=10, queries=10, inner_lr=0.01, inner_steps=1, meta_batch=25,
                      meta_lr=1e-3, iterations=70000, eval_steps=10, eval_shots=[5, 10],
                      eval_queries=100),
        "quick": dict(shots=10, queries=10, inner_lr=0.01, inner_steps=1, meta_batch=25,
                      meta_lr=1e-3, iterations=4000, val_every=500, checkpoint_every=500,
                      eval_steps=10, eval_shots=[5, 10], eval_queries=100),
    },
}


def _unknown(kind: str, value: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {value!r}.{hint} Valid: {', '.join(choices)}"


def coerce(name: str, value: Any) -> Any:
    """Converts a value from YAML or the command line to the field's type, or explains why not."""
    if name not in FIELDS:
        raise ConfigError(_unknown("setting", name, list(FIELDS)))
    default = FIELDS[name].default
    if default is dataclasses.MISSING:
        default = FIELDS[name].default_factory()  # type: ignore[misc]
    annotation = str(FIELDS[name].type)
    try:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if "None" not in annotation:
                raise ConfigError(f"{name} cannot be empty")
            return None
        if isinstance(default, bool) or annotation == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if annotation.startswith("list[int]"):
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            return [int(v) for v in value]
        if "int" in annotation and "float" not in annotation:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if "float" in annotation:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read {value!r} as {annotation}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting: value")
    return data


def resolve(task: str, preset: str | None = None, overrides: dict[str, Any] | None = None
            ) -> ExperimentConfig:
    """The configuration for ``task``: defaults, then the task preset, then ``overrides``."""
    if task not in TASKS:
        raise ConfigError(_unknown("task", task, TASKS))
    overrides = {k: coerce(k, v) for k, v in (overrides or {}).items()}
    presets = PRESETS.get(task, {})
    if preset is None:  # the paper's settings for the ways/shots asked for
        preset = "paper"
        if task == "omniglot" and overrides.get("ways", 5) >= 20:
            preset = "paper-20way"
        elif task == "miniimagenet" and overrides.get("shots", 1) >= 5:
            preset = "paper-5shot"
    if presets and preset not in presets:
        raise ConfigError(_unknown(f"preset for {task}", preset, list(presets)))
    values: dict[str, Any] = {"task": task, **presets.get(preset, {}), **overrides}
    if task == "omniglot" and "queries" not in overrides:
        values["queries"] = values.get("shots", 1)  # the paper's code: K query images per class
    return ExperimentConfig(**values).validate()


def from_dict(data: dict[str, Any]) -> ExperimentConfig:
    return ExperimentConfig(**{k: coerce(k, v) for k, v in data.items()}).validate()
