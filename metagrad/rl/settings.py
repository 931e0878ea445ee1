"""Settings of a MAML-RL run (:class:`RLConfig`); each field's one-line help is in its
``metadata["help"]`` (``dataclasses.fields(RLConfig)``)."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from types import UnionType
from typing import Any, Literal, get_args, get_origin, get_type_hints

from metagrad.errors import ConfigError
from metagrad.rl.trpo import HVPMode


def setting(default: Any, help: str) -> Any:
    """A dataclass field with its command-line help."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RLConfig:
    """Settings of MAML-RL; the defaults are the paper's 2-D navigation ones
    (Finn et al. 2017, §5.3 and App. A.2)."""

    env: str = setting("navigation2d", "Environment: a registered name (metagrad.rl.envs.ENVS) or "
                       "'package.module:factory'; unused when an env object is given.")
    method: Literal["maml", "pretrain"] = setting(
        "maml", "maml, or pretrain: the paper's baseline, the TRPO update of the unadapted "
        "policy on all tasks.")
    meta_batch: int = setting(20, "Tasks per meta-iteration (paper: 20 for 2-D navigation, 40 "
                              "for locomotion).")
    rollouts: int = setting(20, "Episodes per task, before and after each adaptation step "
                            "(paper: 20).")
    horizon: int | None = setting(None, "Episode length; None = the environment's (100 "
                                  "navigation, 200 locomotion).")
    inner_lr: float = setting(0.1, "α of the adaptation steps in training (and of the first "
                              "step at evaluation).")
    inner_steps: int = setting(1, "Adaptation steps K in training, each on episodes sampled "
                               "with the policy adapted so far.")
    eval_inner_lr: float = setting(0.05, "α of the second and later adaptation steps at "
                                   "evaluation (App. A.2).")
    first_order: bool = setting(False, "Meta-gradient without the second-order terms of the "
                                "adaptation steps.")
    max_kl: float = setting(0.01, "TRPO trust region δ on the mean KL.")
    cg_iters: int = setting(10, "Conjugate-gradient iterations of the TRPO step.")
    cg_damping: float = setting(1e-5, "Damping added to the KL's Hessian in conjugate gradient.")
    ls_steps: int = setting(15, "Backtracking line-search steps of TRPO.")
    ls_backtrack: float = setting(0.8, "Step shrink factor of the line search.")
    gamma: float = setting(0.99, "Discount γ.")
    gae_lambda: float = setting(1.0, "λ of generalised advantage estimation.")
    normalize_advantages: bool = setting(True, "Centre and scale the advantages per task (the "
                                         "authors' code, center_adv).")
    hidden: tuple[int, ...] = setting((100, 100), "Hidden layer widths of the policy's mean.")
    seed: int = setting(0, "Seed of the initial weights, tasks and episodes.")
    hvp: HVPMode = setting(  # noqa: RUF009 (a str default, immutable)
        "exact", "Hessian-of-KL products: double backward (exact) or finite_difference.")
    fvp_fraction: float = setting(
        0.25, "Share of the meta-batch's tasks (drawn afresh) on which the KL's Hessian, the "
        "trust-region metric, is computed (Schulman et al. 2015, App. C.1); 1.0 = all tasks.")
    nav_normalized_actions: bool = setting(
        True, "2-D navigation: actions in units of the bound, the move being clip(0.1·a, ±0.1) "
        "(rllab's normalize wrapper), rather than clip(a, ±0.1).")
    nav_reward: Literal["distance", "squared_distance"] = setting(
        "distance", "2-D navigation reward: −‖x − g‖ (the authors' code; the paper's returns are "
        "on this scale) or −‖x − g‖² (the paper's text).")
    # run (metagrad.training.rl)
    iterations: int = setting(500, "Meta-iterations (paper: up to 500).")
    eval_tasks: int = setting(40, "Held-out tasks at evaluation.")
    eval_rollouts: int = setting(40, "Episodes per test task and adaptation step at evaluation.")
    eval_steps: int = setting(3, "Adaptation steps at evaluation.")
    val_every: int = setting(
        10, "Validate every this many meta-iterations: the return averaged over 1..eval_steps "
        "steps on val_tasks tasks of a fixed seed; the best is kept as checkpoints/best.")
    val_tasks: int = setting(20, "Tasks of the validation.")
    baseline: bool = setting(True, "Also train the pretrained policy (method=pretrain) on the "
                             "same task batches.")
    checkpoint_every: int = setting(10, "Save a checkpoint every this many meta-iterations.")
    keep_checkpoints: int = setting(3, "Periodic checkpoints kept.")
    log_every: int = setting(1, "Write metrics.jsonl every this many meta-iterations.")
    threads: int | None = setting(None, "torch intra-op threads (None: torch's default).")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N (under torchrun: the local rank's "
                          "GPU): where the policy is trained.")
    env_threads: int = setting(0, "MuJoCo environments: threads of the batched mujoco.rollout "
                               "(0 = the calling thread).")

    def __post_init__(self) -> None:
        if self.method not in ("maml", "pretrain"):
            raise ConfigError(f"method must be 'maml' or 'pretrain', got {self.method!r}")
        if self.hvp not in ("exact", "finite_difference"):
            raise ConfigError(f"hvp must be 'exact' or 'finite_difference', got {self.hvp!r}")
        if self.nav_reward not in ("distance", "squared_distance"):
            raise ConfigError(
                f"nav_reward must be 'distance' or 'squared_distance', got {self.nav_reward!r}"
            )
        for name in ("meta_batch", "rollouts", "inner_steps", "cg_iters", "ls_steps",
                     "iterations", "eval_tasks", "eval_rollouts", "val_every", "val_tasks",
                     "checkpoint_every", "keep_checkpoints", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("horizon", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(
                    f"{name} must be a positive integer or None, got {getattr(self, name)!r}"
                )
        if not isinstance(self.env_threads, int) or self.env_threads < 0:
            raise ConfigError(f"env_threads must be an integer >= 0, got {self.env_threads!r}")
        if self.eval_steps < 0:
            raise ConfigError(f"eval_steps must be >= 0, got {self.eval_steps!r}")
        if not 0 < self.fvp_fraction <= 1:
            raise ConfigError(f"fvp_fraction must lie in (0, 1], got {self.fvp_fraction!r}")
        for name in ("inner_lr", "eval_inner_lr", "max_kl"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.ls_backtrack < 1:
            raise ConfigError(f"ls_backtrack must lie in (0, 1), got {self.ls_backtrack!r}")
        if self.cg_damping < 0:
            raise ConfigError(f"cg_damping must be >= 0, got {self.cg_damping!r}")
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ConfigError(
                f"gamma and gae_lambda must lie in [0, 1], got {self.gamma}, {self.gae_lambda}"
            )

    @classmethod
    def coerce(cls, name: str, value: Any) -> Any:
        """``value`` (e.g. a YAML value or a command-line string) as the type of field ``name``;
        unknown names get the closest valid one suggested."""
        hints = get_type_hints(cls)
        if name not in hints:
            close = difflib.get_close_matches(name, list(hints), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown RL setting {name!r}.{hint} Valid: {', '.join(hints)}")
        hint = hints[name]
        try:
            return _coerce(value, hint)
        except (KeyError, TypeError, ValueError):
            kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise ConfigError(f"{name}: cannot read {value!r} as {kind}") from None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RLConfig:
        """A config from plain values (YAML, command-line strings); unknown keys are an error."""
        return cls(**{k: cls.coerce(k, v) for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples) for YAML and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (bool, int, float, str, Literal, tuple[int, ...], X | None);
    KeyError, TypeError or ValueError when it is not one."""
    args = get_args(hint)
    if isinstance(hint, UnionType):
        empty = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if empty and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)))
    if value is None:
        raise ValueError("empty")
    if get_origin(hint) is Literal:
        if str(value) not in args:
            raise ValueError(value)
        return str(value)
    if get_origin(hint) is tuple:
        if isinstance(value, str):
            value = value.strip("()[] ").replace(",", " ").split()
        return tuple(_coerce(v, args[0]) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        return {"true": True, "false": False}[str(value).lower()]
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if hint is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return int(value)
    if hint is float:
        return float(value)
    return str(value)
