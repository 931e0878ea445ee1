"""Every algorithm of the family with the same budget (iterations, meta-batch, Adam 1e-3), ms per
iteration and the growth of peak memory during training:

* ``--task sinusoid`` (default): 5-shot test MSE after 1 and 10 steps and after the number of
  steps trained with (600 tasks, 95% CI);
* ``--task omniglot``: 5-way 1-shot test accuracy after 1 and 3 steps (600 tasks of the test
  characters, 15 queries per class), the Omniglot preset with a smaller meta-batch
  (``--meta-batch``, default 8) so that every algorithm fits the budget; the data comes from
  ``METAGRAD_DATA``.

The black-box baseline takes no steps: its one number (``mse_conditioned`` /
``accuracy_conditioned``) scores its predictions given the support set.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/compare_algorithms.py --iterations 10000
    OMP_WAIT_POLICY=PASSIVE METAGRAD_DATA=../shared/data/omniglot \
        .venv/bin/python benchmarks/compare_algorithms.py --task omniglot --iterations 1000

Each algorithm trains in its own subprocess (so that peak memory is its own); runs go to
runs/compare-<algo> (sinusoid) or runs/compare-<task>-<algo> and are resumable. Each finished
run is committed as ``results/family-<task>-<algo>/``: ``eval.json`` (with a ``training``
record: iterations, seconds, ms per iteration, peak memory growth, load average), the run's
``config.yaml`` and a README with the command; the README's family tables are generated from
them (``tools/results_tables.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")

# Settings that differ from the MAML defaults (inner_lr 0.01, 1 step, trained with K = 10).
ALGORITHMS: dict[str, dict] = {
    "maml": {},
    "maml-fo": {"algo": "maml", "first_order": True},
    # queries normalised with the running statistics at test time (each prediction independent
    # of the other queries), against the paper's transductive batch statistics
    "maml-non-transductive": {"algo": "maml", "transductive": False},
    "metasgd": {"algo": "metasgd"},
    # MSL, cosine annealing and the learned per-step rates (LSLR, in log space so they stay
    # positive)
    "mamlpp": {"algo": "mamlpp", "inner_steps": 5, "mamlpp_msl_epochs": 4,
               "iterations_per_epoch": 500, "meta_lr_schedule": "cosine"},
    # 5 steps as in the ANIL paper (MAML's settings): trained with 1, the body scales the head's
    # features until a step of 0.01 is nearly a Newton step, and repeated steps diverge
    "anil": {"algo": "anil", "inner_steps": 5},
    "reptile": {"algo": "reptile", "inner_steps": 5, "inner_lr": 0.02},
    "imaml": {"algo": "imaml", "inner_steps": 10, "inner_lr": 0.02, "imaml_lambda": 2.0},
    "cavia": {"algo": "cavia", "inner_lr": 1.0, "cavia_context_dim": 5},
    # no inner steps: conditions on the support set (attention, width 128, 2 blocks, 4 heads)
    "blackbox": {"algo": "blackbox"},
}

# Omniglot 5-way 1-shot: the preset's α = 0.4 and 1 step unless stated (settings not tuned).
OMNIGLOT_ALGORITHMS: dict[str, dict] = {
    "maml": {},
    "maml-fo": {"algo": "maml", "first_order": True},
    # queries normalised with the running statistics at test time (each prediction independent
    # of the other queries), against the paper's transductive batch statistics
    "maml-non-transductive": {"algo": "maml", "transductive": False},
    "metasgd": {"algo": "metasgd"},
    # MAML++'s Omniglot recipe scaled to the budget: 3 steps, LSLR from 0.1, MSL over the first
    # 3 "epochs" of 100 iterations, cosine annealing
    "mamlpp": {"algo": "mamlpp", "inner_steps": 3, "inner_lr": 0.1, "mamlpp_msl_epochs": 3,
               "iterations_per_epoch": 100, "meta_lr_schedule": "cosine"},
    # its ablations: + per-step BatchNorm weights and biases (BNWB; the running statistics,
    # BNRS, matter only without transductive BatchNorm), + derivative-order annealing (DA: first
    # order for the first 3 of the 10 "epochs", as the paper's 50 of 150), and both
    "mamlpp-bn": {"algo": "mamlpp", "inner_steps": 3, "inner_lr": 0.1, "mamlpp_msl_epochs": 3,
                  "iterations_per_epoch": 100, "meta_lr_schedule": "cosine",
                  "mamlpp_per_step_bn": True},
    "mamlpp-da": {"algo": "mamlpp", "inner_steps": 3, "inner_lr": 0.1, "mamlpp_msl_epochs": 3,
                  "iterations_per_epoch": 100, "meta_lr_schedule": "cosine",
                  "mamlpp_first_order_epochs": 3},
    "mamlpp-bn-da": {"algo": "mamlpp", "inner_steps": 3, "inner_lr": 0.1,
                     "mamlpp_msl_epochs": 3, "iterations_per_epoch": 100,
                     "meta_lr_schedule": "cosine", "mamlpp_per_step_bn": True,
                     "mamlpp_first_order_epochs": 3},
    "anil": {"algo": "anil"},
    # 5 SGD steps on the task's support and query images (Reptile's Alg. 2, its default here)
    "reptile": {"algo": "reptile", "inner_steps": 5, "inner_lr": 0.1},
    # the paper's GD variant (16 steps for 5-way, λ 2, 5 CG iterations), evaluated up to the
    # steps it trains with
    "imaml": {"algo": "imaml", "inner_steps": 16, "inner_lr": 0.1, "imaml_lambda": 2.0,
              "eval_steps": 16},
    # the authors' public Omniglot code: 16 plain steps on the support loss, one pull-back step
    # on the proximal term, CG on (2I + H/12), 16 plain steps at test; and its inner loop alone
    # (CG on the paper's I + H/λ)
    "imaml-authors": {"algo": "imaml", "inner_steps": 16, "inner_lr": 0.1, "imaml_lambda": 2.0,
                      "imaml_inner": "plain", "imaml_cg_damping": 1.0,
                      "imaml_lambda_damping": 10.0, "eval_steps": 16},
    "imaml-plain": {"algo": "imaml", "inner_steps": 16, "inner_lr": 0.1, "imaml_lambda": 2.0,
                    "imaml_inner": "plain", "eval_steps": 16},
    # the CAVIA paper's image setting (§4.2): a 100-entry context through FiLM after the third
    # block, 2 steps of 1.0
    "cavia": {"algo": "cavia", "inner_lr": 1.0, "inner_steps": 2, "cavia_context_dim": 100},
    "blackbox": {"algo": "blackbox"},
}


def commit_result(name: str, task: str, out: str, training: dict, command: str) -> str:
    """Copies the run's ``eval.json`` (plus ``training``) and ``config.yaml`` into
    ``results/family-<task>-<name>/`` with a README naming the command and the budget."""
    folder = os.path.join(RESULTS, f"family-{task}-{name}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(out, "eval.json")) as f:
        evaluation = json.load(f)
    with open(os.path.join(folder, "eval.json"), "w") as f:
        json.dump({**evaluation, "training": training}, f, indent=1)
    shutil.copyfile(os.path.join(out, "config.yaml"), os.path.join(folder, "config.yaml"))
    settings = (ALGORITHMS if task == "sinusoid" else OMNIGLOT_ALGORITHMS)[name]
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(
            f"# family-{task}-{name}: {name} in the family comparison on {task}\n\n"
            f"- Command: `{command}` (this row: `--only {name}`; run directory {out}).\n"
            "- Settings beyond the task's `paper` preset, the budget above, validation every "
            f"iterations/5 and no pretrained baseline: {json.dumps(settings) if settings else 'none'}"
            "; the full resolved settings are in config.yaml.\n"
            f"- Iterations: {training['iterations']}; evaluated checkpoint: "
            f"{evaluation['checkpoint']} (iteration {evaluation['iteration']}).\n"
            f"- Wall time: {training['seconds']:.0f} s of training and validation, "
            f"{training['ms_per_iteration']} ms per iteration, one thread; load average "
            f"{training['load_average'][0]:.1f} at the start and {training['load_average'][1]:.1f} "
            "at the end (2 cores).\n")
    return folder


def run_one(name: str, iterations: int, task: str, meta_batch: int, command: str) -> dict:
    from metagrad.config import resolve
    from metagrad.training.loop import train
    from metagrad.training.report import evaluate_run

    settings = {"algo": "maml", "iterations": iterations, "baseline": False,
                "val_every": max(iterations // 5, 1), "threads": 1}
    if task == "sinusoid":
        settings |= {**ALGORITHMS[name], "eval_shots": [5]}
        out = f"runs/compare-{name}"
    else:
        settings |= {**OMNIGLOT_ALGORITHMS[name], "meta_batch": meta_batch, "val_tasks": 100}
        out = f"runs/compare-{task}-{name}"
    cfg = resolve(task, "paper", settings)
    resume = os.path.isdir(os.path.join(out, "checkpoints"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    trainer = train(None if resume else cfg, out, resume=resume, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    rows, _ = evaluate_run(out, scratch=False)
    metric = "mse" if task == "sinusoid" else "accuracy"
    score = {r.steps: (round(r.mean, 4), round(r.ci95, 4)) for r in rows}
    if set(score) == {0}:  # the black box takes no steps: its score after reading the support
        scores = {f"{metric}_conditioned": score[0]}
    else:
        # after 1 step, the number trained with (e.g. MAML++: 5) and the last evaluated
        scores = {f"{metric}_{k}": score[k]
                  for k in sorted({1, cfg.inner_steps, cfg.eval_steps}) if k in score}
    training = {"iterations": trainer.iteration, "seconds": round(seconds, 1),
                "ms_per_iteration": round(1e3 * seconds / max(iterations, 1), 1),
                "peak_memory_growth_mib": round(peak / 1024),
                "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    folder = commit_result(name, task, out, training, command)
    return {"algorithm": name, "task": task, **scores, **training, "results": folder}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", choices=("sinusoid", "omniglot"), default="sinusoid")
    parser.add_argument("--iterations", type=int, default=10000)
    parser.add_argument("--meta-batch", type=int, default=8, help="omniglot only")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        command = ("OMP_WAIT_POLICY=PASSIVE " + ("METAGRAD_DATA=../shared/data/omniglot "
                                                  if args.task == "omniglot" else "")
                   + f"python benchmarks/compare_algorithms.py --task {args.task} "
                   f"--iterations {args.iterations}"
                   + (f" --meta-batch {args.meta_batch}" if args.task == "omniglot" else ""))
        print(json.dumps(run_one(args.child, args.iterations, args.task, args.meta_batch,
                                 command)), flush=True)
        return
    table = ALGORITHMS if args.task == "sinusoid" else OMNIGLOT_ALGORITHMS
    for name in args.only or list(table):
        out = subprocess.run([sys.executable, __file__, "--child", name, "--task", args.task,
                              "--iterations", str(args.iterations), "--meta-batch",
                              str(args.meta_batch)], capture_output=True, text=True)
        print(out.stdout.strip().splitlines()[-1] if out.returncode == 0
              else f"{name}: failed: {out.stderr.strip().splitlines()[-1]}", flush=True)

if __name__ == "__main__":
    main()
