"""Supervised meta-training as a :class:`~metagrad.training.run.Job`: sample a batch of tasks,
accumulate each learner's meta-gradient, step its optimizer; validate on held-out tasks.

Under ``torchrun`` every process draws the same batch and computes the meta-gradient of its
share of the tasks; one all-reduce combines them (:mod:`metagrad.distributed`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from metagrad.config import ExperimentConfig
from metagrad.distributed import Distributed
from metagrad.training import checkpoint as ckpt
from metagrad.training.evaluation import evaluation_curves, mean_ci95
from metagrad.training.experiment import Experiment
from metagrad.training.run import VAL_SEED_OFFSET, RunDirectory, diverged, initialise_learners


def cosine_lr(progress: float, initial: float, final: float) -> float:
    """The cosine annealing of MAML++ (Antoniou et al. 2019, §4; Loshchilov & Hutter 2017) in
    closed form: the rate at ``progress`` p in [0, 1] of the run (t/T before 0-based iteration
    t of T, or the share of a time limit spent), from ``initial`` down to ``final``. A resumed
    run extended to a new length follows the schedule of the new length from there on."""
    return final + (initial - final) * (1 + math.cos(math.pi * min(progress, 1.0))) / 2


class SupervisedJob:
    """Trains every learner of an :class:`Experiment` on the same task batches."""

    def __init__(self, exp: Experiment, directory: RunDirectory, dist: Distributed) -> None:
        cfg = exp.config
        self.exp = exp
        self.settings: ExperimentConfig = cfg
        self.learners = exp.learners
        self.directory = directory
        self.dist = dist
        self.description = f"{cfg.task}/{cfg.algo}"
        self.validation_key = f"val/{exp.setup.metric}"
        self.higher_is_better = exp.setup.metric != "mse"
        optimizer = torch.optim.Adam if cfg.meta_optimizer == "adam" else torch.optim.SGD
        self.optimizers = {name: optimizer(learner.parameters(), lr=cfg.meta_lr)
                           for name, learner in exp.learners.items()}
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.artifacts = exp.setup.artifacts
        # fp16 (CUDA only): losses scaled before each backward, steps skipped on overflow
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        if self.scaler.is_enabled():
            for learner in self.learners.values():
                learner.loss_scale = self.scaler.scale

    def _set_meta_lr(self, progress: float) -> None:
        cfg = self.settings
        if cfg.meta_lr_schedule != "cosine":
            return
        lr = cosine_lr(progress, cfg.meta_lr, cfg.min_meta_lr)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def step(self, iteration: int, progress: float) -> dict[str, float]:
        cfg = self.settings
        batch = self.exp.setup.train.sample(cfg.meta_batch, self.generator).to(self.exp.device)
        mine = self.dist.shard(batch)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        local = torch.stack([learner.meta_gradient(mine).to(self.exp.device)
                             for learner in self.learners.values()])
        reduced = self.dist.all_reduce(self.learners.values(), self.dist.share(batch), local)
        losses = dict(zip(self.learners, reduced.tolist(), strict=True))
        for name, value in losses.items():
            if not math.isfinite(value):
                raise diverged(f"the {name} loss became {value}", iteration,
                               self.directory.checkpoints.directory,
                               "Lower meta_lr or inner_lr.")
        self._set_meta_lr(progress)
        for opt in self.optimizers.values():
            self.scaler.step(opt)
        self.scaler.update()
        meta_lr = next(iter(self.optimizers.values())).param_groups[0]["lr"]
        return {**{f"loss/{n}": v for n, v in losses.items()}, "meta_lr": meta_lr}

    def validate(self) -> float:
        """The meta-learner's mean query metric after ``inner_steps`` steps on ``val_tasks``
        tasks of a fixed seed, independent of the training seed: runs with different seeds
        select and compare their checkpoints on the same tasks."""
        cfg = self.settings
        gen = torch.Generator().manual_seed(VAL_SEED_OFFSET)
        curves = evaluation_curves(self.exp.learner, self.exp.setup.held_out("val", cfg.shots),
                                   cfg.val_tasks, cfg.inner_steps, self.exp.setup.metric, gen,
                                   self.exp.device, at=[cfg.inner_steps])
        return mean_ci95(curves[:, -1])[0]

    def state_dict(self) -> dict[str, Any]:
        return {"learners": {n: learner.state_dict() for n, learner in self.learners.items()},
                "optimizers": {n: opt.state_dict() for n, opt in self.optimizers.items()},
                "scaler": self.scaler.state_dict(),
                "rng": ckpt.rng_state(self.generator)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, learner in self.learners.items():
            learner.load_state_dict(state["learners"][name])
            self.optimizers[name].load_state_dict(state["optimizers"][name])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_state(state["rng"], self.generator)

    def initialise_from(self, state: dict[str, Any]) -> None:
        """Each learner's parameters, learned rates and buffers from ``state``; the optimizers,
        the schedule and the task stream stay fresh."""
        initialise_learners(self.learners, state,
                            lambda learner, saved: learner.load_state_dict(saved))

    def synchronised_parameters(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for learner in self.learners.values()
                          for p in learner.parameters()])
