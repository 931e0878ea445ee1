"""Settings of a MAML-RL run (:class:`RLConfig`); each field's one-line help is in its
``metadata["help"]`` (``dataclasses.fields(RLConfig)``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from metagrad.errors import ConfigError
from metagrad.parsing import coerce_field, setting, unknown, validate_fields

_RL2_EPISODES = 2


@dataclass(frozen=True)
class RLConfig:
    """Settings of MAML-RL; the defaults are the paper's 2-D navigation ones
    (Finn et al. 2017, §5.3 and App. A.2)."""

    env: str = setting("navigation2d", "Environment: a registered name (metagrad.rl.envs.ENVS) or "
                       "'package.module:factory'; unused when an env object is given.")
    method: Literal["maml", "pretrain", "rl2"] = setting(
        "maml", "maml, or pretrain: the paper's baseline, the TRPO update of the unadapted "
        "policy on all tasks, or rl2: the recurrent black-box baseline (metagrad.rl.rl2).")
    meta_batch: int = setting(20, "Tasks per meta-iteration (paper: 20 for 2-D navigation, 40 "
                              "for locomotion).", min=1)
    rollouts: int = setting(20, "Episodes per task, before and after each adaptation step "
                            "(paper: 20).", min=1)
    horizon: int | None = setting(None, "Episode length; None = the environment's (100 "
                                  "navigation, 200 locomotion).", min=1)
    inner_lr: float = setting(0.1, "α of the adaptation steps in training (and of the first "
                              "inner_steps steps at evaluation).", above=0)
    inner_steps: int = setting(1, "Adaptation steps K in training, each on episodes sampled "
                               "with the policy adapted so far.", min=1)
    rl2_episodes: int = setting(_RL2_EPISODES, "RL²: episodes per trial in training "
                                "(inner_steps + 1 matches MAML's sample budget).", min=1)
    eval_inner_lr: float = setting(0.05, "α of the adaptation steps at evaluation after the "
                                   "first inner_steps (App. A.2: 0.05 after one step of 0.1).",
                                   above=0)
    first_order: bool = setting(False, "Meta-gradient without the second-order terms of the "
                                "adaptation steps.")
    max_kl: float = setting(0.01, "TRPO trust region δ on the mean KL.", above=0)
    cg_iters: int = setting(10, "Conjugate-gradient iterations of the TRPO step.", min=1)
    cg_damping: float = setting(1e-5, "Damping added to the KL's Hessian in conjugate gradient.",
        min=0)
    ls_steps: int = setting(15, "Backtracking line-search steps of TRPO.", min=1)
    ls_backtrack: float = setting(0.8, "Step shrink factor of the line search.",
        above=0, below=1)
    gamma: float = setting(0.99, "Discount γ.", min=0, max=1)
    gae_lambda: float = setting(1.0, "λ of generalised advantage estimation.", min=0, max=1)
    normalize_advantages: bool = setting(True, "Centre and scale the advantages per task (the "
                                         "authors' code, center_adv).")
    hidden: tuple[int, ...] = setting((100, 100), "Hidden layer widths of the policy's mean.",
        min=1)
    seed: int = setting(0, "Seed of the initial weights, tasks and episodes.", min=0)
    hvp: Literal["auto", "exact", "finite_difference", "gauss_newton"] = setting(
        "auto", "Products with the KL's Hessian in TRPO: exact (double backward), "
        "finite_difference, gauss_newton (Jacobian-vector products, no double backward; equal "
        "to exact at the old policy), or auto: the faster for the learner (exact for MAML-RL, "
        "gauss_newton for RL²).")
    fvp_fraction: float = setting(
        0.25, "Share of the meta-batch's tasks (drawn afresh) on which the KL's Hessian, the "
        "trust-region metric, is computed (Schulman et al. 2015, App. C.1); 1.0 = all tasks.",
            above=0, max=1)
    nav_normalized_actions: bool = setting(
        True, "2-D navigation: actions in units of the bound, the move being clip(0.1·a, ±0.1) "
        "(rllab's normalize wrapper), rather than clip(a, ±0.1).")
    nav_reward: Literal["distance", "squared_distance"] = setting(
        "distance", "2-D navigation reward: −‖x − g‖ (the authors' code; the paper's returns are "
        "on this scale) or −‖x − g‖² (the paper's text).")
    # run (metagrad.training.rl)
    iterations: int = setting(500, "Meta-iterations (paper: up to 500).", min=1)
    minutes: float | None = setting(
        None, "Also stop when training has taken this many minutes (validation and checkpoints "
        "included; None: no time limit); the last iteration is validated and saved.", above=0)
    eval_tasks: int = setting(40, "Held-out tasks at evaluation.", min=1)
    eval_rollouts: int = setting(40, "Episodes per test task and adaptation step at evaluation.",
        min=1)
    eval_steps: int = setting(3, "Adaptation steps at evaluation.", min=0)
    eval_seed: int = setting(0, "Seed of the held-out test tasks and their episodes, "
                             "independent of the training seed.", min=0)
    val_every: int = setting(
        10, "Validate every this many meta-iterations: the return averaged over 1..eval_steps "
        "steps on val_tasks tasks of a fixed seed; the best is kept as checkpoints/best.", min=1)
    val_tasks: int = setting(20, "Tasks of the validation.", min=1)
    baseline: bool = setting(True, "With method maml, also train the pretrained policy "
                             "(method=pretrain) on the same task batches; the pretrain and rl2 "
                             "methods train their one policy only.")
    checkpoint_every: int = setting(10, "Save a checkpoint every this many meta-iterations.", min=1)
    keep_checkpoints: int = setting(3, "Periodic checkpoints kept.", min=1)
    init_from: str | None = setting(
        None, "Start the policies from this checkpoint: a run directory (its best checkpoint, "
        "else its last) or a checkpoint file of the same env and hidden sizes; TRPO's state, "
        "iteration count and task sampling start afresh.")
    log_every: int = setting(1, "Write metrics.jsonl every this many meta-iterations.", min=1)
    log: tuple[Literal["csv", "tensorboard"], ...] = setting(
        (), "Also log the metrics.jsonl records to metrics.csv (csv) and/or tensorboard/ "
        "(tensorboard; needs `pip install tensorboard`), e.g. --log csv,tensorboard.")
    threads: int | None = setting(None, "torch intra-op threads (None: torch's default).", min=1)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N (under torchrun: the local rank's "
                          "GPU): where the policy is trained.")
    physics: Literal["gymnasium", "rllab"] = setting(
        "gymnasium", "MuJoCo locomotion: gymnasium's v5 control (5 physics steps of 0.01 s per "
        "action) and reset, or the MAML authors' rllab environments (one physics step per "
        "action: 0.02 s for the ant, 0.01 s for the half cheetah; rllab's initial pose and "
        "reset noise). The ant tasks default to rllab.")
    env_threads: int | None = setting(
        None, "MuJoCo environments: threads of the batched mujoco.rollout (0 = the calling "
        "thread; None = this process's share of the CPUs; results do not depend on it).", min=0)

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.method == "rl2" and self.first_order:
            raise ConfigError("method rl2 has no meta-gradient through adaptation steps (its "
                              "hidden state adapts), so first_order does not apply; remove it")
        if self.method != "rl2" and self.rl2_episodes != _RL2_EPISODES:
            raise ConfigError(f"rl2_episodes={self.rl2_episodes} applies to method rl2 only "
                              f"(this run's method: {self.method}); remove it, or add "
                              "--method rl2")

    @classmethod
    def coerce(cls, name: str, value: Any) -> Any:
        """``value`` (e.g. a YAML value or a command-line string) as the type of field ``name``;
        unknown names get the closest valid one suggested."""
        names = [f.name for f in fields(cls)]
        if name not in names:
            raise ConfigError(unknown("RL setting", name, names))
        return coerce_field(cls, name, value)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RLConfig:
        """A config from plain values (YAML, command-line strings); unknown keys are an error."""
        return cls(**{k: cls.coerce(k, v) for k, v in values.items()})

    def validate(self) -> RLConfig:
        """The config itself: every field was checked on construction."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples) for YAML and checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
