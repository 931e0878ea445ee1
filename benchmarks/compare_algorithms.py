"""Every algorithm of the family on sinusoid regression with the same budget (iterations, meta-batch,
Adam 1e-3): 5-shot test MSE after 1 and 10 steps and after the number of steps trained with
(600 tasks, 95% CI), ms per iteration and the growth of peak memory during training. The black-box baseline takes no steps: its one number,
``mse_conditioned``, is the MSE of its predictions given the 5 support points.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/compare_algorithms.py --iterations 10000

Each algorithm trains in its own subprocess (so that peak memory is its own); runs go to
runs/compare-<algo> and are resumable.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# Settings that differ from the MAML defaults (inner_lr 0.01, 1 step, trained with K = 10).
ALGORITHMS: dict[str, dict] = {
    "maml": {},
    "maml-fo": {"algo": "maml", "first_order": True},
    "metasgd": {"algo": "metasgd"},
    # MSL and cosine annealing; no learned per-step rates (LSLR): at this init (0.01) every Adam
    # step (1e-3) moves a rate by up to 10% of its value, the rates wander (several went
    # negative) and training diverged (inf at iteration 188 in a 2000-iteration probe)
    "mamlpp": {"algo": "mamlpp", "inner_steps": 5, "mamlpp_msl_epochs": 4,
               "iterations_per_epoch": 500, "meta_lr_schedule": "cosine",
               "mamlpp_step_lrs": False},
    # 5 steps as in the ANIL paper (MAML's settings): trained with 1, the body scales the head's
    # features until a step of 0.01 is nearly a Newton step, and repeated steps diverge
    "anil": {"algo": "anil", "inner_steps": 5},
    "reptile": {"algo": "reptile", "inner_steps": 5, "inner_lr": 0.02},
    "imaml": {"algo": "imaml", "inner_steps": 10, "inner_lr": 0.02, "imaml_lambda": 2.0},
    "cavia": {"algo": "cavia", "inner_lr": 1.0, "cavia_context_dim": 5},
    # no inner steps: conditions on the support set (attention, width 128, 2 blocks, 4 heads)
    "blackbox": {"algo": "blackbox"},
}


def run_one(name: str, iterations: int) -> dict:
    from metagrad.config import resolve
    from metagrad.training.loop import train
    from metagrad.training.report import evaluate_run

    settings = {"algo": "maml", **ALGORITHMS[name], "iterations": iterations, "baseline": False,
                "val_every": max(iterations // 5, 1), "threads": 1, "eval_shots": [5]}
    cfg = resolve("sinusoid", "paper", settings)
    out = f"runs/compare-{name}"
    resume = os.path.isdir(os.path.join(out, "checkpoints"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    trainer = train(None if resume else cfg, out, resume=resume, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    rows, _ = evaluate_run(out, scratch=False)
    mse = {r.steps: (round(r.mean, 3), round(r.ci95, 3)) for r in rows}
    if set(mse) == {0}:  # the black box takes no steps: its MSE after reading the support set
        scores = {"mse_conditioned": mse[0]}
    else:
        # after 1 and 10 steps, and after the number it was trained with (e.g. MAML++: 5)
        scores = {f"mse_{k}": mse[k] for k in sorted({1, cfg.inner_steps, 10}) if k in mse}
    return {"algorithm": name, "iterations": trainer.iteration, **scores,
            "ms_per_iteration": round(1e3 * seconds / max(iterations, 1), 2),
            "peak_memory_growth_mib": round(peak / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=10000)
    parser.add_argument("--only", nargs="*", default=list(ALGORITHMS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.iterations)), flush=True)
        return
    for name in args.only:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--iterations",
                              str(args.iterations)], capture_output=True, text=True)
        print(out.stdout.strip().splitlines()[-1] if out.returncode == 0
              else f"{name}: failed: {out.stderr.strip().splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    main()
